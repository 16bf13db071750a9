"""Issue 12, item 4: every report figure explained, every table column defined."""

from __future__ import annotations

import html as html_lib
import re

from apexlens.ui.cli import main


# ----------------------------------------------------------------------------- 4. report
def _sections(html: str) -> list[str]:
    return html.split("<h2>")[1:]


def _columns(section: str) -> list[str]:
    head = re.search(r"<thead>(.*?)</thead>", section, re.S)
    cells = re.findall(r"<th[^>]*>(.*?)</th>", head.group(1))
    return [html_lib.unescape(c.replace("<wbr>", "")) for c in cells]  # names break at "_"


def _defined(section: str) -> set[str]:
    return {html_lib.unescape(d) for d in re.findall(r"<dt><code>(.*?)</code></dt>", section)}


def test_demo_report_explains_every_figure_and_column(tmp_path):
    from apexlens.ui.demo import run_demo

    run_demo(tmp_path, progress=False, n=8)
    html = (tmp_path / "report.html").read_text()
    sections = _sections(html)
    figures = [s for s in sections if "Plotly.newPlot" in s]
    tables = [s for s in sections if "<table" in s]
    assert len(figures) == 10 and len(tables) >= 5
    for s in figures:
        caption = re.search(r"<p class=['\"]caption['\"]>(.*?)</p>", s, re.S)
        assert caption and len(caption.group(1).split()) >= 12, s[:80]
    for s in tables:
        missing = set(_columns(s)) - _defined(s)
        assert not missing, (s[:60], missing)
    for column in ("escaped", "flip_rate", "effective_n", "kl", "recovery", "aue", "ate"):
        assert f"<dt><code>{column}</code></dt>" in html
    assert "mean KL" in html  # aue / ate are spelled out


def test_write_report_defines_known_columns_and_accepts_captions(tmp_path):
    import pandas as pd

    from apexlens.ui.report import write_report

    frame = pd.DataFrame({"sender": ["0.1"], "normalized": [-0.2]})
    path = write_report(
        tmp_path / "r.html",
        [("table", frame, "A caption <b>escaped</b>.")],
        definitions={"sender": "who sends"},
    )
    html = path.read_text()
    assert "A caption &lt;b&gt;escaped&lt;/b&gt;." in html
    assert "who sends" in html and "<dt><code>normalized</code></dt>" in html


def test_cli_reports_define_their_columns(tmp_path):
    assert main(["path-patch", "induction-2l", "--n", "4", "--out", str(tmp_path / "pp")]) == 0
    assert (
        main(
            [
                "apex",
                "backdoor",
                "--n",
                "4",
                "--sigmas",
                "1,4",
                "--draws",
                "2",
                "--out",
                str(tmp_path / "ap"),
            ]
        )
        == 0
    )
    for f in (tmp_path / "pp" / "path_patch.html", tmp_path / "ap" / "apex.html"):
        html = f.read_text()
        for s in _sections(html):
            if "<table" in s:
                assert not set(_columns(s)) - _defined(s)
            if "Plotly.newPlot" in s:
                assert "class='caption'" in s
