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
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.ui.plotting_apex import apex_bias_plot as apex_bias_plot
from apexlens.ui.plotting_apex import escape_destinations as escape_destinations
from apexlens.ui.plotting_apex import escape_distributions as escape_distributions
from apexlens.ui.plotting_graph import Edges, draw, is_path
from apexlens.vocab import parse_node

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


def path_graph(
    edges: Any,
    weights: Sequence[float] | None = None,
    *,
    n_layers: int | None = None,
    top_k: int = 10,
    title: str | None = None,
) -> go.Figure:
    """A path graph (:mod:`apexlens.ui.plotting_graph`): nodes as boxes laid out by layer
    (embed left, logits right, MLPs in a row below the heads), a head's q / k / v inputs as
    three ports on its left edge, every edge its own line whose width shows ``|weight|`` and
    whose colour its sign (blue >= 0, red < 0; the legend says what both mean); hovering
    anywhere on a line names the edge and its weight.

    ``edges`` is a list of ``(sender, receiver)`` pairs (with ``weights``), a
    :class:`~apexlens.CircuitResult` (its edges), or a :class:`~apexlens.PathPatchResult`:
    its ``top_k`` strongest senders to its receivers (to its first ``via`` node for a
    multi-hop result; senders with no path there are left out), weighted by their
    normalised effect. A sender patched into several receivers at once has one *joint*
    effect, not one per receiver: it is written on the sender's box (and coloured there),
    and its lines to the receivers are drawn grey, carrying no number.

    Raises :class:`~apexlens.ApexlensError` for an edge that cannot be a path: between two
    heads of the same layer, or going backwards through the model.
    """
    if hasattr(edges, "per_example") and hasattr(edges, "senders"):  # PathPatchResult
        spec = _patch_edges(edges, top_k, title)
    elif hasattr(edges, "edges") and hasattr(edges, "recovery"):  # CircuitResult
        pairs = [(str(s), str(r)) for s, r in edges.edges]
        spec = Edges(
            pairs,
            [1.0] * len(pairs) if weights is None else [float(x) for x in weights],
            title or f"circuit: {len(pairs)} edges, {edges.ablation} ablation of every other "
            f"edge, recovery {edges.recovery:.2f}",
            weighted=weights is not None,
        )
        if weights is None:
            spec.blue = "an edge kept in the circuit (every edge not drawn is ablated)"
    else:
        pairs = [(str(s), str(r)) for s, r in edges]
        w = [1.0] * len(pairs) if weights is None else [float(x) for x in weights]
        spec = Edges(pairs, w, title or "path graph", weighted=weights is not None)
    if len(spec.weights) != len(spec.pairs):
        raise ApexlensError(f"{len(spec.pairs)} edges but {len(spec.weights)} weights")
    return draw(spec, n_layers)


def _patch_edges(result: Any, top_k: int, title: str | None) -> Edges:
    """The strongest senders of a path-patching result, as edges to draw."""
    norm = result.normalized().flatten().tolist()
    receivers = list(result.receivers or ["logits"])
    via = list(getattr(result, "via", None) or [])
    ends = [via[0]] if via else receivers
    reach = {
        i: [r for r in ends if is_path(parse_node(result.senders[i]), parse_node(r))]
        for i in range(len(norm))
    }
    order = sorted((i for i in reach if reach[i]), key=lambda i: -abs(norm[i]))[:top_k]
    pairs = [(result.senders[i], r) for i in order for r in reach[i]]
    target = ", ".join(ends) + (f" (then on to {', '.join(receivers)})" if via else "")
    spec = Edges(
        pairs,
        [norm[i] for i in order for _ in reach[i]],
        title or f"top {len(order)} paths to {target}",
        red="negative effect (patching the path lowers the metric: it carries the behaviour)",
        blue="positive effect (patching the path raises the metric)",
        what="normalised effect",
    )
    if len(ends) > 1:
        spec.joint = {result.senders[i]: norm[i] for i in order}
        spec.title = title or (
            f"top {len(order)} senders, each patched into {target} at once: one joint "
            "effect per sender (on its box)"
        )
    return spec


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
            # round ticks of its own ("sync", plotly's default for an overlaying axis, puts
            # them level with the left axis' gridlines: 2.066, 2.7536...)
            "tickmode": "auto",
            "nticks": 6,
            "showgrid": False,
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


def scores_plot(scores: Any, level: float = 0.95) -> go.Figure:
    """Per-example values of several :class:`~apexlens.scoring.Scores` (points) with their
    mean and bootstrap confidence interval (error bars).

    ``scores``: a mapping name -> :class:`~apexlens.scoring.Scores` (or per-example
    tensor), one :class:`~apexlens.scoring.Scores`, or a result: a
    :class:`~apexlens.CircuitResult` shows clean, circuit and ablated; a
    :class:`~apexlens.DiscoveryResult` its circuit's; a path-patching result clean and
    corrupted."""
    scores = _as_scores(scores)
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


def _as_scores(obj: Any) -> dict[str, Any]:
    """What :func:`scores_plot` draws, by name (see its docstring)."""
    from apexlens.results import CircuitResult, DiscoveryResult
    from apexlens.scoring import Scores

    if isinstance(obj, DiscoveryResult):
        obj = obj.evaluation
    if isinstance(obj, CircuitResult):
        return {"clean": obj.clean, "circuit": obj.scores, f"ablated ({obj.ablation})": obj.corrupted}
    if isinstance(obj, Scores):
        return {"values": obj}
    if hasattr(obj, "per_example") and isinstance(getattr(obj, "clean", None), Scores):
        return {"clean": obj.clean, "corrupted": obj.corrupted}
    if not isinstance(obj, Mapping):
        raise ApexlensError(
            f"scores_plot takes a mapping name -> Scores, a Scores, or a CircuitResult / "
            f"DiscoveryResult / PathPatchResult; got {type(obj).__name__}"
        )
    out = {}
    for name, v in obj.items():
        if isinstance(v, Tensor):
            v = Scores(v)
        if not isinstance(v, Scores):
            raise ApexlensError(
                f"scores_plot: {name!r} is a {type(v).__name__}; give apexlens.Scores or a "
                "per-example tensor"
            )
        out[str(name)] = v
    if not out:
        raise ApexlensError("scores_plot needs at least one set of scores")
    return out
