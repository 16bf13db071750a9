"""The workbench page's layout, built from named pieces and rendered from a session's
current state on every page load:

* :func:`header` -- title, data and graph size;
* :func:`toolbar` -- undo/redo, the edge box, the positions a click acts at, weighing;
* :func:`circuit_panel` -- the message box, the circuit view (filled by a callback) and its
  legend;
* :func:`numbers_card` -- ``#recovery``, ``#explained``, details and the per-example spread;
* :func:`starts_card` -- starting points (full, nothing, top-k, discover, a circuit file);
* :func:`export_card` -- the hypothesis JSON, the figures, the HTML snapshot;
* :func:`history_card` and :func:`paths_card` -- history and comparison, path contributions.
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from apexlens.ui.workbench.evaluation import METHODS
from apexlens.ui.workbench.formats import MAX_JSON_BYTES
from apexlens.ui.workbench.render import render_numbers
from apexlens.ui.workbench.session import Session

LOADING: dict[str, Any] = {
    "delay_show": 500,  # a spinner for anything over half a second
    "overlay_style": {"visibility": "visible", "opacity": 0.45},
    "type": "circle",
}
BIG_GRAPH = 400  # edges: above this, the page starts empty and weighs only when asked


def page(session: Session) -> Any:
    """The whole page."""
    with session.lock:
        right = html.Div(
            [numbers_card(session), starts_card(), export_card()], className="wb-right"
        )
        main = html.Div(
            [html.Div([toolbar(session), *circuit_panel()], className="wb-left"), right],
            className="wb-main",
        )
        lower = html.Div([history_card(), paths_card()], className="wb-lower")
        stores = [
            dcc.Store(id="version", data=0),
            dcc.Store(id="pick-a", data=None),
            dcc.Store(id="pick-b", data=None),
            dcc.Store(id="sel-head", data=None),
        ]
        return html.Div([header(session), main, lower, *stores])


def header(session: Session) -> Any:
    exp = session.exp
    data = (
        f"{exp.batch} examples × {exp.n_pos} tokens · {session.ablation} ablation · "
        f"{len(session.universe)} edges"
    )
    return html.Div(
        [html.H1("apexlens workbench"), html.Span(f"{session.title} · {data}", className="ctx")],
        className="wb-top",
    )


def toolbar(session: Session) -> Any:
    scopes = [{"label": "all positions", "value": ""}] + [
        {"label": f"@{p}", "value": p} for p in session.position_names
    ]
    undo = html.Div(
        [
            html.Button("↶ undo", id="undo", disabled=not session.can_undo),
            html.Button("redo ↷", id="redo", disabled=not session.can_redo),
        ],
        className="grp",
    )
    edge_box = html.Div(
        [
            dcc.Input(
                id="edge-text",
                type="text",
                placeholder="0.1->1.3.k, embed->1.3.q",
                debounce=False,
                style={"width": "220px"},
                n_submit=0,
            ),
            html.Button("add", id="edge-add"),
            html.Button("remove", id="edge-remove"),
        ],
        className="grp",
    )
    scope = html.Div(
        [
            html.Span("click adds edges at", className="wb-hint"),
            dcc.RadioItems(id="scope", options=scopes, value="", inline=True, className="wb-radio"),
        ],
        className="grp",
        style={"display": "flex" if session.position_names else "none"},
    )
    weigh = html.Div(
        [
            dcc.Checklist(
                id="auto-weigh",
                options=[{"label": " weigh edges after each change", "value": "on"}],
                value=[] if len(session.universe) > BIG_GRAPH else ["on"],
                className="wb-radio",
            ),
            html.Button("weigh now", id="weigh"),
        ],
        className="grp",
    )
    return html.Div([undo, edge_box, scope, weigh], className="wb-tools")


def circuit_panel() -> list[Any]:
    legend = html.Div(
        [
            "line width = exact change of recovery when that one edge is removed:",
            html.Span(className="sw", style={"background": "#2166ac"}),
            "the edge helps",
            html.Span(className="sw", style={"background": "#b2182b"}),
            "it hurts",
            html.Span(className="sw", style={"background": "#4a4a4a"}),
            "not weighed",
            html.Span(className="sw", style={"borderTop": "1px dashed #999", "height": "0"}),
            "not in the hypothesis (click to add); dashed with a square knob: at named positions "
            "only (e.g. @end). Click a node to toggle all its edges.",
        ],
        className="wb-legend",
    )
    return [
        html.Div(id="message", className="wb-msg empty", role="alert"),
        dcc.Loading(html.Div(html.Div(id="circuit"), className="wb-scroll"), **LOADING),
        html.Div(id="circuit-caption", className="wb-caption"),
        legend,
    ]


def _big_number(label: str, value: str, id: str) -> Any:
    return html.Div([html.Div(label, className="lbl"), html.Div(value, id=id, className="wb-big")])


def numbers_card(session: Session) -> Any:
    recovery, explained, n_edges, detail, spread, _, _ = render_numbers(session, session.current)
    numbers = html.Div(
        [
            html.Div(
                [
                    _big_number("recovery", recovery, "recovery"),
                    _big_number("proportion explained", explained, "explained"),
                ],
                className="wb-nums",
            ),
            html.Div(
                ["edges: ", html.B(n_edges, id="n-edges"), f" of {len(session.universe)}"],
                className="wb-detail",
            ),
            html.Div(detail, id="numbers-detail", className="wb-detail"),
        ]
    )
    return html.Div(
        [
            html.H3("current hypothesis"),
            dcc.Loading(numbers, **LOADING),
            html.Div(
                "per-example metric: fully ablated (grey) · hypothesis (blue) · clean (green)",
                className="wb-hint",
                style={"marginTop": "8px"},
            ),
            dcc.Graph(
                id="spread", figure=spread, config={"displaylogo": False, "displayModeBar": False}
            ),
        ],
        className="wb-card",
    )


def starts_card() -> Any:
    top_k = html.Div(
        [
            "top",
            dcc.Input(id="top-k", type="number", value=10, min=0, step=1, style={"width": "64px"}),
            "edges by",
            dcc.RadioItems(
                id="method",
                options=list(METHODS),
                value="eap-ig",
                inline=True,
                className="wb-radio",
            ),
            html.Button("top-k", id="start-topk"),
        ],
        className="wb-row",
    )
    discover = html.Div(
        [
            "discover, threshold",
            dcc.Input(
                id="threshold",
                type="number",
                placeholder="2% of gap",
                min=0,
                style={"width": "90px"},
            ),
            html.Button("discover", id="start-discover"),
        ],
        className="wb-row",
    )
    upload = dcc.Upload(
        id="upload",
        children=html.Div(
            ["drop or ", html.U("choose"), " a circuit JSON (apexlens or EAP-IG/MIB)"]
        ),
        className="wb-upload",
        multiple=False,
        max_size=MAX_JSON_BYTES,
    )
    plain = html.Div(
        [html.Button("full graph", id="start-full"), html.Button("nothing", id="start-empty")],
        className="wb-row",
    )
    return html.Div(
        [html.H3("starting points"), plain, top_k, discover, upload], className="wb-card"
    )


def export_card() -> Any:
    return html.Div(
        [
            html.H3("save and share"),
            html.Div(
                [
                    html.Button("hypothesis JSON", id="export-json"),
                    html.Button("figures", id="export-figures"),
                    html.Button("HTML snapshot", id="export-snapshot"),
                ],
                className="wb-row",
            ),
            dcc.Download(id="download"),
        ],
        className="wb-card",
    )


def history_card() -> Any:
    return html.Div(
        [
            html.H3("history and comparison"),
            html.Div(
                "Every hypothesis evaluated in this session. Pick any two as A and B to compare them.",
                className="wb-hint",
            ),
            html.Div(id="history"),
            html.Div(id="compare"),
        ],
        className="wb-card",
    )


def paths_card() -> Any:
    hidden = {"display": "none"}
    graphs = html.Div(
        [
            dcc.Graph(id="heat-logits", style=hidden, config={"displaylogo": False}),
            html.Div(
                [
                    html.Span(id="heat-head-text", className="wb-hint"),
                    html.Button("add → logits", id="add-logits-edge", n_clicks=0, style=hidden),
                ],
                className="wb-row",
            ),
            dcc.Graph(id="heat-qkv", style=hidden, config={"displaylogo": False}),
            dcc.Graph(id="drill", style=hidden, config={"displaylogo": False}),
        ]
    )
    return html.Div(
        [
            html.H3("path contributions"),
            html.Div(
                [
                    html.Button("compute heads → logits", id="heat-go", className="primary"),
                    html.Span(
                        "click a head for heads → its q/k/v; click a q/k/v cell to add that edge",
                        className="wb-hint",
                    ),
                ],
                className="wb-row",
            ),
            dcc.Loading(graphs, **LOADING),
        ],
        className="wb-card",
    )
