"""The path graph: a circuit or the strongest paths drawn as the hypothesis they state.

Nodes are boxes laid out by layer (embed left, logits right, heads by index, MLPs in a row
below). A head's query, key and value inputs are three **ports** on its left edge (``q``
top, ``k`` middle, ``v`` bottom): ``embed -> 1.3.q`` and ``embed -> 1.3.v`` are two lines
into two ports, never one line into ``1.3``. Every edge is its own line, leaving its
sender's right edge and ending at its receiver's port; width shows ``|weight|`` and colour
its sign, both explained in the legend; lines are opaque, so crossings do not darken into
something that reads as a stronger edge. Hovering anywhere along a line names the edge and
its weight (each line carries points every few pixels). Boxes are drawn over the lines, so
a long edge passes behind a box instead of over its label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from apexlens.errors import ApexlensError
from apexlens.vocab import Node, parse_node

RED, BLUE, GREY = "#b2182b", "#2166ac", "#8c8c8c"
MLP_ROW = -1.5
HALF_W, HALF_H = 0.2, 0.38  # a box's half width (layers are 1 apart) and half height
PORTS = {"q": 0.24, "k": 0.0, "v": -0.24}
"""A head's input ports: offset from the box's centre."""


def _rank(node: Node) -> float:
    """Where a node acts in the forward pass: embed, then per layer its heads, then its MLP."""
    if node.kind in ("embed", "tok_embed", "pos_embed"):
        return -1.0
    if node.kind == "logits":
        return float("inf")
    return 2.0 * node.layer + (1.0 if node.kind == "mlp" else 0.0)


def is_path(sender: Node, receiver: Node) -> bool:
    return (
        sender.kind != "logits"
        and receiver.kind not in ("embed", "tok_embed", "pos_embed")
        and _rank(sender) < _rank(receiver)
    )


def check_edge(s: str, r: str) -> tuple[Node, Node]:
    """Both ends parsed; one clear error for an edge that cannot be a path."""
    sn, rn = parse_node(s), parse_node(r)
    if is_path(sn, rn):
        return sn, rn
    if sn.kind == "head" and rn.kind == "head" and sn.layer == rn.layer:
        why = "heads of the same layer do not read each other's outputs"
    elif sn.kind == "logits" or rn.kind in ("embed", "tok_embed", "pos_embed"):
        why = "nothing leaves the logits and nothing enters the embedding"
    elif sn.layer == rn.layer and sn.kind == rn.kind:
        why = "a node does not read its own output"
    else:
        why = "it goes backwards through the model"
    raise ApexlensError(f"edge {s} -> {r} is not a path: {why}")


def _box(node: Node) -> str:
    """The box a node is drawn in: its name without channel and positions."""
    return str(Node(node.kind, node.layer, node.head))


@dataclass
class Layout:
    """Box centres, by box name."""

    centre: dict[str, tuple[float, float]]
    n_layers: int
    n_heads: int

    @classmethod
    def of(cls, nodes: Sequence[Node], n_layers: int | None) -> Layout:
        layers = [n.layer for n in nodes if n.kind in ("head", "mlp")]
        n_layers = n_layers if n_layers is not None else (max(layers) + 1 if layers else 1)
        heads = [int(n.head or 0) for n in nodes if n.kind == "head"]
        n_heads = max(heads) + 1 if heads else 1
        middle = (n_heads - 1) / 2
        embed_y = {"embed": middle, "tok_embed": middle + 0.5, "pos_embed": middle - 0.5}
        centre: dict[str, tuple[float, float]] = {}
        for n in nodes:
            if n.kind in embed_y:
                xy = (-1.0, embed_y[n.kind])
            elif n.kind == "logits":
                xy = (float(n_layers), middle)
            elif n.kind == "mlp":
                xy = (n.layer + 0.5, MLP_ROW)
            else:
                xy = (float(n.layer), float(n.head or 0))
            centre[_box(n)] = xy
        return cls(centre, n_layers, n_heads)

    def out_port(self, node: Node) -> tuple[float, float]:
        x, y = self.centre[_box(node)]
        return x + HALF_W, y

    def in_port(self, node: Node) -> tuple[float, float]:
        x, y = self.centre[_box(node)]
        return x - HALF_W, y + PORTS.get(node.channel or "k", 0.0)


def _curve(a: tuple[float, float], b: tuple[float, float]) -> tuple[list[float], list[float]]:
    """Points along a cubic Bezier a -> b that leaves and arrives horizontally, about every
    0.04 units (hover finds the line anywhere)."""
    d = 0.45 * (b[0] - a[0])
    ctrl = [a, (a[0] + d, a[1]), (b[0] - d, b[1]), b]
    n = max(8, int(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5 / 0.04) + 1)
    xs, ys = [], []
    for i in range(n):
        t = i / (n - 1)
        w = ((1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3)
        xs.append(sum(wi * c[0] for wi, c in zip(w, ctrl, strict=True)))
        ys.append(sum(wi * c[1] for wi, c in zip(w, ctrl, strict=True)))
    return xs, ys


def _spread(n: int) -> list[float]:
    """``n`` offsets within a box edge, top first (0 for one)."""
    return [0.0] if n == 1 else [0.28 - 0.56 * k / (n - 1) for k in range(n)]


def _gaps(
    a: tuple[float, float], b: tuple[float, float], boxes: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Waypoints (a box column, the gap above or below the box) that keep the line a -> b
    from passing behind a box it does not enter: it would look as if it went in and came
    out again."""
    points = [a, b]
    for _ in range(len(boxes)):
        xs, ys = _chain(points)
        hit = next(
            (
                (bx, by, y)
                for bx, by in boxes
                if a[0] < bx - HALF_W and bx + HALF_W < b[0]
                for x, y in zip(xs, ys, strict=True)
                if abs(x - bx) <= HALF_W + 0.03 and abs(y - by) <= HALF_H + 0.04
            ),
            None,
        )
        if hit is None:
            break
        bx, by, y = hit
        points = sorted([*points, (bx, by + (0.5 if y >= by else -0.5))])
    return points[1:-1]


def _routes(lay: Layout, parsed: Sequence[tuple[Node, Node]]) -> list[tuple[list[float], list[float]]]:
    """Every edge's line: it leaves its own point on the sender's right edge (a sender's
    lines spread over the edge, top target on top), passes gaps between boxes on its own
    lane, and ends at the receiver's port (spread over the edge for logits and MLPs)."""
    ends = [lay.in_port(r) for _, r in parsed]
    starts = [lay.out_port(s) for s, _ in parsed]
    for box in {_box(s) for s, _ in parsed}:
        mine = sorted((i for i, (s, _) in enumerate(parsed) if _box(s) == box),
                      key=lambda i: (-ends[i][1], i))
        for i, dy in zip(mine, _spread(len(mine)), strict=True):
            starts[i] = (starts[i][0], starts[i][1] + dy)
    for box in {_box(r) for _, r in parsed if r.channel not in PORTS}:
        mine = sorted((i for i, (_, r) in enumerate(parsed) if _box(r) == box),
                      key=lambda i: (-starts[i][1], i))
        for i, dy in zip(mine, _spread(len(mine)), strict=True):
            ends[i] = (ends[i][0], ends[i][1] + dy)
    boxes = list(lay.centre.values())
    via = [_gaps(a, b, boxes) for a, b in zip(starts, ends, strict=True)]
    lanes: dict[tuple[float, float], list[int]] = {}
    for i, points in enumerate(via):
        for wp in points:
            lanes.setdefault(wp, []).append(i)
    moved: dict[tuple[int, tuple[float, float]], float] = {}
    for wp, members in lanes.items():
        members.sort(key=lambda i: (-ends[i][1], -starts[i][1], i))
        for i, dy in zip(members, _spread(len(members)), strict=True):
            moved[(i, wp)] = wp[1] + dy * 0.3
    return [
        _chain([starts[i], *[(wp[0], moved[(i, wp)]) for wp in via[i]], ends[i]])
        for i in range(len(parsed))
    ]


def _chain(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for p, q in zip(points, points[1:], strict=False):
        x, y = _curve(p, q)
        xs += x if not xs else x[1:]
        ys += y if not ys else y[1:]
    return xs, ys


@dataclass
class Edges:
    """What to draw: edges with a weight each, or (``joint``) each sender's joint effect on
    all receivers at once, which no single line carries."""

    pairs: list[tuple[str, str]]
    weights: list[float]
    title: str
    red: str = "negative weight"
    blue: str = "positive weight"
    what: str = "weight"
    joint: dict[str, float] | None = None
    weighted: bool = True


def draw(edges: Edges, n_layers: int | None) -> go.Figure:
    """The figure for ``edges`` (module docstring)."""
    parsed = [check_edge(s, r) for s, r in edges.pairs]
    nodes = [n for pair in parsed for n in pair]
    if edges.joint:
        nodes += [parse_node(s) for s in edges.joint]
    lay = Layout.of(nodes, n_layers)
    fig = go.Figure()
    wmax = max((abs(w) for w in edges.weights), default=1.0) or 1.0
    routes = _routes(lay, parsed)
    order = sorted(range(len(parsed)), key=lambda i: abs(edges.weights[i]))
    for i in order:  # the strongest drawn last, on top
        _edge_trace(fig, routes[i], edges, edges.pairs[i], edges.weights[i], wmax)
    _boxes(fig, lay, nodes, edges.joint)
    _legend(fig, edges, wmax)
    _axes(fig, lay, edges.title, any(n.kind == "mlp" for n in nodes))
    return fig


def _edge_trace(
    fig: go.Figure,
    route: tuple[list[float], list[float]],
    edges: Edges,
    names: tuple[str, str],
    weight: float,
    wmax: float,
) -> None:
    x, y = route
    if edges.joint is not None:
        others = [r for s, r in edges.pairs if s == names[0] and r != names[1]]
        text = (
            f"{names[0]} -> {names[1]}: patched together with "
            f"{', '.join(others) or 'no other receiver'}; the joint effect "
            f"{edges.joint[names[0]]:+.3g} is the sender's (on its box), not this line's"
        )
        line = {"width": 1.5, "color": GREY}
    else:
        text = f"{names[0]} -> {names[1]}: {edges.what} {weight:+.4g}"
        width = 1.5 + 6.5 * abs(weight) / wmax if edges.weighted else 2.5
        line = {"width": width, "color": RED if weight < 0 else BLUE}
    fig.add_trace(
        go.Scatter(
            x=x, y=y, mode="lines", line=line, hovertemplate=text + "<extra></extra>",
            name=f"{names[0]} -> {names[1]}", showlegend=False,
        )
    )


def _boxes(
    fig: go.Figure, lay: Layout, nodes: Sequence[Node], joint: dict[str, float] | None
) -> None:
    """Boxes over the lines, their names, the ports in use, and each sender's joint effect."""
    ports: dict[str, set[str]] = {}
    for n in nodes:
        if n.kind == "head" and n.channel in PORTS:
            ports.setdefault(_box(n), set()).add(str(n.channel))
    jmax = max((abs(v) for v in (joint or {}).values()), default=1.0) or 1.0
    for name, (x, y) in lay.centre.items():
        fill = "white"
        if joint and name in joint:
            fill = _shade(joint[name] / jmax)
        fig.add_shape(
            type="rect", x0=x - HALF_W, x1=x + HALF_W, y0=y - HALF_H, y1=y + HALF_H,
            line={"color": "#444", "width": 1}, fillcolor=fill, layer="above",
        )
        label = name if not (joint and name in joint) else f"{name}<br>{joint[name]:+.2f}"
        fig.add_annotation(
            x=x + HALF_W - 0.03, y=y, text=f"<b>{label}</b>", showarrow=False,
            xanchor="right", font={"size": 12},
        )
        for ch in sorted(ports.get(name, ())):  # a used input: a dot and its full name
            fig.add_annotation(
                x=x - HALF_W, y=y + PORTS[ch], text="\u25cf", showarrow=False,
                font={"size": 11, "color": "#222"},
            )
            fig.add_annotation(
                x=x - HALF_W + 0.04, y=y + PORTS[ch], text=f"{name}.{ch}", showarrow=False,
                xanchor="left", font={"size": 10, "color": "#333"},
            )
    fig.add_trace(  # hover on a box: its name and inputs
        go.Scatter(
            x=[c[0] for c in lay.centre.values()], y=[c[1] for c in lay.centre.values()],
            mode="markers", marker={"size": 30, "opacity": 0}, showlegend=False,
            text=[_node_hover(n, ports, joint) for n in lay.centre],
            hovertemplate="%{text}<extra></extra>",
        )
    )


def _node_hover(name: str, ports: dict[str, set[str]], joint: dict[str, float] | None) -> str:
    used = sorted(ports.get(name, ()))
    text = name + (f"<br>inputs drawn: {', '.join(f'{name}.{c}' for c in used)}" if used else "")
    if joint and name in joint:
        text += f"<br>joint effect {joint[name]:+.4g}"
    return text


def _shade(v: float) -> str:
    """White -> blue (v > 0) or red (v < 0), by |v| in [0, 1]."""
    r, g, b = (33, 102, 172) if v >= 0 else (178, 24, 43)
    a = min(1.0, abs(v)) * 0.6
    return f"rgb({int(255 + (r - 255) * a)},{int(255 + (g - 255) * a)},{int(255 + (b - 255) * a)})"


def _legend(fig: go.Figure, edges: Edges, wmax: float) -> None:
    """Legend entries saying what colour and width mean."""
    entries: list[tuple[str, dict[str, Any]]] = []
    if edges.joint is not None:
        entries.append(("grey line: a path patched (all of a sender's lines at once)",
                        {"width": 1.5, "color": GREY}))
        entries.append(("box colour: the sender's joint effect (red < 0 carries the behaviour)",
                        {"width": 8, "color": _shade(-1.0)}))
    else:
        if any(w < 0 for w in edges.weights):
            entries.append((f"red: {edges.red}", {"width": 4, "color": RED}))
        if any(w >= 0 for w in edges.weights):
            entries.append((f"blue: {edges.blue}", {"width": 4, "color": BLUE}))
        if edges.weighted and len({abs(w) for w in edges.weights}) > 1:
            for frac in (1.0, 0.25):
                entries.append((f"width: |{edges.what}| = {wmax * frac:.3g}",
                                {"width": 1.5 + 6.5 * frac, "color": "#555"}))
    for text, line in entries:
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="lines", line=line, name=text,
                       showlegend=True, hoverinfo="skip")
        )


def _axes(fig: go.Figure, lay: Layout, title: str, mlp: bool) -> None:
    yvals: list[float] = list(range(lay.n_heads))
    ytext = [str(v) for v in range(lay.n_heads)]
    if mlp:
        yvals, ytext = [MLP_ROW, *yvals], ["MLP", *ytext]
    fig.update_layout(
        title=title,
        xaxis={
            "title": "layer", "tickmode": "array", "zeroline": False, "showgrid": False,
            "tickvals": list(range(-1, lay.n_layers + 1)),
            "ticktext": ["embed", *map(str, range(lay.n_layers)), "logits"],
            "range": [-1.5, lay.n_layers + 0.5],
        },
        yaxis={
            "title": "head", "zeroline": False, "showgrid": False, "tickmode": "array",
            "tickvals": yvals, "ticktext": ytext,
            "range": [min(yvals) - 0.6, max(yvals) + 0.6],
        },
        plot_bgcolor="#f7f7f7",
        height=max(420, 110 * (len(yvals)) + 200),
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.12, "yanchor": "top"},
        margin={"b": 120},
        hoverdistance=12,
    )
