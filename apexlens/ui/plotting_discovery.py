"""Plotly figures for circuit discovery (a module of its own, next to :mod:`apexlens.ui.plotting`).

* :func:`faithfulness_curve` -- MIB faithfulness against circuit size, one line per method
* :func:`score_scatter` -- an approximate edge score against the exact one, one dot per edge
* :func:`circuit_graph` -- a discovered circuit as a path graph (:func:`apexlens.ui.plotting.path_graph`)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from apexlens.engines.attribution.registry import METHOD_INFO
from apexlens.errors import ApexlensError
from apexlens.results import DiscoveryResult, EdgeScores, FaithfulnessResult
from apexlens.ui.plotting import path_graph
from apexlens.ui.plotting_graph import Edges, draw


def faithfulness_curve(
    results: FaithfulnessResult | Sequence[FaithfulnessResult] | Mapping[str, FaithfulnessResult],
    title: str | None = None,
) -> go.Figure:
    """Faithfulness ``f`` against the fraction of edges kept (log axis), one line per
    result, labelled with its method and CPR / CMD; ``f = 1`` dashed."""
    if isinstance(results, FaithfulnessResult):
        items = [(results.method, results)]
    elif isinstance(results, Mapping):
        items = list(results.items())
    else:
        items = [(r.method, r) for r in results]
    if not items:
        raise ApexlensError("faithfulness_curve needs at least one FaithfulnessResult")
    fig = go.Figure()
    for name, res in items:
        fig.add_trace(
            go.Scatter(
                x=[100 * q for q in res.fractions],
                y=res.f.tolist(),
                mode="lines+markers",
                name=f"{name} (CPR {res.cpr:.2f}, CMD {res.cmd:.2f})",
                customdata=res.n_edges,
                hovertemplate="top %{x:.3g}% = %{customdata} edges<br>f = %{y:.3f}<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey")
    ticks = sorted({100 * q for _, res in items for q in res.fractions if q > 0})
    fig.update_layout(
        title=title or "faithfulness of the top-k% edges",
        # a label at every circuit size (plotly's own log ticks label 0.2% and 20% both "2")
        xaxis={"title": "edges kept (%)", "type": "log", "tickmode": "array",
               "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]},
        yaxis_title="faithfulness (m(circuit) - m(empty)) / (m(full) - m(empty))",
    )
    return fig


def score_scatter(approx: EdgeScores, exact: EdgeScores, title: str | None = None) -> go.Figure:
    """Each edge's approximate score (y) against its exact effect (x); the diagonal is a
    perfect attribution. Hover shows the edge."""
    y = exact.aligned(approx).double().tolist()
    x = exact.scores.double().tolist()
    names = [f"{s} -> {r}" for s, r in exact.edges]
    audit = approx.compare(exact)
    lo, hi = min(x + y), max(x + y)
    fig = go.Figure(
        [
            go.Scattergl(
                x=x,
                y=y,
                mode="markers",
                text=names,
                marker={"size": 5, "opacity": 0.6},
                hovertemplate="%{text}<br>exact %{x:.4g}<br>"
                + approx.method
                + " %{y:.4g}<extra></extra>",
                name="edges",
            ),
            go.Scatter(
                x=[lo, hi],
                y=[lo, hi],
                mode="lines",
                line={"dash": "dash", "color": "grey"},
                name="y = x",
            ),
        ]
    )
    fig.update_layout(
        title=title
        or f"{approx.method} vs exact: Spearman {audit.spearman:.3f} over {len(x)} edges",
        xaxis_title="exact effect of ablating the edge",
        yaxis_title=f"{approx.method} score",
    )
    return fig


def circuit_graph(
    result: DiscoveryResult, scores: EdgeScores | None = None, title: str | None = None
) -> Any:
    """A discovered circuit as a path graph (:func:`apexlens.ui.plotting.path_graph`); with
    ``scores``, line widths and colours show each edge's score (the legend names the
    method, and says when it is an approximation)."""
    pairs = [(str(s), str(r)) for s, r in result.edges]
    title = title or (
        f"discovered circuit: {len(pairs)} edges, {result.evaluation.ablation} ablation of "
        f"every other edge, recovery {result.recovery:.2f}"
    )
    if scores is None:
        return path_graph(result.evaluation, title=title)
    exact = METHOD_INFO[scores.method].exact if scores.method in METHOD_INFO else False
    what = f"{scores.method} score" + ("" if exact else " (an approximation)")
    spec = Edges(
        pairs,
        [scores.score(s, r) for s, r in result.edges],
        title,
        red="negative: removing the edge lowers the metric" + ("" if exact else " (estimated)"),
        blue="positive: removing the edge raises the metric" + ("" if exact else " (estimated)"),
        what=what,
    )
    return draw(spec, None)
