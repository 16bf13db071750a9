"""The tutorial notebooks run on the offline path, draw their figures and tell their story."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Each notebook executed once, offline, as a user without network would run it."""
    cache: dict[str, nbformat.NotebookNode] = {}

    def run(name: str) -> nbformat.NotebookNode:
        if name not in cache:
            mp = pytest.MonkeyPatch()
            mp.setenv("HF_HUB_OFFLINE", "1")  # the GPT-2 attempt fails fast, as with no network
            # tiny models: torch's threads only contend on a busy 2-core machine (notebook 04
            # took over 300 s there with them, about 30 s with one)
            mp.setenv("OMP_NUM_THREADS", "1")
            try:
                nb = nbformat.read(NOTEBOOKS / name, as_version=4)
                path = tmp_path_factory.mktemp("nb")
                NotebookClient(
                    nb,
                    timeout=300,
                    kernel_name="python3",
                    resources={"metadata": {"path": str(path)}},
                ).execute()
            finally:
                mp.undo()
            cache[name] = nb
        return cache[name]

    return run


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb, stream: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in _outputs(nb) if o.get("name") == stream)


def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize(
    "name, n_figures",
    [
        ("01_ioi_path_patching.ipynb", 3),
        ("02_apex_backdoor.ipynb", 4),
        ("03_discovery.ipynb", 3),
        ("04_feature_visualization.ipynb", 2),
    ],
)
def test_notebook_runs_and_draws(name, n_figures, executed):
    nb = executed(name)
    figures = [o for o in _outputs(nb) if PLOTLY in o.get("data", {})]
    assert len(figures) == n_figures
    for fig in figures:
        assert fig["data"][PLOTLY]["data"], "a figure without traces"
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"]
    # no IProgress / TqdmWarning noise on stderr
    assert "IProgress" not in _text(nb, "stderr") and "TqdmWarning" not in _text(nb, "stderr")


ALL = [
    "01_ioi_path_patching.ipynb",
    "02_apex_backdoor.ipynb",
    "03_discovery.ipynb",
    "04_feature_visualization.ipynb",
]


@pytest.mark.parametrize("name", ALL)
def test_notebook_tells_a_story(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and "**Question.**" in cells[0].source
    # no two code cells in a row without words between them, except a figure's follow-up
    runs = 0
    for c in cells:
        runs = runs + 1 if c.cell_type == "code" else 0
        assert runs <= 2
    text = _markdown(nb)
    assert "**What it means.**" in text or "**Conclusion.**" in text
    assert "**What to try next.**" in text


@pytest.mark.parametrize("name", ALL)
def test_notebook_numbers_come_from_its_outputs(name, executed):
    """A number the narrative quotes (two or more decimals) is one a cell above printed."""
    nb = executed(name)
    printed = ""
    for cell in nb.cells:
        if cell.cell_type == "code":
            for o in cell.get("outputs", []):
                printed += o.get("text", "") + o.get("data", {}).get("text/plain", "")
            continue
        prose = re.sub(r"`[^`]*`", "", cell.source)
        for number in re.findall(r"(?<![\w.@])-?\d+\.\d{2,}(?![\d%])", prose):
            assert number in printed, f"{name}: the text quotes {number}, no cell above printed it"
    assert "in seconds" not in _markdown(nb)  # no speed claims the run does not keep


def test_discovery_notebook_reads_the_circuit_it_found(executed):
    nb = executed("03_discovery.ipynb")
    text = _text(nb)
    assert "query edges kept by discovery: 0" in text  # "Reading it" says: no query edges
    groups = re.findall(r"^into (.+?): (.+)$", text, re.M)
    assert groups and any(into == "logits" for into, _ in groups)
    assert any(into.startswith("layer-1 k") for into, _ in groups)
    assert not any(into.endswith(" q") for into, _ in groups)
    recov = dict(re.findall(r"^(discovered|hand-written) .*mean\s+ablation: recovery (-?\d\.\d\d)",
                            text, re.M))
    assert float(recov["hand-written"]) > 0.9 > float(recov["discovered"])  # as the text says


def test_path_patching_notebook_is_about_the_model_it_loads(executed):
    nb = executed("01_ioi_path_patching.ipynb")
    title = nb.cells[0].source.splitlines()[0]
    assert "induction-2l" in title and "IOI" not in title
    assert "not available here" in _text(nb)  # offline: it says so in one line
    assert len([ln for ln in _text(nb).splitlines() if "not available" in ln]) == 1
    for o in _outputs(nb):
        fig = o.get("data", {}).get(PLOTLY)
        if fig is None:
            continue
        for trace in fig["data"]:
            name = trace.get("name", "")
            m = re.fullmatch(r"(\d+)\.\d+ -> (\d+)\.\d+(?:\.[qkv])?", name)
            if m:  # an edge between two heads goes forward, never within a layer
                assert int(m.group(1)) < int(m.group(2)), name
    recovery = re.search(r"recovery (\d+\.\d+), proportion", _text(nb))
    assert recovery and float(recovery.group(1)) > 0.9


def test_apex_notebook_decides_both_regimes(executed):
    """The decision is printed for both models, the random-label pair separates, and the
    'what carries over' table is computed from those numbers."""
    nb = executed("02_apex_backdoor.ipynb")
    text = _text(nb)
    assert re.search(r"^backdoor: biased toward token 23 \(TARGET\)", text, re.M), text
    assert re.search(r"^backdoor-clean: not flagged", text, re.M), text
    auc = re.search(r"AUC P\(true > random\) = (\d\.\d\d) \[(\d\.\d\d), (\d\.\d\d)\]", text)
    assert auc and float(auc.group(2)) > 0.5, text
    tables = [o["data"]["text/plain"] for o in _outputs(nb) if "text/plain" in o.get("data", {})]
    carries = tables[-1]
    assert "carries over" in carries and carries.count("True") >= 2


def test_feature_visualization_notebook_flags_only_the_planted_neuron(executed):
    nb = executed("04_feature_visualization.ipynb")
    text = _text(nb)
    assert "modadd-2l-slingshot  FV = 11 = 11" in text
    assert text.count("suspicious") == 1
    tables = [o["data"]["text/plain"] for o in _outputs(nb) if "text/plain" in o.get("data", {})]
    last = tables[-1]
    assert last.count("True") == 0 and last.count("False") == 4
