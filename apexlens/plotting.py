"""Plotly figures for every apexlens result. Every function returns a ``go.Figure``.

* :func:`head_heatmap` -- layer x head map of a path-patching result (diverging, centred at 0)
* :func:`path_graph` -- a circuit or the strongest paths, nodes laid out by layer
* :func:`apex_curves` -- APEX concentration metrics against the noise level, one line per model
* :func:`token_histogram` -- which tokens the noisy model predicts at one noise level
* :func:`scores_plot` -- per-example values with bootstrap confidence intervals
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch

from apexlens.backend import ApexlensError
from apexlens.graph import Node, parse_node


def head_heatmap(result: Any, normalized: bool = True, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of a :class:`~apexlens.patching.PathPatchResult` over all heads.

    The colour is the normalised effect ``(patched - clean) / (clean - corrupted)`` (or the raw
    metric with ``normalized=False``) on a diverging scale centred at 0; hovering a cell shows
    the head's name, its raw and its normalised value.
    """
    if result.grid is None:
        raise ApexlensError("head_heatmap needs a result over all heads (senders='all-heads')")
    raw = result.values.detach().double().cpu()
    norm = result.normalized().detach().double().cpu()
    z = norm if normalized else raw - result.clean.mean
    n_layers, n_heads = result.grid
    names = [[f"{la}.{h}" for h in range(n_heads)] for la in range(n_layers)]
    custom = [
        [[names[la][h], float(raw[la, h]), float(norm[la, h])] for h in range(n_heads)]
        for la in range(n_layers)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            zmid=0,
            colorscale="RdBu",
            customdata=custom,
            hovertemplate="head %{customdata[0]}<br>metric %{customdata[1]:.4g}<br>normalised %{customdata[2]:.3f}<extra></extra>",
            colorbar={"title": "normalised" if normalized else "metric - clean"},
        )
    )
    receivers = ", ".join(result.receivers) if result.receivers else "activation patching"
    fig.update_layout(
        title=title or f"{result.metric_name}: heads -> {receivers}",
        xaxis_title="head",
        yaxis_title="layer",
        yaxis={"autorange": "reversed"},
    )
    return fig


def _node_xy(node: Node, n_layers: int, slot: int) -> tuple[float, float]:
    if node.kind == "embed":
        return -1.0, 0.0
    if node.kind == "logits":
        return float(n_layers), 0.0
    if node.kind == "mlp":
        return node.layer + 0.5, -1.5 - 0.0 * slot
    return float(node.layer), float(node.head or 0) + 0.0 * slot


def path_graph(
    edges: Any,
    weights: Sequence[float] | None = None,
    *,
    n_layers: int | None = None,
    top_k: int = 10,
    title: str | None = None,
) -> go.Figure:
    """A path graph: nodes laid out by layer (embed left, logits right), edges as lines whose
    width and colour show their effect.

    ``edges`` is a list of ``(sender, receiver)`` pairs (with ``weights``), a
    :class:`~apexlens.circuits.CircuitResult` (its edges), or a
    :class:`~apexlens.patching.PathPatchResult` (its ``top_k`` strongest senders to its
    receivers, weighted by their normalised effect).
    """
    pairs: list[tuple[str, str]]
    w: list[float]
    if hasattr(edges, "per_example") and hasattr(edges, "senders"):  # PathPatchResult
        norm = edges.normalized().flatten().tolist()
        order = sorted(range(len(norm)), key=lambda i: -abs(norm[i]))[:top_k]
        receivers = edges.receivers or ["logits"]
        pairs = [(edges.senders[i], r) for i in order for r in receivers]
        w = [norm[i] for i in order for _ in receivers]
        title = title or f"top {len(order)} paths to {', '.join(receivers)}"
    elif hasattr(edges, "edges") and hasattr(edges, "recovery"):  # CircuitResult
        pairs = list(edges.edges)
        w = [1.0] * len(pairs) if weights is None else list(weights)
        title = title or f"circuit: {len(pairs)} edges, recovery {edges.recovery:.2f}"
    else:
        pairs = [(str(s), str(r)) for s, r in edges]
        w = [1.0] * len(pairs) if weights is None else [float(x) for x in weights]
    if len(w) != len(pairs):
        raise ApexlensError(f"{len(pairs)} edges but {len(w)} weights")
    nodes: dict[str, Node] = {}
    for s, r in pairs:
        for name in (s, r):
            node = parse_node(name)
            base = str(Node(node.kind, node.layer, node.head))  # channels share the head's dot
            nodes.setdefault(base, Node(node.kind, node.layer, node.head))
    layers = [n.layer for n in nodes.values() if n.kind in ("head", "mlp")]
    n_layers = n_layers if n_layers is not None else (max(layers) + 1 if layers else 1)
    pos = {name: _node_xy(n, n_layers, i) for i, (name, n) in enumerate(nodes.items())}
    wmax = max((abs(x) for x in w), default=1.0) or 1.0
    fig = go.Figure()
    for (s, r), weight in zip(pairs, w, strict=True):
        sn, rn = parse_node(s), parse_node(r)
        a = pos[str(Node(sn.kind, sn.layer, sn.head))]
        b = pos[str(Node(rn.kind, rn.layer, rn.head))]
        colour = "#b2182b" if weight < 0 else "#2166ac"
        fig.add_trace(
            go.Scatter(
                x=[a[0], b[0]],
                y=[a[1], b[1]],
                mode="lines",
                line={"width": 1 + 7 * abs(weight) / wmax, "color": colour},
                opacity=0.7,
                hovertext=f"{s} -> {r}: {weight:.3g}",
                hoverinfo="text",
                name=f"{s} -> {r}",
                showlegend=False,
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in pos.values()],
            y=[p[1] for p in pos.values()],
            mode="markers+text",
            text=list(pos),
            textposition="top center",
            marker={"size": 14, "color": "#444"},
            hoverinfo="text",
            name="nodes",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=title or "path graph",
        xaxis={
            "title": "layer",
            "tickmode": "array",
            "tickvals": list(range(-1, n_layers + 1)),
            "ticktext": ["embed", *map(str, range(n_layers)), "logits"],
        },
        yaxis={"title": "head (MLPs below)", "zeroline": False},
    )
    return fig


def apex_curves(
    results: Mapping[str, Any], metrics: Sequence[str] = ("top1_share", "entropy")
) -> go.Figure:
    """APEX concentration metrics against the noise level sigma (log axis), one line per model
    and metric (metrics after the first on a second y axis)."""
    if not results:
        raise ApexlensError("apex_curves needs at least one result")
    fig = go.Figure()
    for j, metric in enumerate(metrics):
        for name, res in results.items():
            df = res.summary()
            if metric not in df:
                raise ApexlensError(
                    f"unknown APEX metric {metric!r}; columns: {', '.join(df.columns)}"
                )
            fig.add_trace(
                go.Scatter(
                    x=df["sigma"].tolist(),
                    y=df[metric].tolist(),
                    mode="lines+markers",
                    name=f"{name}: {metric}",
                    yaxis="y" if j == 0 else "y2",
                    line={"dash": "solid" if j == 0 else "dot"},
                    customdata=df["dominant_token"].tolist() if "dominant_token" in df else None,
                    hovertemplate=f"{name}<br>sigma %{{x}}<br>{metric} %{{y:.3f}}<br>dominant token %{{customdata}}<extra></extra>",
                )
            )
    layout: dict[str, Any] = {
        "title": "APEX: prediction concentration under activation noise",
        "xaxis": {"title": "sigma", "type": "log"},
        "yaxis": {"title": metrics[0]},
    }
    if len(metrics) > 1:
        layout["yaxis2"] = {"title": ", ".join(metrics[1:]), "overlaying": "y", "side": "right"}
    fig.update_layout(**layout)
    return fig


def token_histogram(result: Any, sigma: float, labels: Any = None, top: int = 15) -> go.Figure:
    """The ``top`` most predicted tokens at noise level ``sigma`` (over draws and samples).

    ``labels``: a callable ``token -> str``, a mapping, or a list indexed by token id.
    """
    tokens, counts = result.histogram(sigma)
    tokens, counts = torch.as_tensor(tokens)[:top], torch.as_tensor(counts)[:top]

    def label(t: int) -> str:
        if labels is None:
            return result.label(t) if hasattr(result, "label") else str(t)
        if callable(labels):
            return str(labels(t))
        return str(labels[t])

    total = float(torch.as_tensor(result.histogram(sigma)[1]).sum())
    fig = go.Figure(
        go.Bar(
            x=[label(int(t)) for t in tokens],
            y=(counts.double() / total).tolist(),
            customdata=counts.tolist(),
            hovertemplate="%{x}: share %{y:.3f} (%{customdata} predictions)<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"predicted tokens at sigma = {sigma:g}", xaxis_title="token", yaxis_title="share"
    )
    return fig


def scores_plot(scores: Mapping[str, Any], level: float = 0.95) -> go.Figure:
    """Per-example values of several :class:`~apexlens.scoring.Scores` (points) with their
    mean and bootstrap confidence interval (error bars)."""
    fig = go.Figure()
    names = list(scores)
    for i, name in enumerate(names):
        s = scores[name]
        vals = s.values.double().tolist()
        fig.add_trace(
            go.Box(
                y=vals,
                name=name,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                fillcolor="rgba(0,0,0,0)",
                line={"color": "rgba(120,120,120,0.5)"},
                marker={"size": 4},
                showlegend=False,
            )
        )
        lo, hi = s.ci(level)
        fig.add_trace(
            go.Scatter(
                x=[name],
                y=[s.mean],
                mode="markers",
                marker={"size": 12, "color": "black", "symbol": "diamond"},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [hi - s.mean],
                    "arrayminus": [s.mean - lo],
                },
                name=f"{name} mean ({int(level * 100)}% CI)",
                showlegend=i == 0,
            )
        )
    fig.update_layout(
        title=f"per-example values, mean and {int(level * 100)}% bootstrap CI", yaxis_title="value"
    )
    return fig
