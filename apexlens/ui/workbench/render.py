"""What the page shows of a session's state, as Dash components: the numbers of the current
hypothesis (``#recovery``, ``#explained``: plain decimals, :func:`fmt`), the history table
and the side-by-side comparison of two hypotheses. Rendering only: nothing here changes
the session."""

from __future__ import annotations

import math
from typing import Any

from dash import html

from apexlens import ApexlensError
from apexlens.ui.workbench import figures
from apexlens.ui.workbench.session import Entry, Session

HISTORY_ROWS = 200  # the latest hypotheses listed in the page
LISTED_EDGES = 300  # edges listed per side in a comparison


def fmt(x: float) -> str:
    """A number as the page shows it: a plain decimal with 6 places (``nan`` if undefined)."""
    return "nan" if math.isnan(x) else f"{x:.6f}"


def data(**attrs: str) -> dict[str, Any]:
    """``data-*`` attributes for a Dash component (``data(entry="3")``)."""
    return {f"data-{k}": v for k, v in attrs.items()}


def render_numbers(session: Session, entry: Entry) -> tuple[Any, ...]:
    """What the page shows of an evaluated hypothesis: ``#recovery``, ``#explained``, the
    edge count, the details, the per-example figure and the undo/redo states."""
    detail = [
        html.Div(
            f"metric {entry.metric:.4g} ± {entry.sem:.2g} (mean ± sem over "
            f"{len(entry.per_example)} examples)"
        ),
        html.Div(
            f"clean {entry.clean:.4g} · fully ablated {entry.ablated:.4g} ({session.ablation})"
        ),
        html.Div(
            [
                f"#{entry.id} ",
                html.Span(entry.label, title=entry.label),
                f" · evaluated in {1000 * entry.seconds:.0f} ms",
            ],
            style={"overflow": "hidden", "textOverflow": "ellipsis", "whiteSpace": "nowrap"},
        ),
    ]
    return (
        fmt(entry.recovery),
        fmt(entry.explained),
        str(entry.n_edges),
        detail,
        figures.spread_dict(entry),
        not session.can_undo,
        not session.can_redo,
    )


def default_pair(session: Session, a: int | None, b: int | None) -> tuple[int, int]:
    """The hypotheses compared when none were picked: the one before the current (A) and
    the current one (B)."""
    cur = session.current.id
    others = [e.id for e in session.history if e.id != cur]
    return (a if a is not None else (others[-1] if others else cur)), (b if b is not None else cur)


def _history_row(e: Entry, cur: int, a: int, b: int) -> Any:
    marks = (("cur", e.id == cur), ("pa", e.id == a), ("pb", e.id == b))
    label = e.label if len(e.label) <= 48 else e.label[:46] + "…"
    buttons = [
        html.Button(
            "restore", id={"type": "restore", "id": str(e.id)}, n_clicks=0, disabled=e.id == cur
        ),
        html.Button("A", id={"type": "pick-a", "id": str(e.id)}, n_clicks=0, title="compare as A"),
        html.Button("B", id={"type": "pick-b", "id": str(e.id)}, n_clicks=0, title="compare as B"),
    ]
    return html.Tr(
        [
            html.Td(str(e.id)),
            html.Td(label, className="l", title=e.label),
            html.Td(str(e.n_edges)),
            html.Td(fmt(e.recovery)[:7]),
            html.Td(fmt(e.explained)[:7]),
            html.Td(buttons),
        ],
        className=" ".join(c for c, on in marks if on),
        **data(entry=str(e.id)),
    )


def history_table(session: Session, a: int, b: int) -> Any:
    """Every hypothesis evaluated (latest first), with restore and compare-as-A/B buttons."""
    cur = session.current.id
    head = html.Tr(
        [html.Th("#"), html.Th("how", className="l")]
        + [html.Th(t) for t in ("edges", "recovery", "explained", "")]
    )
    rows = [_history_row(e, cur, a, b) for e in reversed(session.history[-HISTORY_ROWS:])]
    return html.Div(
        html.Table([html.Thead(head), html.Tbody(rows)], className="wb-table"),
        style={"maxHeight": "260px", "overflow": "auto"},
    )


def _number_row(name: str, x: float, y: float, key: str) -> Any:
    diff = "nan" if math.isnan(x) or math.isnan(y) else fmt(y - x)
    return html.Tr(
        [
            html.Td(name, className="l"),
            html.Td(fmt(x), id=f"compare-{key}-a"),
            html.Td(fmt(y), id=f"compare-{key}-b"),
            html.Td(diff),
        ]
    )


def _edge_list(title: str, names: list[str], key: str) -> Any:
    items = [html.Li(n) for n in names[:LISTED_EDGES]]
    if len(names) > LISTED_EDGES:
        items.append(html.Li(f"… and {len(names) - LISTED_EDGES} more"))
    return html.Div([html.B(f"{title} ({len(names)})"), html.Ul(items, id=f"compare-only-{key}")])


def compare_panel(session: Session, a: int, b: int) -> Any:
    """Hypotheses ``a`` and ``b`` side by side: their numbers, B − A, and the edges only in
    each (ids ``compare-recovery-a``, ``compare-only-b``, ...)."""
    try:
        c = session.compare(a, b)
    except ApexlensError as e:
        return html.Div(str(e), className="wb-msg error")
    ea, eb = c["a"], c["b"]
    edges_row = html.Tr(
        [
            html.Td("edges", className="l"),
            html.Td(str(ea.n_edges)),
            html.Td(str(eb.n_edges)),
            html.Td(f"{eb.n_edges - ea.n_edges:+d}"),
        ]
    )
    table = html.Table(
        [
            html.Thead(
                html.Tr(
                    [
                        html.Th("", className="l"),
                        html.Th(f"A: #{ea.id}"),
                        html.Th(f"B: #{eb.id}"),
                        html.Th("B − A"),
                    ]
                )
            ),
            html.Tbody(
                [
                    _number_row("recovery", ea.recovery, eb.recovery, "recovery"),
                    _number_row("proportion explained", ea.explained, eb.explained, "explained"),
                    _number_row("metric (mean)", ea.metric, eb.metric, "metric"),
                    edges_row,
                ]
            ),
        ],
        className="wb-table",
    )
    return html.Div(
        [
            html.Div(
                f"A = #{ea.id} {ea.label}   ·   B = #{eb.id} {eb.label}",
                className="wb-hint",
                style={"marginTop": "10px"},
            ),
            table,
            html.Div(
                [
                    _edge_list("only in A", c["only_a"], "a"),
                    _edge_list("only in B", c["only_b"], "b"),
                ],
                className="wb-cmp",
            ),
            html.Div(f"{c['common']} edges in both", className="wb-hint"),
        ],
        id="compare-result",
    )
