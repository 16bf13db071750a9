"""The workbench's only contact with apexlens beyond its public API: small adapters, each
marked ``# ADAPTER:``.

Everything else in :mod:`apexlens.ui.workbench` uses the public top-level API
(``apexlens.Experiment``, ``apexlens.full_graph``, ``apexlens.attribute_edges``, ...).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apexlens


def experiment_metric(exp: apexlens.Experiment) -> Any:
    """The metric an Experiment was built with."""
    # ADAPTER: Experiment keeps its metric on its Readout; a public accessor would replace this.
    return exp.readout.metric


def circuit_to_json(edges: Iterable[tuple[str, str]], ablation: str = "resample") -> str:
    """A circuit in the format ``apexlens.Circuit.save`` writes."""
    return apexlens.Circuit(edges, ablation).to_json()  # type: ignore[arg-type]


def circuit_from_json(obj: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """``(edges, ablation)`` of a parsed ``apexlens.circuit`` document (checked by
    ``apexlens.Circuit.from_json``)."""
    c = apexlens.Circuit.from_json(obj, where="the uploaded file")
    return [(str(s), str(r)) for s, r in c.edges], str(c.ablation)


def report_html(
    sections: Sequence[tuple[Any, ...]],
    title: str,
    intro: str = "",
    definitions: dict[str, str] | None = None,
) -> str:
    """A self-contained HTML report (plotly.js inlined once, every table column defined) as
    a string: the same writer as ``apexlens demo`` and the CLI reports."""
    # ADAPTER: apexlens.report.write_report writes a file; a string-returning variant would
    # replace the temporary file.
    from apexlens.ui.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        path = write_report(
            Path(tmp) / "snapshot.html", sections, title=title, intro=intro, definitions=definitions
        )  # type: ignore[arg-type]
        return path.read_text(encoding="utf-8")
