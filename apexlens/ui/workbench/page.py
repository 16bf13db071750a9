"""The workbench page's layout, rendered from a session's current state on every load."""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from apexlens.ui.workbench.session import Session


def page(session: Session) -> Any:
    """The whole page: tools, message, circuit view (filled by a callback), numbers,
    starting points, exports, history and comparison, path contributions."""
    from apexlens.ui.workbench.app import render_numbers

    scopes = [{"label": "all positions", "value": ""}] + [
        {"label": f"@{p}", "value": p} for p in session.position_names
    ]
    loading: dict[str, Any] = {
        "delay_show": 500,
        "overlay_style": {"visibility": "visible", "opacity": 0.45},
        "type": "circle",
    }
    big_graph = len(session.universe) > 400

    with session.lock:
        first = render_numbers(session, session.current)
        tools = html.Div(
            [
                html.Div(
                    [
                        html.Button("↶ undo", id="undo", disabled=first[5]),
                        html.Button("redo ↷", id="redo", disabled=first[6]),
                    ],
                    className="grp",
                ),
                html.Div(
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
                ),
                html.Div(
                    [
                        html.Span("click adds edges at", className="wb-hint"),
                        dcc.RadioItems(
                            id="scope",
                            options=scopes,
                            value="",
                            inline=True,
                            className="wb-radio",
                        ),
                    ],
                    className="grp",
                    style={"display": "flex" if session.position_names else "none"},
                ),
                html.Div(
                    [
                        dcc.Checklist(
                            id="auto-weigh",
                            options=[{"label": " weigh edges after each change", "value": "on"}],
                            value=[] if big_graph else ["on"],
                            className="wb-radio",
                        ),
                        html.Button("weigh now", id="weigh"),
                    ],
                    className="grp",
                ),
            ],
            className="wb-tools",
        )
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
        left = html.Div(
            [
                tools,
                html.Div(id="message", className="wb-msg empty", role="alert"),
                dcc.Loading(html.Div(html.Div(id="circuit"), className="wb-scroll"), **loading),
                html.Div(id="circuit-caption", className="wb-caption"),
                legend,
            ],
            className="wb-left",
        )
        nums = html.Div(
            [
                html.H3("current hypothesis"),
                dcc.Loading(
                    html.Div(
                        [
                            html.Div(
                                [
                                    html.Div(
                                        [
                                            html.Div("recovery", className="lbl"),
                                            html.Div(first[0], id="recovery", className="wb-big"),
                                        ]
                                    ),
                                    html.Div(
                                        [
                                            html.Div("proportion explained", className="lbl"),
                                            html.Div(first[1], id="explained", className="wb-big"),
                                        ]
                                    ),
                                ],
                                className="wb-nums",
                            ),
                            html.Div(
                                [
                                    "edges: ",
                                    html.B(first[2], id="n-edges"),
                                    f" of {len(session.universe)}",
                                ],
                                className="wb-detail",
                            ),
                            html.Div(first[3], id="numbers-detail", className="wb-detail"),
                        ]
                    ),
                    **loading,
                ),
                html.Div(
                    "per-example metric: fully ablated (grey) · hypothesis (blue) · clean (green)",
                    className="wb-hint",
                    style={"marginTop": "8px"},
                ),
                dcc.Graph(
                    id="spread",
                    figure=first[4],
                    config={"displaylogo": False, "displayModeBar": False},
                ),
            ],
            className="wb-card",
        )
        starts = html.Div(
            [
                html.H3("starting points"),
                html.Div(
                    [
                        html.Button("full graph", id="start-full"),
                        html.Button("nothing", id="start-empty"),
                    ],
                    className="wb-row",
                ),
                html.Div(
                    [
                        "top",
                        dcc.Input(
                            id="top-k",
                            type="number",
                            value=10,
                            min=0,
                            step=1,
                            style={"width": "64px"},
                        ),
                        "edges by",
                        dcc.RadioItems(
                            id="method",
                            options=["exact", "eap", "eap-ig"],
                            value="eap-ig",
                            inline=True,
                            className="wb-radio",
                        ),
                        html.Button("top-k", id="start-topk"),
                    ],
                    className="wb-row",
                ),
                html.Div(
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
                ),
                dcc.Upload(
                    id="upload",
                    children=html.Div(
                        [
                            "drop or ",
                            html.U("choose"),
                            " a circuit JSON (apexlens or EAP-IG/MIB)",
                        ]
                    ),
                    className="wb-upload",
                    multiple=False,
                    max_size=20_000_000,
                ),
            ],
            className="wb-card",
        )
        export = html.Div(
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
        lower = html.Div(
            [
                html.Div(
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
                ),
                html.Div(
                    [
                        html.H3("path contributions"),
                        html.Div(
                            [
                                html.Button(
                                    "compute heads → logits", id="heat-go", className="primary"
                                ),
                                html.Span(
                                    "click a head for heads → its q/k/v; click a q/k/v cell to add that edge",
                                    className="wb-hint",
                                ),
                            ],
                            className="wb-row",
                        ),
                        dcc.Loading(
                            html.Div(
                                [
                                    dcc.Graph(
                                        id="heat-logits",
                                        style={"display": "none"},
                                        config={"displaylogo": False},
                                    ),
                                    html.Div(
                                        [
                                            html.Span(id="heat-head-text", className="wb-hint"),
                                            html.Button(
                                                "add → logits",
                                                id="add-logits-edge",
                                                n_clicks=0,
                                                style={"display": "none"},
                                            ),
                                        ],
                                        className="wb-row",
                                    ),
                                    dcc.Graph(
                                        id="heat-qkv",
                                        style={"display": "none"},
                                        config={"displaylogo": False},
                                    ),
                                    dcc.Graph(
                                        id="drill",
                                        style={"display": "none"},
                                        config={"displaylogo": False},
                                    ),
                                ]
                            ),
                            **loading,
                        ),
                    ],
                    className="wb-card",
                ),
            ],
            className="wb-lower",
        )
        batch_text = f"{session.exp.batch} examples × {session.exp.n_pos} tokens · {session.ablation} ablation · {len(session.universe)} edges"
        return html.Div(
            [
                html.Div(
                    [
                        html.H1("apexlens workbench"),
                        html.Span(f"{session.title} · {batch_text}", className="ctx"),
                    ],
                    className="wb-top",
                ),
                html.Div(
                    [left, html.Div([nums, starts, export], className="wb-right")],
                    className="wb-main",
                ),
                lower,
                dcc.Store(id="version", data=0),
                dcc.Store(id="pick-a", data=None),
                dcc.Store(id="pick-b", data=None),
                dcc.Store(id="sel-head", data=None),
            ]
        )
