"""Plotly figures of the workbench (also written into the HTML snapshot).

* :func:`spread_figure` -- per-example metric under the hypothesis, between the fully
  ablated and the clean value of each example;
* :func:`heads_to_logits` -- every head's path to the logits (``apexlens.plotting.head_heatmap``);
* :func:`heads_to_qkv` -- every earlier head's path to one head's q, k and v;
* :func:`drill_figure` -- one path's effect on every example;
* :func:`circuit_figure` -- the hypothesis as ``apexlens.plotting.path_graph`` (the snapshot);
* :func:`snapshot` -- the self-contained HTML file of a session;
* :func:`figures_html` -- the view's figures in one HTML file (the page's "figures" export).
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import apexlens
from apexlens.ui import plotting
from apexlens.ui.workbench import engine

if TYPE_CHECKING:
    from apexlens.ui.workbench.session import Entry, Session

BLUE, RED, GREY, GREEN = "#2166ac", "#b2182b", "#9a9a9a", "#1b7837"
_FONT = {"family": "system-ui, sans-serif", "size": 12}


def _compact(fig: go.Figure, height: int, **layout: Any) -> go.Figure:
    layout.setdefault("margin", {"l": 50, "r": 20, "t": 40, "b": 40})
    fig.update_layout(
        height=height,
        font=_FONT,
        plot_bgcolor="white",
        **layout,
    )
    return fig


def spread_dict(entry: Entry, labels: list[str] | None = None) -> dict[str, Any]:
    """Per example: the metric fully ablated (grey), under the hypothesis (blue) and clean
    (green); a band joins ablated and clean. A plain plotly dict (``dcc.Graph`` takes it as
    is: no figure validation on the toggle path)."""
    n = len(entry.per_example)
    xs = list(range(n))
    lx: list[float | None] = []
    ly: list[float | None] = []
    for i in xs:
        lx += [i, i, None]
        ly += [entry.ablated_per_example[i], entry.clean_per_example[i], None]
    text = labels or [f"example {i}" for i in xs]
    traces: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "x": lx,
            "y": ly,
            "mode": "lines",
            "line": {"color": "#ddd", "width": 6},
            "hoverinfo": "skip",
            "showlegend": False,
        }
    ]
    for name, ys, colour, symbol in (
        ("ablated", entry.ablated_per_example, GREY, "line-ew-open"),
        ("clean", entry.clean_per_example, GREEN, "line-ew-open"),
        ("hypothesis", entry.per_example, BLUE, "circle"),
    ):
        traces.append(
            {
                "type": "scatter",
                "x": xs,
                "y": list(ys),
                "mode": "markers",
                "name": name,
                "text": text,
                "marker": {
                    "color": colour,
                    "size": 9 if name == "hypothesis" else 14,
                    "symbol": symbol,
                    "line": {"width": 2, "color": colour},
                },
                "hovertemplate": f"%{{text}}<br>{name}: %{{y:.4g}}<extra></extra>",
            }
        )
    layout = {
        "height": 230,
        "font": _FONT,
        "plot_bgcolor": "white",
        "margin": {"l": 50, "r": 10, "t": 28, "b": 40},
        "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0, "xanchor": "left"},
        "xaxis": {
            "title": {"text": "example"},
            "showgrid": False,
            "zeroline": False,
            **({"dtick": 1} if n <= 20 else {}),
        },
        "yaxis": {"title": {"text": "metric"}, "gridcolor": "#eee", "zerolinecolor": "#bbb"},
    }
    return {"data": traces, "layout": layout}


def spread_figure(entry: Entry, labels: list[str] | None = None) -> go.Figure:
    """:func:`spread_dict` as a ``go.Figure``."""
    return go.Figure(spread_dict(entry, labels))


def heads_to_logits(
    result: Any, title: str = "heads → logits (click a head: its q/k/v inputs)"
) -> go.Figure:
    fig = plotting.head_heatmap(result, title=title)
    # a short colour-bar title: the long one leaves no room for the bar in a compact figure
    fig.update_traces(colorbar={"title": {"text": "normalised<br>effect"}})
    layers, heads = result.grid
    return _compact(fig, max(220, 60 + 34 * layers), xaxis={"title": "head", "constrain": "domain"})


def heads_to_qkv(session: Session, head: str) -> go.Figure:
    """Every earlier head's path to ``head``'s q, k and v (normalised effect, as
    ``head_heatmap``); a cell's ``customdata`` is ``[sender, receiver, metric, normalised]``."""
    node = apexlens.parse_node(head)
    layer = node.layer
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=[f"→ {head}.{c}" for c in "qkv"], horizontal_spacing=0.06
    )
    for col, c in enumerate("qkv", start=1):
        res = session.path_contributions(f"{head}.{c}")
        norm = res.normalized().detach().double().cpu()
        raw = res.values.detach().double().cpu()
        z, custom = [], []
        for la in range(max(layer, 1)):
            zr, cr = [], []
            for h in range(session.names.n_heads):
                ok = la < layer
                zr.append(float(norm[la, h]) if ok else None)
                cr.append([f"{la}.{h}", f"{head}.{c}", float(raw[la, h]), float(norm[la, h])])
            z.append(zr)
            custom.append(cr)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(session.names.n_heads)),
                y=list(range(len(z))),
                customdata=custom,
                zmid=0,
                colorscale="RdBu",
                showscale=col == 3,
                colorbar={"title": {"text": "normalised"}},
                hovertemplate="%{customdata[0]} → %{customdata[1]}<br>metric %{customdata[2]:.4g}<br>normalised %{customdata[3]:.3f}<br>click: add this edge<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=col)
        fig.update_yaxes(
            autorange="reversed", dtick=1, title_text="layer" if col == 1 else None, row=1, col=col
        )
    if layer == 0:
        fig.add_annotation(
            text=f"{head} is in layer 0: no head sends to it",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
    fig.update_annotations(font={"size": 12}, yshift=4)
    return _compact(
        fig,
        max(220, 120 + 34 * max(layer, 1)),
        margin={"l": 50, "r": 20, "t": 70, "b": 40},
        title={
            "text": f"heads → {head}.q / .k / .v (click a cell to add that edge)",
            "font": {"size": 13},
            "y": 0.98,
            "yanchor": "top",
        },
    )


def drill_figure(session: Session, result: Any, sender: str, receiver: str) -> go.Figure:
    """One path's effect per example: patched minus clean (bars) against corrupted minus
    clean (the whole effect, open markers)."""
    i = result.senders.index(sender)
    patched = result.per_example[i].double().cpu()
    clean = result.clean.values.double().cpu()
    corrupted = result.corrupted.values.double().cpu()
    n = len(patched)
    prompts = []
    for k in range(n):
        toks = session.token_labels(k)
        prompts.append(html.escape(" ".join(toks[-8:])))
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=list(range(n)),
            y=(patched - clean).tolist(),
            name="path patched − clean",
            marker_color=[RED if v < 0 else BLUE for v in (patched - clean).tolist()],
            customdata=prompts,
            hovertemplate="example %{x}: %{y:.4g}<br>…%{customdata}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=list(range(n)),
            y=(corrupted - clean).tolist(),
            mode="markers",
            name="corrupted − clean (whole effect)",
            marker={"symbol": "line-ew-open", "size": 16, "color": GREY, "line": {"width": 2}},
            hovertemplate="example %{x}: whole effect %{y:.4g}<extra></extra>",
        )
    )
    fig.update_xaxes(title="example", dtick=1 if n <= 20 else None)
    fig.update_yaxes(title="metric change", gridcolor="#eee", zerolinecolor="#888")
    return _compact(
        fig,
        240,
        title={
            "text": f"per example: {sender} → {receiver}",
            "font": {"size": 13},
            "y": 0.98,
            "yanchor": "top",
        },
        margin={"l": 50, "r": 20, "t": 64, "b": 40},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
        bargap=0.3,
    )


def circuit_figure(session: Session, weights: dict[str, float] | None, cap: int = 300) -> go.Figure:
    """The hypothesis as a path graph (the ``cap`` heaviest edges when weighed)."""
    edges = session.sorted(session.edges)
    if weights:
        edges = sorted(edges, key=lambda e: -abs(weights.get(e, 0.0)))
    shown = edges[:cap]
    pairs = [(e.split("->", 1)[0], e.split("->", 1)[1]) for e in shown]  # aligned with w
    w = [weights.get(e, 0.0) for e in shown] if weights else None
    title = f"hypothesis: {len(edges)} edges, recovery {session.current.recovery:.3f}" + (
        f" (the {cap} heaviest shown)" if len(edges) > cap else ""
    )
    if not pairs:
        fig = go.Figure()
        fig.update_layout(title="hypothesis: no edges")
        return fig
    return plotting.path_graph(pairs, w, n_layers=session.names.n_layers, title=title)


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.6f}"


def snapshot(session: Session) -> str:
    """Every result of the session in one self-contained HTML file."""
    cur = session.current
    weights = session.weights_cached()
    summary = pd.DataFrame(
        [
            {
                "n_edges": cur.n_edges,
                "metric": cur.metric,
                "clean": cur.clean,
                "ablated": cur.ablated,
                "recovery": cur.recovery,
                "proportion_explained": cur.explained,
                "ablation": session.ablation,
            }
        ]
    )
    definitions = {
        "id": "the hypothesis' number in the session's history (in the order first evaluated)",
        "label": "how the hypothesis was made (+/- an edge, a node, a starting point, a file)",
        "sender": "the edge's sender: 'embed', a head 'L.H' or an MLP 'mL'",
        "receiver": "the edge's receiver: a head's input 'L.H.q/k/v', an MLP 'mL' or 'logits'",
        "weight": "recovery(hypothesis) - recovery(hypothesis without this edge): the exact "
        "effect of removing the edge; positive = the edge helps",
    }
    sections: list[tuple[Any, ...]] = [
        (
            "current hypothesis",
            summary,
            f"The hypothesis evaluated exactly by Experiment.evaluate_circuit on {session.exp.batch} "
            f"examples: every edge outside it is ablated ({session.ablation}). Recovery "
            f"{_fmt(cur.recovery)}, proportion explained {_fmt(cur.explained)}.",
        ),
        (
            "circuit",
            circuit_figure(session, weights),
            "The hypothesis' edges, nodes laid out by layer (embed left, logits right, MLPs in a "
            "row below the heads). "
            + (
                "Line width = |weight|, the exact change of recovery when that one edge is "
                "removed; blue = removing it lowers recovery (the edge helps), red = it raises it."
                if weights
                else "Edge weights were not computed for this hypothesis, so every line has the same width."
            ),
        ),
        (
            "per-example metric",
            spread_figure(cur),
            "For every example: the metric with every edge ablated (grey), under the hypothesis "
            "(blue dot) and clean (green). A dot near green = the hypothesis keeps that example's "
            f"behaviour. Mean {cur.metric:.4g} ± {cur.sem:.2g} (sem).",
        ),
    ]
    if weights:
        rows = [
            {"sender": s, "receiver": r, "weight": weights[e]}
            for e in sorted(weights, key=lambda e: -abs(weights[e]))
            for s, r in [e.split("->", 1)]
        ]
        sections.append(
            (
                "edge weights",
                pd.DataFrame(rows),
                "One row per edge of the hypothesis, heaviest first.",
            )
        )
    history = pd.DataFrame(
        [
            {
                "id": e.id,
                "label": e.label,
                "n_edges": e.n_edges,
                "recovery": e.recovery,
                "proportion_explained": e.explained,
            }
            for e in session.history
        ]
    )
    sections.append(("history", history, "Every hypothesis evaluated in this session, in order."))
    paths = session.computed_paths("logits")
    if paths is not None:
        sections.append(
            (
                "heads → logits",
                heads_to_logits(paths, title="heads → logits"),
                "Each cell is one head, its direct path to the logits patched from the corrupted run "
                "(MLPs on the way recomputed). Normalised effect (patched - clean) / (clean - corrupted): "
                "-1 = the path carries the whole difference, 0 = no effect.",
            )
        )
    sections.append(
        (
            "circuit JSON",
            session.to_json(),
            "The hypothesis in apexlens' circuit format (Circuit.save).",
        )
    )
    intro = (
        f"{session.title}: {session.exp.batch} examples of {session.exp.n_pos} tokens, metric "
        f"{getattr(engine.experiment_metric(session.exp), 'name', 'metric')}, {session.ablation} ablation, "
        f"{len(session.universe)} edges in the full graph."
    )
    name = "" if session.title == "apexlens workbench" else f": {session.title}"
    return engine.report_html(
        sections, title=f"apexlens workbench snapshot{name}", intro=intro, definitions=definitions
    )


def figures_html(session: Session) -> str:
    """The view's figures (circuit graph, per-example spread, path contributions computed
    so far) in one self-contained HTML file."""
    with session.lock:
        figs = [circuit_figure(session, session.weights_cached()), spread_figure(session.current)]
        paths = session.computed_paths("logits")
        if paths is not None:
            figs.append(heads_to_logits(paths, title="heads → logits"))
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            "<title>apexlens workbench figures</title></head><body>"
        ]
        parts += [f.to_html(full_html=False, include_plotlyjs=i == 0) for i, f in enumerate(figs)]
        parts.append("</body></html>")
        return "\n".join(parts)
