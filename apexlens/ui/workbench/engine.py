"""The workbench's only contact with apexlens beyond its public API: small adapters, each
marked ``# ADAPTER:``.

Everything else in :mod:`apexlens.ui.workbench` uses the public top-level API
(``apexlens.Experiment``, ``apexlens.full_graph``, ``apexlens.attribute_edges``, ...).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apexlens

CIRCUIT_FORMAT = "apexlens.circuit"
CIRCUIT_VERSION = 1


def experiment_metric(exp: apexlens.Experiment) -> Any:
    """The metric an Experiment was built with (``attribute_edges`` / ``discover`` take an
    Experiment only together with its own metric object)."""
    # ADAPTER: Experiment keeps its metric on its Readout; a public accessor would replace this.
    return exp.readout.metric


def circuit_to_json(edges: Iterable[tuple[str, str]], ablation: str = "resample") -> str:
    """A circuit in the format ``apexlens.Circuit.save`` writes."""
    # ADAPTER: the lead adds Circuit.save/load with exactly this format; call it then.
    # one edge per line: diff-friendly and readable
    lines = ",\n".join(f"  {json.dumps([s, r])}" for s, r in edges)
    body = f"[\n{lines}\n ]" if lines else "[]"
    return (
        f'{{\n "format": "{CIRCUIT_FORMAT}",\n "version": {CIRCUIT_VERSION},\n'
        f' "ablation": {json.dumps(ablation)},\n "edges": {body}\n}}\n'
    )


def circuit_from_json(obj: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """``(edges, ablation)`` of a parsed ``apexlens.circuit`` document (checked)."""
    # ADAPTER: to be replaced by apexlens.Circuit.load once it exists.
    if obj.get("format") != CIRCUIT_FORMAT:
        raise apexlens.ApexlensError(
            f"not an apexlens circuit: 'format' is {obj.get('format')!r}, expected {CIRCUIT_FORMAT!r}"
        )
    version = obj.get("version")
    if version != CIRCUIT_VERSION:
        raise apexlens.ApexlensError(
            f"apexlens circuit version {version!r} is not supported (this apexlens reads "
            f"version {CIRCUIT_VERSION})"
        )
    edges = obj.get("edges")
    if not isinstance(edges, list):
        raise apexlens.ApexlensError(
            "apexlens circuit: 'edges' must be a list of [sender, receiver]"
        )
    out: list[tuple[str, str]] = []
    for i, e in enumerate(edges):
        if not (isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)):
            raise apexlens.ApexlensError(
                f"apexlens circuit: edge {i} is {e!r}, expected [sender, receiver] (two strings)"
            )
        out.append((e[0], e[1]))
    ablation = obj.get("ablation", "resample")
    if ablation not in ("resample", "mean", "zero"):
        raise apexlens.ApexlensError(
            f"apexlens circuit: ablation {ablation!r} is not one of resample, mean, zero"
        )
    return out, str(ablation)


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
