"""Plotly figures for every apexlens result. Every function returns a ``go.Figure``.

* :func:`head_heatmap` -- layer x head map of a path-patching result (diverging, centred at 0)
* :func:`path_graph` -- a circuit or the strongest paths, nodes laid out by layer
* :func:`apex_curves` -- APEX concentration metrics against the noise level, one line per model
* :func:`token_histogram` -- which tokens the noisy model predicts at one noise level
* :func:`scores_plot` -- per-example values with bootstrap confidence intervals
* :func:`apex_bias_plot`, :func:`escape_distributions`, :func:`escape_destinations` -- APEX's
  bias decision and escape noise (:mod:`apexlens.ui.plotting_apex`)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch

from apexlens.errors import ApexlensError
from apexlens.ui.plotting_apex import apex_bias_plot as apex_bias_plot
from apexlens.ui.plotting_apex import escape_destinations as escape_destinations
from apexlens.ui.plotting_apex import escape_distributions as escape_distributions
from apexlens.vocab import Node, parse_node

_KINDS: dict[str, dict[str, str]] = {
    "path_patch": {
        "name": "path patching",
        "colorbar": "normalised effect<br>-1: the path carries<br>the whole effect<br>0: no effect",
        "raw": "metric - clean",
    },
    "act_patch": {
        "name": "activation patching",
        "colorbar": "fraction restored<br>1: patching restores<br>the whole effect<br>0: nothing restored",
        "raw": "metric - corrupted",
    },
}


def _int_ticks(n: int) -> dict[str, Any]:
    """Axis ticks at the integers ``0 .. n-1`` only (every one up to 32, else a round step)."""
    step = 1 if n <= 32 else next(s for s in (2, 4, 5, 8, 10, 16, 20, 32, 50, 64) if n / s <= 32)
    vals = list(range(0, n, step))
    return {"tickmode": "array", "tickvals": vals, "ticktext": [str(v) for v in vals]}


def head_heatmap(result: Any, normalized: bool = True, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of a patching result over all heads.

    What the colour means follows ``result.kind`` (``"path_patch"`` when absent):

    * path patching -- the normalised effect ``(patched - clean) / (clean - corrupted)``:
      0 = no effect, -1 = the path carries the whole clean-corrupted difference;
    * activation patching -- the fraction restored ``(patched - corrupted) / (clean -
      corrupted)``: 0 = nothing restored, 1 = all of it;

    (or the raw metric minus the baseline with ``normalized=False``), on a diverging scale
    centred at 0. Axes show integer layers and heads only; hovering a cell shows the head's
    name, its raw and its normalised value.
    """
    if result.grid is None:
        raise ApexlensError("head_heatmap needs a result over all heads (senders='all-heads')")
    kind = getattr(result, "kind", "path_patch")
    if kind not in _KINDS:
        raise ApexlensError(
            f"head_heatmap: unknown result kind {kind!r}; known: {', '.join(_KINDS)}"
        )
    labels = _KINDS[kind]
    raw = result.values.detach().double().cpu()
    norm = result.normalized().detach().double().cpu()
    base = result.corrupted.mean if kind == "act_patch" else result.clean.mean
    z = norm if normalized else raw - base
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
            colorbar={"title": {"text": labels["colorbar"] if normalized else labels["raw"]}},
        )
    )
    receivers = ", ".join(result.receivers) if result.receivers else ""
    default_title = f"{labels['name']}: {result.metric_name}, " + (
        f"heads -> {receivers}" if receivers else "every head patched"
    )
    fig.update_layout(
        title=title or default_title,
        xaxis={"title": "head", **_int_ticks(n_heads)},
        yaxis={"title": "layer", "autorange": "reversed", **_int_ticks(n_layers)},
    )
    return fig


_RED, _BLUE = "#b2182b", "#2166ac"
_MLP_ROW = -1.5


def _node_xy(node: Node, n_layers: int, n_heads: int = 1) -> tuple[float, float]:
    middle = (n_heads - 1) / 2  # embed and logits sit level with the middle head
    if node.kind == "embed":
        return -1.0, middle
    if node.kind == "logits":
        return float(n_layers), middle
    if node.kind == "mlp":
        return node.layer + 0.5, _MLP_ROW
    return float(node.layer), float(node.head or 0)


def _rank(node: Node) -> float:
    """Where a node acts in the forward pass: embed, then per layer its heads, then its MLP."""
    if node.kind == "embed":
        return -1.0
    if node.kind == "logits":
        return float("inf")
    return 2.0 * node.layer + (1.0 if node.kind == "mlp" else 0.0)


def _is_path(sender: Node, receiver: Node) -> bool:
    return sender.kind != "logits" and receiver.kind != "embed" and _rank(sender) < _rank(receiver)


def _check_edge(s: str, r: str) -> None:
    sn, rn = parse_node(s), parse_node(r)
    if _is_path(sn, rn):
        return
    if sn.kind == "head" and rn.kind == "head" and sn.layer == rn.layer:
        why = "heads of the same layer do not read each other's outputs"
    elif sn.kind == "logits" or rn.kind == "embed":
        why = "nothing leaves the logits and nothing enters the embedding"
    elif sn.layer == rn.layer and sn.kind == rn.kind:
        why = "a node does not read its own output"
    else:
        why = "it goes backwards through the model"
    raise ApexlensError(f"edge {s} -> {r} is not a path: {why}")


def _sign_legend(fig: go.Figure, weights: Sequence[float], red: str, blue: str) -> None:
    """One legend entry per colour drawn, saying what the sign means."""
    for colour, text, present in (
        (_BLUE, blue, any(x >= 0 for x in weights)),
        (_RED, red, any(x < 0 for x in weights)),
    ):
        if present:
            fig.add_trace(
                go.Scatter(
                    x=[None],
                    y=[None],
                    mode="lines",
                    line={"width": 5, "color": colour},
                    name=text,
                    showlegend=True,
                    hoverinfo="skip",
                )
            )


def path_graph(
    edges: Any,
    weights: Sequence[float] | None = None,
    *,
    n_layers: int | None = None,
    top_k: int = 10,
    title: str | None = None,
) -> go.Figure:
    """A path graph: nodes laid out by layer (embed left, logits right, MLPs in a row below
    the heads), edges as lines whose width shows ``|effect|`` and whose colour its sign (blue
    >= 0, red < 0; the legend says what the sign means).

    ``edges`` is a list of ``(sender, receiver)`` pairs (with ``weights``), a
    :class:`~apexlens.engines.circuits.CircuitResult` (its edges), or a
    :class:`~apexlens.patching.PathPatchResult` (its ``top_k`` strongest senders to its
    receivers -- to its first ``via`` node for a multi-hop result -- weighted by their
    normalised effect; senders with no path there are left out).

    Raises :class:`~apexlens.ApexlensError` for an edge that cannot be a path: between two
    heads of the same layer, or going backwards through the model.
    """
    pairs: list[tuple[str, str]]
    w: list[float]
    red, blue = "red: negative weight", "blue: positive weight"
    if hasattr(edges, "per_example") and hasattr(edges, "senders"):  # PathPatchResult
        norm = edges.normalized().flatten().tolist()
        receivers = edges.receivers or ["logits"]
        via = list(getattr(edges, "via", None) or [])
        ends = [via[0]] if via else receivers
        reachable = [
            i
            for i in range(len(norm))
            if any(_is_path(parse_node(edges.senders[i]), parse_node(r)) for r in ends)
        ]
        order = sorted(reachable, key=lambda i: -abs(norm[i]))[:top_k]
        pairs = [
            (edges.senders[i], r)
            for i in order
            for r in ends
            if _is_path(parse_node(edges.senders[i]), parse_node(r))
        ]
        w = [
            norm[i]
            for i in order
            for r in ends
            if _is_path(parse_node(edges.senders[i]), parse_node(r))
        ]
        target = ", ".join(ends) + (f" (then on to {', '.join(receivers)})" if via else "")
        joint = " (one joint effect per sender)" if len(ends) > 1 else ""
        title = title or f"top {len(order)} paths to {target}{joint}"
        red = "red: negative effect (patching the path lowers the metric: it carries the behaviour)"
        blue = "blue: positive effect (patching the path raises the metric)"
    elif hasattr(edges, "edges") and hasattr(edges, "recovery"):  # CircuitResult
        pairs = list(edges.edges)
        w = [1.0] * len(pairs) if weights is None else list(weights)
        title = title or f"circuit: {len(pairs)} edges, recovery {edges.recovery:.2f}"
        if weights is None:
            blue = "blue: an edge kept in the circuit (every other edge is ablated)"
    else:
        pairs = [(str(s), str(r)) for s, r in edges]
        w = [1.0] * len(pairs) if weights is None else [float(x) for x in weights]
    if len(w) != len(pairs):
        raise ApexlensError(f"{len(pairs)} edges but {len(w)} weights")
    for s, r in pairs:
        _check_edge(s, r)
    nodes: dict[str, Node] = {}
    for s, r in pairs:
        for name in (s, r):
            node = parse_node(name)
            base = str(Node(node.kind, node.layer, node.head))  # channels share the head's dot
            nodes.setdefault(base, Node(node.kind, node.layer, node.head))
    layers = [n.layer for n in nodes.values() if n.kind in ("head", "mlp")]
    n_layers = n_layers if n_layers is not None else (max(layers) + 1 if layers else 1)
    heads = [int(n.head or 0) for n in nodes.values() if n.kind == "head"]
    n_heads = max(heads) + 1 if heads else 1
    pos = {name: _node_xy(n, n_layers, n_heads) for name, n in nodes.items()}
    wmax = max((abs(x) for x in w), default=1.0) or 1.0
    fig = go.Figure()
    for (s, r), weight in zip(pairs, w, strict=True):
        sn, rn = parse_node(s), parse_node(r)
        a = pos[str(Node(sn.kind, sn.layer, sn.head))]
        b = pos[str(Node(rn.kind, rn.layer, rn.head))]
        fig.add_trace(
            go.Scatter(
                x=[a[0], b[0]],
                y=[a[1], b[1]],
                mode="lines",
                line={"width": 1 + 7 * abs(weight) / wmax, "color": _RED if weight < 0 else _BLUE},
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
    _sign_legend(fig, w, red, blue)
    heads = [n.head for n in nodes.values() if n.kind == "head" and n.head is not None]
    yvals: list[float] = list(range(max(heads, default=0) + 1))
    ytext = [str(int(v)) for v in yvals]
    if any(n.kind == "mlp" for n in nodes.values()):
        yvals, ytext = [_MLP_ROW, *yvals], ["MLP", *ytext]
    fig.update_layout(
        title=title or "path graph",
        xaxis={
            "title": "layer",
            "tickmode": "array",
            "tickvals": list(range(-1, n_layers + 1)),
            "ticktext": ["embed", *map(str, range(n_layers)), "logits"],
        },
        yaxis={
            "title": "head",
            "zeroline": False,
            "tickmode": "array",
            "tickvals": yvals,
            "ticktext": ytext,
        },
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.2, "yanchor": "top"},
        margin={"b": 110},
    )
    return fig


def apex_curves(
    results: Mapping[str, Any], metrics: Sequence[str] = ("top1_share", "entropy")
) -> go.Figure:
    """APEX concentration metrics against the noise level sigma (log axis, ticks at the swept
    sigmas), one line per model and metric: the first metric solid on the left axis, the
    others dotted on the right axis; the legend sits below the plot."""
    if not results:
        raise ApexlensError("apex_curves needs at least one result")
    fig = go.Figure()
    palette = ["#2166ac", "#b2182b", "#1b7837", "#762a83", "#e08214", "#35978f"]
    colour = {name: palette[i % len(palette)] for i, name in enumerate(results)}
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
                    line={"dash": "solid" if j == 0 else "dot", "color": colour[name]},
                    marker={"color": colour[name]},
                    customdata=df["dominant_token"].tolist() if "dominant_token" in df else None,
                    hovertemplate=f"{name}<br>sigma %{{x}}<br>{metric} %{{y:.3f}}<br>dominant token %{{customdata}}<extra></extra>",
                )
            )
    sigmas = sorted({float(x) for res in results.values() for x in res.summary()["sigma"]})
    ticks = [x for x in sigmas if x > 0]  # a log axis cannot show sigma = 0
    layout: dict[str, Any] = {
        "title": "APEX: prediction concentration under activation noise",
        "xaxis": {
            "title": "sigma (noise level, log scale)",
            "type": "log",
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": [f"{x:g}" for x in ticks],
        },
        "yaxis": {"title": metrics[0]},
        # below the plot: a legend on the right would cover the second axis' ticks
        "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": -0.25, "yanchor": "top"},
        "margin": {"b": 130},
        "height": 520,
    }
    if len(metrics) > 1:
        layout["yaxis2"] = {
            "title": ", ".join(metrics[1:]) + " (dotted)",
            "overlaying": "y",
            "side": "right",
        }
        layout["yaxis"]["title"] = f"{metrics[0]} (solid)"
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
                name=f"mean ({int(level * 100)}% CI)",
                showlegend=i == 0,
            )
        )
    fig.update_layout(
        title=f"per-example values, mean and {int(level * 100)}% bootstrap CI", yaxis_title="value"
    )
    return fig
