"""Issue 12, item 4: every report figure explained, every table column defined."""

from __future__ import annotations

import html as html_lib
import json
import re

import pytest

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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``apexlens demo`` run once (the slowest thing these tests do): its folder and result."""
    from apexlens.ui.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, progress=False, n=16)


def test_demo_report_explains_every_figure_and_column(demo):
    html = (demo[0] / "report.html").read_text()
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


def _figures(html: str) -> list[dict]:
    """The plotly figures embedded in a report: (data, layout) of each Plotly.newPlot call,
    decoded as JSON values one after the other (no regex over nested brackets)."""
    out = []
    decoder = json.JSONDecoder()
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html):
        data, end = decoder.raw_decode(html, m.end())
        rest = re.match(r"\s*,\s*", html[end:])
        assert rest is not None
        layout, _ = decoder.raw_decode(html, end + rest.end())
        out.append({"data": data, "layout": layout})
    return out


def test_demo_writes_a_self_contained_report(demo):
    out, result = demo
    html = (out / "report.html").read_text()
    assert re.search(r"<script[^>]*\bsrc=", html) is None  # plotly.js inlined: opens offline
    assert html.count("Plotly.newPlot") == 10  # with the APEX bias decision
    figs = _figures(html)
    assert len(figs) == 10
    for fig in figs:
        assert fig["data"], "a figure without data"
        assert any(len(t.get("x", []) or t.get("z", []) or t.get("y", [])) for t in fig["data"])
    heat = figs[0]["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 2 and len(heat["z"][0]) == 4
    assert result["prev_token_head"].startswith("0.") and result["induction_head"].startswith("1.")
    assert result["recovery"] > 0.8
    by_model = {r["model"]: r for r in result["apex"]}
    assert by_model["backdoor"]["dominant_token"] == 23
    assert by_model["backdoor"]["top1_share"] > 2 * by_model["backdoor-clean"]["top1_share"]
    assert result["fv_flagged"] == {"modadd-2l-slingshot": True, "modadd-2l": False}


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
