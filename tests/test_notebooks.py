"""The tutorial notebooks run on the offline path and draw their figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"


@pytest.mark.parametrize(
    "name, n_figures",
    [
        ("01_ioi_path_patching.ipynb", 3),
        ("02_apex_backdoor.ipynb", 3),
        ("03_discovery.ipynb", 3),
    ],
)
def test_notebook_runs_and_draws(name, n_figures, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the GPT-2 attempt fails fast, as with no network
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if PLOTLY in o.get("data", {})
    ]
    assert len(figures) == n_figures
    for fig in figures:
        assert fig["data"][PLOTLY]["data"], "a figure without traces"
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    if name.startswith("01"):
        assert "not available here" in text  # offline: it says so and falls back to a toy model
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
