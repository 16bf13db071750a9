"""The Dash app: a thin view over a :class:`~apexlens.ui.workbench.session.Session`.

Dash (Plotly's framework) serves the page: it runs inline in Jupyter, VS Code and
JupyterLab, reuses apexlens' plotly figures as they are, and needs no JavaScript build.
Every callback reads or changes the session and renders from it:

* ``dispatch`` -- every change of the hypothesis (an edge or node click, undo/redo, a
  starting point, a file, the edge box, a heatmap cell): calls one Session method and
  renders the numbers (``#recovery``, ``#explained``), which the session took from
  ``Experiment.evaluate_circuit``; any error becomes a message in the page;
* ``render_circuit`` -- the circuit view (weighing the edges first when that is quick or asked);
* ``render_history`` / ``render_compare`` -- the history and the side-by-side comparison;
* ``heatmaps`` -- path contributions (heads -> logits, heads -> a head's q/k/v), per example.

The server is werkzeug's, started by :func:`serve` (bound to 127.0.0.1 unless told
otherwise), never Flask's debugger or reloader.
"""

from __future__ import annotations

import base64
import math
import threading
import traceback
import webbrowser
from typing import Any

from apexlens import ApexlensError
from apexlens.ui.workbench import figures
from apexlens.ui.workbench.session import Entry, Session

AUTO_WEIGH_SECONDS = 1.0

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#222}
.wb-top{background:#1f2a44;color:#fff;padding:10px 18px;display:flex;align-items:baseline;gap:14px}
.wb-top h1{font-size:18px;margin:0;font-weight:600}.wb-top .ctx{font-size:13px;opacity:.8}
.wb-main{display:flex;gap:14px;padding:12px 14px;align-items:flex-start}
.wb-left{flex:1;min-width:0}.wb-right{width:370px;flex:none;display:flex;flex-direction:column;gap:12px}
.wb-card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 12px}
.wb-card h3{font-size:13px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#556}
.wb-tools{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin-bottom:8px}
.wb-tools .grp{display:flex;gap:4px;align-items:center}
button{font:inherit;font-size:13px;padding:4px 10px;border:1px solid #b8c0cc;border-radius:5px;background:#fff;cursor:pointer}
button:hover{background:#eef2f8}button:disabled{opacity:.45;cursor:default}
button.primary{background:#2166ac;color:#fff;border-color:#2166ac}
input[type=text],input[type=number]{font:inherit;font-size:13px;padding:4px 6px;border:1px solid #b8c0cc;border-radius:5px}
.wb-scroll{overflow:auto;max-height:760px;background:#fff;border:1px solid #dde1e7;border-radius:8px}
.wb-canvas{position:relative;margin:4px;z-index:0}
.wb-col{position:absolute;top:6px;width:100px;text-align:center;font-size:12px;color:#778;font-weight:600}
.wb-edge{position:absolute;width:8px;height:8px;box-sizing:border-box;border-radius:50%;border:2px solid;background:#fff;cursor:pointer}
.wb-edge.out{border-width:1.5px}
.wb-line{position:absolute;height:7px;transform-origin:0 50%;z-index:-1}
.wb-stroke{position:absolute;top:50%;left:0;right:0;border-radius:2px;opacity:.8}
.wb-edge.out .wb-stroke{height:0;border-top:1px dashed #c4c8cf;opacity:1}
.wb-edge:hover{border-color:#f08c00 !important;background:#f08c00 !important}
.wb-edge:hover .wb-line{z-index:0}.wb-edge:hover .wb-stroke{background:#f08c00 !important;opacity:1;border-color:#f08c00}
.wb-edge.at{border-radius:1px}
.wb-node{position:absolute;z-index:4;border:1.5px solid #c3c8d0;border-radius:7px;background:#fafbfc;display:flex;
 align-items:center;justify-content:center;cursor:pointer;font-size:12px;color:#889;box-sizing:border-box}
.wb-node.on{border-color:#1f2a44;background:#fff;color:#111;font-weight:600}
.wb-node:hover{box-shadow:0 0 0 3px #f0a30066}
.wb-node.wb-mlp{border-radius:3px;background:#f4f1fa}.wb-node.wb-end{background:#eef3f8}
.wb-port{position:absolute;z-index:5;width:12px;height:12px;border-radius:6px;background:#fff;border:1px solid #aab;
 font-size:8px;line-height:11px;text-align:center;color:#667;cursor:pointer;box-sizing:border-box}
.wb-port.on{border-color:#1f2a44;color:#111}.wb-port:hover{background:#f0a300;color:#fff}
.wb-caption{font-size:12px;color:#556;margin:6px 2px}
.wb-legend{font-size:12px;color:#556;margin:2px}
.wb-legend span.sw{display:inline-block;width:22px;height:4px;vertical-align:middle;margin:0 4px 0 10px}
.wb-big{font-size:30px;font-weight:600;font-variant-numeric:tabular-nums}
.wb-nums{display:grid;grid-template-columns:1fr 1fr;gap:4px 12px}
.wb-nums .lbl{font-size:12px;color:#667}
.wb-detail{font-size:12px;color:#444;margin-top:6px;line-height:1.5;font-variant-numeric:tabular-nums}
.wb-msg{padding:7px 10px;border-radius:6px;font-size:13px;margin-bottom:8px}
.wb-msg.error{background:#fdecea;border:1px solid #e0a39d;color:#8a1c12;position:fixed;top:14px;left:50%;
 transform:translateX(-50%);z-index:100;max-width:760px;box-shadow:0 4px 18px #0003;cursor:pointer}
.wb-msg.error::after{content:"  ×";font-weight:700}
.wb-msg.note{background:#eef6ee;border:1px solid #b6d7b6;color:#24572a}
.wb-msg.empty{display:none}
table.wb-table{border-collapse:collapse;font-size:12.5px;width:100%}
.wb-table td,.wb-table th{border-bottom:1px solid #e4e7ec;padding:3px 6px;text-align:right;font-variant-numeric:tabular-nums}
.wb-table td.l,.wb-table th.l{text-align:left}.wb-table tr.cur{background:#fff7e0}
.wb-table tr.pa td:first-child{box-shadow:inset 4px 0 #2166ac}.wb-table tr.pb td:first-child{box-shadow:inset 4px 0 #b2182b}
.wb-table button{padding:1px 7px;font-size:12px}
.wb-cmp{display:grid;grid-template-columns:1fr 1fr;gap:10px;margin-top:8px}
.wb-cmp ul{margin:4px 0;padding-left:18px;font-size:12.5px;max-height:220px;overflow:auto;font-family:ui-monospace,monospace}
.wb-lower{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:14px;padding:0 14px 14px}
.wb-upload{border:1.5px dashed #aab;border-radius:6px;padding:8px;text-align:center;font-size:13px;cursor:pointer;background:#fafbfc}
.wb-row{display:flex;gap:6px;align-items:center;flex-wrap:wrap;margin:5px 0;font-size:13px}
.wb-radio label{margin-right:8px;font-size:13px}
.wb-hint{font-size:12px;color:#667}
"""

INDEX = (
    """<!DOCTYPE html>
<html><head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>"""
    + CSS
    + """</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body></html>"""
)


def fmt(x: float) -> str:
    """A number as the page shows it: a plain decimal with 6 places (``nan`` if undefined)."""
    return "nan" if math.isnan(x) else f"{x:.6f}"


def render_numbers(session: Session, entry: Entry) -> tuple[Any, ...]:
    """What the page shows of an evaluated hypothesis: ``#recovery``, ``#explained``, the
    edge count, the details, the per-example figure and the undo/redo states."""
    from dash import html

    detail = [
        html.Div(
            f"metric {entry.metric:.4g} ± {entry.sem:.2g} (mean ± sem over {len(entry.per_example)} examples)"
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


def _require_dash() -> Any:
    try:
        import dash
    except ImportError:
        raise ApexlensError('the workbench needs Dash: pip install "apexlens[workbench]"') from None
    return dash


def make_app(session: Session) -> Any:
    """The Dash app over ``session`` (not started: see :func:`serve`)."""
    dash = _require_dash()
    from dash import ALL, Input, Output, State, ctx, dcc, html, no_update
    from dash.exceptions import PreventUpdate

    from apexlens.ui.workbench.page import page
    from apexlens.ui.workbench.view import circuit_view

    app = dash.Dash(
        __name__,
        title=f"apexlens workbench: {session.title}",
        update_title=None,
        serve_locally=True,
        suppress_callback_exceptions=True,
        assets_ignore=".*",
    )
    app.index_string = INDEX
    app.layout = lambda: page(session)  # re-rendered on every page load

    def _fail(e: BaseException) -> tuple[str, str]:
        if isinstance(e, ApexlensError):
            return str(e), "wb-msg error"
        traceback.print_exc()
        return (
            f"internal error ({type(e).__name__}): {e} -- the session is unchanged",
            "wb-msg error",
        )

    def _report(e: BaseException) -> None:
        """Show an error of a callback that does not own the message box."""
        msg, cls = _fail(e)
        dash.set_props("message", {"children": msg, "className": cls})

    # ------------------------------------------------------------------ changes
    @app.callback(
        Output("recovery", "children"),
        Output("explained", "children"),
        Output("n-edges", "children"),
        Output("numbers-detail", "children"),
        Output("spread", "figure"),
        Output("undo", "disabled"),
        Output("redo", "disabled"),
        Output("message", "children"),
        Output("message", "className"),
        Output("version", "data"),
        Output("upload", "contents"),  # cleared, so that the same file can be loaded again
        Input({"type": "edge", "edge": ALL}, "n_clicks"),
        Input({"type": "node", "node": ALL}, "n_clicks"),
        Input({"type": "restore", "id": ALL}, "n_clicks"),
        Input("undo", "n_clicks"),
        Input("redo", "n_clicks"),
        Input("start-full", "n_clicks"),
        Input("start-empty", "n_clicks"),
        Input("start-topk", "n_clicks"),
        Input("start-discover", "n_clicks"),
        Input("upload", "contents"),
        Input("edge-add", "n_clicks"),
        Input("edge-text", "n_submit"),
        Input("edge-remove", "n_clicks"),
        Input("heat-qkv", "clickData"),
        Input("add-logits-edge", "n_clicks"),
        State("scope", "value"),
        State("method", "value"),
        State("top-k", "value"),
        State("threshold", "value"),
        State("edge-text", "value"),
        State("upload", "filename"),
        State("sel-head", "data"),
        State("version", "data"),
        prevent_initial_call=True,
    )
    def dispatch(*args: Any) -> tuple[Any, ...]:
        trig = ctx.triggered_id
        value = ctx.triggered[0]["value"] if ctx.triggered else None
        if trig is None or value in (None, 0, []):
            raise PreventUpdate  # a component (re)appearing, not a click
        scope, method, k, threshold, text, filename, head, version = args[-8:]
        s = session
        kind = trig["type"] if isinstance(trig, dict) else trig
        try:
            if kind == "edge":
                s.toggle_edge(trig["edge"])
            elif kind == "node":
                s.toggle_node(trig["node"], at=scope or None)
            elif kind == "restore":
                s.restore(int(trig["id"]))
            elif kind == "undo":
                s.undo()
            elif kind == "redo":
                s.redo()
            elif kind == "start-full":
                s.start_full()
            elif kind == "start-empty":
                s.start_empty()
            elif kind == "start-topk":
                if k is None or float(k) != int(k) or k < 0:
                    raise ApexlensError("top-k needs a whole number of edges >= 0")
                s.start_top_k(method, int(k))
            elif kind == "start-discover":
                s.start_discover(None if threshold in (None, "") else float(threshold), method)
            elif kind == "upload":
                s.load_json(_decode_upload(value, filename), filename or "upload")
            elif kind in ("edge-add", "edge-text"):
                s.add_text(text or "")
            elif kind == "edge-remove":
                s.remove_text(text or "")
            elif kind == "heat-qkv":
                sender, receiver = qkv_cell(value, head)
                name = f"{sender}->{receiver}"
                if name in s.edges:
                    s.last_note = f"{name} is already in the hypothesis"
                else:
                    s.add_text(name)
            elif kind == "add-logits-edge":
                if not head:
                    raise PreventUpdate
                s.add_text(f"{head}->logits")
            else:
                raise PreventUpdate
        except PreventUpdate:
            raise
        except Exception as e:  # nothing crashes the server: the message says what went wrong
            msg, cls = _fail(e)
            return (
                *([no_update] * 7),
                msg,
                cls,
                no_update,
                None if kind == "upload" else no_update,
            )
        note = s.last_note
        return (
            *render_numbers(s, s.current),
            note,
            "wb-msg note" if note else "wb-msg empty",
            (version or 0) + 1,
            None if kind == "upload" else no_update,
        )

    @app.callback(
        Output("message", "className", allow_duplicate=True),
        Input("message", "n_clicks"),
        prevent_initial_call=True,
    )
    def dismiss(_n: int) -> str:
        return "wb-msg empty"

    # ------------------------------------------------------------------ circuit view
    @app.callback(
        Output("circuit", "children"),
        Output("circuit-caption", "children"),
        Input("version", "data"),
        Input("scope", "value"),
        Input("auto-weigh", "value"),
        Input("weigh", "n_clicks"),
    )
    def render_circuit(
        version: int, scope: str, auto: list[str], weigh: int | None
    ) -> tuple[Any, str]:
        with session.lock:
            weights = session.weights_cached()
            note = ""
            try:
                asked = ctx.triggered_id == "weigh"
                quick = session.estimated_weight_seconds() <= AUTO_WEIGH_SECONDS
                if (
                    weights is None
                    and session.edges
                    and (asked or ("on" in (auto or []) and quick))
                ):
                    weights = session.weights()
                elif weights is None and session.edges and "on" in (auto or []):
                    note = f" Edges not weighed automatically (about {session.estimated_weight_seconds():.0f} s): press 'weigh now'."
            except Exception as e:
                note = " Weighing failed: " + _fail(e)[0]
            canvas, caption = circuit_view(session, scope or None, weights)
            return canvas, caption + note

    # ------------------------------------------------------------------ history and comparison
    @app.callback(
        Output("pick-a", "data"),
        Output("pick-b", "data"),
        Input({"type": "pick-a", "id": ALL}, "n_clicks"),
        Input({"type": "pick-b", "id": ALL}, "n_clicks"),
        prevent_initial_call=True,
    )
    def pick(_a: Any, _b: Any) -> tuple[Any, Any]:
        trig = ctx.triggered_id
        value = ctx.triggered[0]["value"] if ctx.triggered else None
        if not isinstance(trig, dict) or not value:
            raise PreventUpdate
        if trig["type"] == "pick-a":
            return int(trig["id"]), no_update
        return no_update, int(trig["id"])

    @app.callback(
        Output("history", "children"),
        Output("compare", "children"),
        Input("version", "data"),
        Input("pick-a", "data"),
        Input("pick-b", "data"),
    )
    def render_history(version: int, a: int | None, b: int | None) -> tuple[Any, Any]:
        with session.lock:
            entries = list(session.history)
            cur = session.current.id
            if a is None or b is None:
                ids = [e.id for e in entries]
                others = [i for i in ids if i != cur]
                a = a if a is not None else (others[-1] if others else cur)
                b = b if b is not None else cur
            head = html.Tr(
                [
                    html.Th("#"),
                    html.Th("how", className="l"),
                    html.Th("edges"),
                    html.Th("recovery"),
                    html.Th("explained"),
                    html.Th(""),
                ]
            )
            rows = []
            for e in reversed(entries[-200:]):
                cls = " ".join(
                    c
                    for c, on in (("cur", e.id == cur), ("pa", e.id == a), ("pb", e.id == b))
                    if on
                )
                rows.append(
                    html.Tr(
                        [
                            html.Td(str(e.id)),
                            html.Td(
                                e.label if len(e.label) <= 48 else e.label[:46] + "…",
                                className="l",
                                title=e.label,
                            ),
                            html.Td(str(e.n_edges)),
                            html.Td(fmt(e.recovery)[:7]),
                            html.Td(fmt(e.explained)[:7]),
                            html.Td(
                                [
                                    html.Button(
                                        "restore",
                                        id={"type": "restore", "id": str(e.id)},
                                        n_clicks=0,
                                        disabled=e.id == cur,
                                    ),
                                    html.Button(
                                        "A",
                                        id={"type": "pick-a", "id": str(e.id)},
                                        n_clicks=0,
                                        title="compare as A",
                                    ),
                                    html.Button(
                                        "B",
                                        id={"type": "pick-b", "id": str(e.id)},
                                        n_clicks=0,
                                        title="compare as B",
                                    ),
                                ]
                            ),
                        ],
                        className=cls,
                        **_data(entry=str(e.id)),
                    )
                )
            table = html.Div(
                html.Table([html.Thead(head), html.Tbody(rows)], className="wb-table"),
                style={"maxHeight": "260px", "overflow": "auto"},
            )
            return table, _compare(session, a, b)

    def _compare(s: Session, a: int, b: int) -> Any:
        try:
            c = s.compare(a, b)
        except ApexlensError as e:
            return html.Div(str(e), className="wb-msg error")
        ea, eb = c["a"], c["b"]

        def row(name: str, x: float, y: float, key: str) -> Any:
            return html.Tr(
                [
                    html.Td(name, className="l"),
                    html.Td(fmt(x), id=f"compare-{key}-a"),
                    html.Td(fmt(y), id=f"compare-{key}-b"),
                    html.Td(fmt(y - x) if not (math.isnan(x) or math.isnan(y)) else "nan"),
                ]
            )

        def edges(title: str, names: list[str], key: str) -> Any:
            items = [html.Li(n) for n in names[:300]]
            if len(names) > 300:
                items.append(html.Li(f"… and {len(names) - 300} more"))
            return html.Div(
                [html.B(f"{title} ({len(names)})"), html.Ul(items, id=f"compare-only-{key}")]
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
                        row("recovery", ea.recovery, eb.recovery, "recovery"),
                        row("proportion explained", ea.explained, eb.explained, "explained"),
                        row("metric (mean)", ea.metric, eb.metric, "metric"),
                        html.Tr(
                            [
                                html.Td("edges", className="l"),
                                html.Td(str(ea.n_edges)),
                                html.Td(str(eb.n_edges)),
                                html.Td(f"{eb.n_edges - ea.n_edges:+d}"),
                            ]
                        ),
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
                    [edges("only in A", c["only_a"], "a"), edges("only in B", c["only_b"], "b")],
                    className="wb-cmp",
                ),
                html.Div(f"{c['common']} edges in both", className="wb-hint"),
            ],
            id="compare-result",
        )

    # ------------------------------------------------------------------ path contributions
    @app.callback(
        Output("heat-logits", "figure"),
        Output("heat-logits", "style"),
        Input("heat-go", "n_clicks"),
        prevent_initial_call=True,
    )
    def heat_logits(_n: int) -> tuple[Any, Any]:
        try:
            res = session.path_contributions("logits")
        except Exception as e:
            _report(e)
            raise PreventUpdate from None
        return figures.heads_to_logits(res), {"display": "block"}

    @app.callback(
        Output("heat-qkv", "figure"),
        Output("heat-qkv", "style"),
        Output("drill", "figure"),
        Output("drill", "style"),
        Output("sel-head", "data"),
        Output("heat-head-text", "children"),
        Output("add-logits-edge", "children"),
        Output("add-logits-edge", "style"),
        Input("heat-logits", "clickData"),
        Input("heat-qkv", "clickData"),
        State("sel-head", "data"),
        prevent_initial_call=True,
    )
    def heat_select(click_logits: Any, click_qkv: Any, head: str | None) -> tuple[Any, ...]:
        try:
            return _heat_select(click_logits, click_qkv, head)
        except PreventUpdate:
            raise
        except Exception as e:
            _report(e)
            raise PreventUpdate from None

    def _heat_select(click_logits: Any, click_qkv: Any, head: str | None) -> tuple[Any, ...]:
        shown = {"display": "block"}
        if ctx.triggered_id == "heat-logits" and click_logits:
            pt = click_logits["points"][0]
            head = f"{int(pt['y'])}.{int(pt['x'])}"
            res = session.path_contributions("logits")
            return (
                figures.heads_to_qkv(session, head),
                shown,
                figures.drill_figure(session, res, head, "logits"),
                shown,
                head,
                f"head {head} selected:",
                f"add {head} → logits",
                {"display": "inline-block"},
            )
        if ctx.triggered_id == "heat-qkv" and click_qkv:
            sender, receiver = qkv_cell(click_qkv, head)
            if int(sender.split(".")[0]) >= int(receiver.split(".")[0]):
                raise PreventUpdate
            res = session.path_contributions(receiver)
            drill = figures.drill_figure(session, res, sender, receiver)
            return no_update, no_update, drill, shown, no_update, no_update, no_update, no_update
        raise PreventUpdate

    # ------------------------------------------------------------------ export
    @app.callback(
        Output("download", "data"),
        Input("export-json", "n_clicks"),
        Input("export-figures", "n_clicks"),
        Input("export-snapshot", "n_clicks"),
        prevent_initial_call=True,
    )
    def export(_j: Any, _f: Any, _s: Any) -> Any:
        try:
            return _export(ctx.triggered_id)
        except PreventUpdate:
            raise
        except Exception as e:
            _report(e)
            raise PreventUpdate from None

    def _export(trig: Any) -> Any:
        if trig == "export-json":
            return dcc.send_string(session.to_json(), "hypothesis.json")
        if trig == "export-figures":
            return dcc.send_string(figures_html(session), "workbench-figures.html")
        if trig == "export-snapshot":
            return dcc.send_string(session.snapshot_html(), "workbench-snapshot.html")
        raise PreventUpdate

    return app


def _data(**attrs: str) -> dict[str, Any]:
    """``data-*`` attributes for a Dash component (``_data(entry="3")``)."""
    return {f"data-{k}": v for k, v in attrs.items()}


def qkv_cell(click: dict[str, Any], head: str | None) -> tuple[str, str]:
    """``(sender, receiver)`` of a clicked cell of the heads -> q/k/v heatmaps (one
    heatmap per channel: the trace number is the channel; x the head, y the layer)."""
    if not head:
        raise ApexlensError("select a head in the heads -> logits heatmap first")
    pt = click["points"][0]
    channel = "qkv"[int(pt.get("curveNumber", 0))]
    return f"{int(pt['y'])}.{int(pt['x'])}", f"{head}.{channel}"


def figures_html(session: Session) -> str:
    """The view's figures (circuit graph, per-example spread, path contributions computed
    so far) in one self-contained HTML file."""
    with session.lock:
        figs = [
            figures.circuit_figure(session, session.weights_cached()),
            figures.spread_figure(session.current),
        ]
        if "logits" in session._paths:
            figs.append(figures.heads_to_logits(session._paths["logits"], title="heads → logits"))
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>apexlens workbench figures</title></head><body>"
        ]
        for i, f in enumerate(figs):
            parts.append(f.to_html(full_html=False, include_plotlyjs=i == 0))
        parts.append("</body></html>")
        return "\n".join(parts)


def _decode_upload(contents: str, filename: str | None) -> str:
    """The text of a ``dcc.Upload`` data URL (decoded in memory; never unpickled)."""
    name = filename or "upload"
    try:
        _, b64 = contents.split(",", 1)
        raw = base64.b64decode(b64, validate=False)
        return raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise ApexlensError(f"{name}: not a UTF-8 text file (expected a circuit JSON)") from None


# ============================================================================ serving
class Server:
    """A running workbench: ``.url``, ``.stop()``."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self._srv = make_server(host, port, app.server, threaded=True)
        self.host, self.port = host, int(self._srv.server_port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"
        self._thread = threading.Thread(
            target=self._srv.serve_forever, name="apexlens-workbench", daemon=True
        )

    def start(self) -> Server:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._srv.serve_forever()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


def serve(
    session: Session,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    open_browser: bool = False,
    background: bool = True,
    quiet: bool = True,
) -> Server:
    """Serve the workbench with werkzeug (no debugger, no reloader). ``port=0`` picks a
    free port. ``background``: in a daemon thread (returns at once); else blocks."""
    import logging

    if quiet:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = make_app(session)
    try:
        server = Server(app, host, port)
    except OSError as e:
        raise ApexlensError(
            f"cannot serve on {host}:{port} ({e.strerror or e}); pick another --port (0: any free one)"
        ) from None
    session.server = server  # type: ignore[attr-defined]
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    if background:
        return server.start()
    server.serve_forever()
    return server
