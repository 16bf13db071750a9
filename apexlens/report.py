"""One self-contained HTML report: figures and tables, plotly.js inlined once."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go


def write_report(
    path: str | Path,
    sections: Sequence[tuple[str, Any]],
    *,
    title: str = "apexlens report",
    intro: str = "",
) -> Path:
    """Write ``sections`` -- ``(heading, figure | DataFrame | str)`` pairs -- to one HTML file
    that opens with no network (plotly.js is embedded with the first figure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}h2{margin-top:2em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    js_done = False
    for heading, item in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(item, go.Figure):
            parts.append(item.to_html(full_html=False, include_plotlyjs=not js_done))
            js_done = True
        elif isinstance(item, pd.DataFrame):
            parts.append(item.to_html(index=False, float_format=lambda x: f"{x:.4g}"))
        else:
            parts.append(f"<pre>{html.escape(str(item))}</pre>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
