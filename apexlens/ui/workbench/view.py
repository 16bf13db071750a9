"""The circuit view: nodes laid out by layer, one clickable element per edge.

**Why plain HTML elements.** The view needs a real click target per edge carrying stable
attributes (``data-edge="0.1->1.3.k"``, ``data-in="1"``), in a page built by Dash with no
JavaScript build step. Options measured in Chromium:

* a ``dcc.Graph`` with one trace per edge gives ``clickData`` but no DOM element per edge
  (plotly draws on one SVG layer it owns; hover and click go through its own hit-testing),
  so neither the stable hooks nor reliable clicks on near-coincident lines;
* inline SVG is not available as Dash components (``dash.html`` has HTML elements only, and
  ``dash_svg`` is a third-party package), and SVG put into an ``Iframe``/``Markdown`` needs
  hand-written message passing to reach a callback;
* **absolutely positioned ``html.Div`` elements, one per edge, rotated with a CSS transform**
  are ordinary Dash components: each carries ``data-*`` attributes and ``n_clicks``, a
  pattern-matching callback (``{"type": "edge", "edge": ALL}``) receives the click, and the
  browser's own hit-testing follows the rotated box. Lines alone were not enough: in the
  full ``induction-2l`` graph 49 of 81 edges had another line on top at their midpoint
  (measured with ``elementFromPoint`` in Chromium; a symmetric layout crosses lines exactly
  there). So every edge also has a **knob**, a small dot on its line placed where no other
  knob or node is (a grid hash keeps the placement linear), and painted above every line
  (lines sit at ``z-index: -1`` of the canvas' stacking context, knobs at ``auto``). The
  knob is the element with ``data-edge``/``data-in`` and the line is its child, so a click
  anywhere on the line or on the knob toggles the edge, and the knob is always a free
  target (all 81 are hit at their centre). Hovering highlights the line; its ``title``
  names the edge and its weight.

That is what this module builds. Nodes (embed, heads with their q/k/v input ports, MLPs,
logits) are ``html.Div`` boxes with ``data-node``. The page stays usable on GPT-2 small
(32,491 edges): it draws the current hypothesis' edges (heaviest first, up to a cap) plus
candidate edges (all of them for small graphs, else the top ones of a computed attribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dash import html

from apexlens.ui.workbench.names import at_scope, base, edge_name, owner, split_edge

if TYPE_CHECKING:
    from apexlens.ui.workbench.session import Session

BLUE, RED, PLAIN = "#2166ac", "#b2182b", "#4a4a4a"
BOX_W, BOX_H = 54, 44
PORT_DY = 14
HIT = 7  # height of an edge's click strip (px)
MAX_EDGES = 600
MAX_CANDIDATES = 200


@dataclass
class Layout:
    """Pixel positions: each node's box centre, each sender's output point and each
    receiver's input point."""

    width: int
    height: int
    centre: dict[str, tuple[float, float]]
    out: dict[str, tuple[float, float]]
    inp: dict[str, tuple[float, float]]
    columns: list[tuple[float, str]]
    mlp_row: float | None


def _data(attrs: dict[str, str]) -> dict[str, Any]:
    return attrs  # typed Any: Dash's signatures do not list data-* attributes


def layout(session: Session) -> Layout:
    L, H = session.names.n_layers, session.names.n_heads
    row = 70 if H <= 8 else 58
    span = (L - 0.5) if not session.names.has_mlps else L
    col = max(150.0, min(420.0, 620.0 / max(span, 0.5)))
    top = 44.0
    x0 = 150.0
    heads_mid = top + row * H / 2
    centre: dict[str, tuple[float, float]] = {"embed": (50.0, heads_mid)}
    columns: list[tuple[float, str]] = [(50.0, "embed")]
    mlp_y = top + row * H + 34 if session.names.has_mlps else None
    last = x0
    for la in range(L):
        x = x0 + la * col
        columns.append((x, f"layer {la}"))
        for h in range(H):
            centre[f"{la}.{h}"] = (x, top + row * h + row / 2)
        last = x
        if session.names.has_mlps and mlp_y is not None:
            centre[f"m{la}"] = (x + col / 2, mlp_y)
            last = x + col / 2
    lx = last + (col / 2 if not session.names.has_mlps else col / 2) + 20
    centre["logits"] = (lx, heads_mid)
    columns.append((lx, "logits"))
    out: dict[str, tuple[float, float]] = {}
    inp: dict[str, tuple[float, float]] = {}
    for name, (x, y) in centre.items():
        out[name] = (x + BOX_W / 2, y)
        if name[0].isdigit():
            for i, c in enumerate("qkv"):
                inp[f"{name}.{c}"] = (x - BOX_W / 2, y + (i - 1) * PORT_DY)
        else:
            inp[name] = (x - BOX_W / 2, y)
    height = int((mlp_y + BOX_H / 2 + 24) if mlp_y is not None else (top + row * H + 16))
    return Layout(int(lx + BOX_W / 2 + 24), height, centre, out, inp, columns, mlp_y)


def drawn_edges(
    session: Session, scope: str | None, weights: dict[str, float] | None, candidates: bool
) -> tuple[list[str], list[str], int]:
    """``(hypothesis edges drawn, candidate edges drawn, hypothesis edges left out)``."""
    hyp = session.sorted(session.edges)
    if weights:
        hyp = sorted(hyp, key=lambda e: -abs(weights.get(e, 0.0)))
    shown = hyp[:MAX_EDGES]
    cand: list[str] = []
    if candidates:
        present = {edge_name(base(s), base(r)) for s, r in (split_edge(e) for e in session.edges)}
        pool = [e for e in session.universe if e not in present]
        if len(session.universe) > 400:  # large graphs: the top candidates of an attribution
            scores = session.computed_scores()
            if scores is None:
                pool = []
            else:
                rank = {edge_name(s, r): i for i, (s, r) in enumerate(scores.top(len(scores)))}
                pool = sorted((e for e in pool if e in rank), key=rank.__getitem__)
        pool = pool[: MAX_CANDIDATES if len(session.universe) > 400 else len(pool)]
        cand = [e if scope is None else at_scope(e, scope) for e in pool]
    return shown, cand, len(hyp) - len(shown)


_TRIES = (
    0.5,
    0.42,
    0.58,
    0.34,
    0.66,
    0.27,
    0.73,
    0.2,
    0.8,
    0.46,
    0.54,
    0.38,
    0.62,
    0.3,
    0.7,
    0.15,
    0.85,
)
KNOB = 8  # px; every edge has one knob, drawn above all lines, where nothing else is


class _Placer:
    """Knob positions along the lines, at least ``KNOB + 2`` px from every other knob and
    off the node boxes (a grid hash keeps it linear in the number of edges)."""

    def __init__(self, lay: Layout) -> None:
        self.cell = KNOB + 2
        self.grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self.boxes = [
            (x - BOX_W / 2 - 10, y - BOX_H / 2 - 5, x + BOX_W / 2 + 5, y + BOX_H / 2 + 5)
            for x, y in lay.centre.values()
        ]

    def _clear(self, x: float, y: float) -> float:
        if any(a <= x <= c and b <= y <= d for a, b, c, d in self.boxes):
            return -1.0
        gx, gy = int(x // self.cell), int(y // self.cell)
        best = float("inf")
        for i in (gx - 1, gx, gx + 1):
            for j in (gy - 1, gy, gy + 1):
                for px, py in self.grid.get((i, j), ()):
                    best = min(best, math.hypot(px - x, py - y))
        return best

    def place(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
        best, at = -2.0, (x1 + (x2 - x1) / 2, y1 + (y2 - y1) / 2)
        for t in _TRIES:
            x, y = x1 + t * (x2 - x1), y1 + t * (y2 - y1)
            room = self._clear(x, y)
            if room >= self.cell:
                best, at = room, (x, y)
                break
            if room > best:
                best, at = room, (x, y)
        self.grid.setdefault((int(at[0] // self.cell), int(at[1] // self.cell)), []).append(at)
        return at


def _edge(
    name: str,
    lay: Layout,
    placer: _Placer,
    inside: bool,
    weight: float | None,
    wmax: float,
    offset: int,
) -> html.Div:
    """One edge: its knob (the element with ``data-edge``; above every line) holding the
    line as a child (clicking the line clicks the edge too)."""
    s, r = split_edge(name)
    x1, y1 = lay.out[base(s)]
    x2, y2 = lay.inp[base(r)]
    y1 += offset
    y2 += offset
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy)
    angle = math.degrees(math.atan2(dy, dx))
    kx, ky = placer.place(x1, y1, x2, y2)
    at = s.split("@", 1)[1] if "@" in s else None
    colour, fill = "#b9bec7", "#fff"
    if inside:
        if weight is None:
            colour, width = PLAIN, 2.0
            tip = f"{s} → {r}: in the hypothesis (click to remove)"
        else:
            colour = BLUE if weight >= 0 else RED
            width = 1.5 + 5.0 * abs(weight) / wmax if wmax > 0 else 1.5
            tip = f"{s} → {r}: removing it changes recovery by {-weight:+.4f} (click to remove)"
        strength = 1.0 if weight is None or wmax <= 0 else abs(weight) / wmax
        fill = colour if strength >= 0.15 else "#fff"  # weak edges: hollow knobs
        stroke = html.Div(
            className="wb-stroke",
            style={
                "height": f"{width:.1f}px",
                "marginTop": f"{-width / 2:.1f}px",
                # an edge at named positions only: dashed (its knob is a square)
                "background": colour
                if at is None
                else f"repeating-linear-gradient(90deg, {colour} 0 7px, transparent 7px 11px)",
                "opacity": f"{0.3 + 0.6 * strength:.2f}",
            },
        )
    else:
        tip = f"{s} → {r}: not in the hypothesis (click to add)"
        stroke = html.Div(className="wb-stroke")
    ox, oy = kx - KNOB / 2, ky - KNOB / 2
    line = html.Div(
        stroke,
        className="wb-line",
        style={
            "left": f"{x1 - ox:.1f}px",
            "top": f"{y1 - oy - HIT / 2:.1f}px",
            "width": f"{length:.1f}px",
            "transform": f"rotate({angle:.3f}deg)",
        },
    )
    return html.Div(
        line,
        id={"type": "edge", "edge": name},
        n_clicks=0,
        className="wb-edge " + ("in" if inside else "out") + (" at" if at is not None else ""),
        title=tip,
        style={
            "left": f"{ox:.1f}px",
            "top": f"{oy:.1f}px",
            "borderColor": colour,
            "background": fill,
        },
        **_data({"data-edge": name, "data-in": "1" if inside else "0"}),
    )


def _node(name: str, label: str, lay: Layout, active: bool, kind: str, tip: str) -> list[Any]:
    x, y = lay.centre[name]
    out: list[Any] = [
        html.Div(
            html.Span(label, className="wb-label"),
            id={"type": "node", "node": name},
            n_clicks=0,
            className=f"wb-node wb-{kind}" + (" on" if active else ""),
            title=tip,
            style={
                "left": f"{x - BOX_W / 2}px",
                "top": f"{y - BOX_H / 2}px",
                "width": f"{BOX_W}px",
                "height": f"{BOX_H}px",
            },
            **_data({"data-node": name}),
        )
    ]
    if kind == "head":
        for c in "qkv":
            px, py = lay.inp[f"{name}.{c}"]
            port = f"{name}.{c}"
            out.append(
                html.Div(
                    c,
                    id={"type": "node", "node": port},
                    n_clicks=0,
                    className="wb-port" + (" on" if active else ""),
                    title=f"{port} ({'query' if c == 'q' else 'key' if c == 'k' else 'value'} input of head {name}): click to toggle the edges into it",
                    style={"left": f"{px - 6}px", "top": f"{py - 6}px"},
                    **_data({"data-node": port}),
                )
            )
    return out


def circuit_view(
    session: Session,
    scope: str | None = None,
    weights: dict[str, float] | None = None,
    candidates: bool = True,
) -> tuple[html.Div, str]:
    """The circuit view of the current hypothesis and a one-line caption."""
    lay = layout(session)
    shown, cand, left_out = drawn_edges(session, scope, weights, candidates)
    wmax = max((abs(w) for w in (weights or {}).values()), default=0.0)
    touched: set[str] = set()
    for e in session.edges:
        s, r = split_edge(e)
        touched.add(base(s))
        touched.add(owner(base(r)))
    parts: list[Any] = []
    for x, text in lay.columns:
        parts.append(html.Div(text, className="wb-col", style={"left": f"{x - 50}px"}))
    if lay.mlp_row is not None:
        parts.append(
            html.Div(
                "MLPs", className="wb-col", style={"left": "0px", "top": f"{lay.mlp_row - 8}px"}
            )
        )
    seen: dict[str, int] = {}
    placer = _Placer(lay)
    for e in cand:
        parts.append(_edge(e, lay, placer, False, None, wmax, 0))
    for e in shown:
        s, r = split_edge(e)
        plain = edge_name(base(s), base(r))
        k = seen.get(plain, 0)
        seen[plain] = k + 1
        offset = 0 if k == 0 else (3 * ((k + 1) // 2) * (1 if k % 2 else -1))
        parts.append(
            _edge(e, lay, placer, True, None if weights is None else weights.get(e), wmax, offset)
        )
    parts += _node(
        "embed", "embed", lay, "embed" in touched, "end", "embed: click to toggle all its edges"
    )
    for la in range(session.names.n_layers):
        for h in range(session.names.n_heads):
            name = f"{la}.{h}"
            parts += _node(
                name,
                name,
                lay,
                name in touched,
                "head",
                f"head {name}: click to toggle all its edges (as sender and through q/k/v)",
            )
        if session.names.has_mlps:
            parts += _node(
                f"m{la}",
                f"m{la}",
                lay,
                f"m{la}" in touched,
                "mlp",
                f"MLP {la}: click to toggle all its edges",
            )
    parts += _node(
        "logits",
        "logits",
        lay,
        "logits" in touched,
        "end",
        "logits: click to toggle all edges into them",
    )
    canvas = html.Div(
        parts, className="wb-canvas", style={"width": f"{lay.width}px", "height": f"{lay.height}px"}
    )
    n = len(session.edges)
    caption = f"drawing {len(shown)} of {n} hypothesis edges"
    if left_out:
        caption += f" (the {len(shown)} {'heaviest' if weights else 'first'}; use the edge box or node clicks for the other {left_out})"
    caption += f" and {len(cand)} candidate edges" + (f" at @{scope}" if scope else "")
    if candidates and not cand and len(session.universe) > 400:
        caption += " (compute a top-k attribution to see candidates)"
    caption += f"; the full graph has {len(session.universe)} edges."
    return canvas, caption
