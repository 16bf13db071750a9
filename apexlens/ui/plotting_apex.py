"""Plotly figures for APEX's decision and measurements (also importable from
:mod:`apexlens.ui.plotting`). Every function returns a ``go.Figure``.

* :func:`apex_bias_plot` -- the bias test: each sigma's largest token gain with its interval,
  against the tolerance ``delta``
* :func:`escape_distributions` -- escape noise of several models (empirical CDFs, log axis)
* :func:`escape_destinations` -- where predictions go when they escape, against chance
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
import torch

from apexlens.errors import ApexlensError

_PALETTE = ["#2166ac", "#b2182b", "#1b7837", "#762a83", "#e08214", "#35978f"]
_Z95 = 1.959963984540054


def apex_bias_plot(decisions: Any) -> go.Figure:
    """Gain (noisy share minus clean share) of each sigma's strongest token, with 95%
    intervals, one line per audited model (an :class:`~apexlens.ApexBias` or a mapping name
    -> ApexBias), and the tolerance ``delta`` of the null hypothesis as a dashed line: a
    model is flagged when a gain stands clearly above it."""
    items = decisions if isinstance(decisions, Mapping) else {"model": decisions}
    if not items:
        raise ApexlensError("apex_bias_plot needs at least one ApexBias")
    fig = go.Figure()
    delta = None
    for j, (name, d) in enumerate(items.items()):
        frame = d.to_frame()
        frame = frame[frame["used"].astype(bool)]
        delta = d.delta
        verdict = f"flagged, p={d.p_value:.1g}" if d.flagged else "not flagged"
        fig.add_trace(
            go.Scatter(
                x=frame["sigma"].tolist(),
                y=frame["gain"].tolist(),
                error_y={"type": "data", "array": (_Z95 * frame["gain_se"]).tolist()},
                mode="lines+markers+text",
                text=frame["label"].tolist(),
                textposition="top center",
                name=f"{name} ({verdict})",
                line={"color": _PALETTE[j % len(_PALETTE)]},
                hovertemplate="sigma %{x}<br>gain %{y:.3f}<br>token %{text}<extra></extra>",
            )
        )
    fig.add_hline(y=delta, line_dash="dash", annotation_text=f"delta = {delta:g}")
    fig.update_layout(
        title="APEX bias test: the largest token gain under noise (95% intervals)",
        xaxis={"title": "sigma (log scale)", "type": "log"},
        yaxis_title="gain = noisy share - clean share",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def escape_distributions(results: Mapping[str, Any], comparison: Any = None) -> go.Figure:
    """Empirical CDFs of several :class:`~apexlens.EscapeNoise` results (sigma on a log
    axis; censored samples never reach the top); ``comparison``: an
    :class:`~apexlens.EscapeComparison` whose AUC goes in the title."""
    if not results:
        raise ApexlensError("escape_distributions needs at least one EscapeNoise")
    fig = go.Figure()
    for j, (name, res) in enumerate(results.items()):
        v = res.values[torch.isfinite(res.values)].sort().values
        n = res.n_samples
        fig.add_trace(
            go.Scatter(
                x=v.tolist(),
                y=[(i + 1) / n for i in range(len(v))],
                mode="lines",
                line={"shape": "hv", "color": _PALETTE[j % len(_PALETTE)]},
                name=f"{name} (median {float(res.values.median()):.3g}, n={n})",
            )
        )
    title = "escape noise: share of samples escaped by sigma"
    if comparison is not None:
        a, b = comparison.names
        title += (f"<br>AUC P({a} > {b}) = {comparison.auc:.2f} "
                  f"[{comparison.low:.2f}, {comparison.high:.2f}]")
    fig.update_layout(
        title=title,
        xaxis={"title": "escape noise sigma (log scale)", "type": "log"},
        yaxis={"title": "share of samples", "range": [0, 1.02]},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def escape_destinations(tables: Any) -> go.Figure:
    """Where escaping predictions go (:meth:`EscapeNoise.destinations` tables, one or a
    mapping name -> table): the share of escapes per destination, against chance (hollow)."""
    items = tables if isinstance(tables, Mapping) else {"": tables}
    fig = go.Figure()
    for j, (name, t) in enumerate(items.items()):
        colour = _PALETTE[j % len(_PALETTE)]
        fig.add_trace(go.Bar(x=t["destination"].tolist(), y=t["share"].tolist(),
                             name=f"{name} share".strip(), marker_color=colour))
        chance = [c if not (isinstance(c, float) and math.isnan(c)) else None for c in t["chance"]]
        fig.add_trace(go.Scatter(x=t["destination"].tolist(), y=chance, mode="markers",
                                 name=f"{name} chance".strip(),
                                 marker={"symbol": "line-ew-open", "size": 28, "color": colour,
                                         "line": {"width": 3}}))
    fig.update_layout(
        title="where predictions go when they escape (bars) vs chance (lines)",
        yaxis_title="share of escaped rays",
        barmode="group",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
