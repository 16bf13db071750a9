"""The page's callbacks, registered by one function per panel:

* :func:`register_changes` -- every change of the hypothesis (an edge or node click,
  undo/redo, a starting point, a file, the edge box, a heatmap cell: :data:`ACTIONS`) and
  the numbers it shows (``#recovery``, ``#explained``), which the session took from
  ``Experiment.evaluate_circuit``'s engine;
* :func:`register_circuit` -- the circuit view (weighing the edges first when that is quick
  or asked);
* :func:`register_history` -- the history and the side-by-side comparison;
* :func:`register_paths` -- path contributions (heads -> logits, heads -> a head's q/k/v,
  per example);
* :func:`register_export` -- the hypothesis JSON, the figures, the HTML snapshot.

**Errors.** A callback catches what bad input can raise (:data:`INPUT_ERRORS`: apexlens'
own error, undecodable files, malformed values and click data) and shows it in the page's
message box; the session is unchanged (a failed change is rolled back). Anything else is a
bug: it is not caught here, Dash answers that one request with an error (logged with its
traceback) and the server and the page go on working.
"""

from __future__ import annotations

import json
from typing import Any

from dash import ALL, Input, Output, State, ctx, dcc, no_update, set_props
from dash.exceptions import PreventUpdate

from apexlens import ApexlensError
from apexlens.ui.workbench import figures
from apexlens.ui.workbench.actions import ACTIONS, Form, qkv_cell
from apexlens.ui.workbench.render import compare_panel, default_pair, history_table, render_numbers
from apexlens.ui.workbench.session import Session
from apexlens.ui.workbench.view import circuit_view

INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ApexlensError,
    json.JSONDecodeError,
    UnicodeDecodeError,
    ValueError,
    LookupError,  # KeyError, IndexError: malformed click data
    TypeError,
)
"""What a callback can meet from bad input; shown in the page (module docstring)."""
AUTO_WEIGH_SECONDS = 1.0


def message_of(e: BaseException) -> str:
    if isinstance(e, ApexlensError):
        return str(e)
    return f"bad input ({type(e).__name__}: {e}); nothing was changed"


def show_error(e: BaseException, n_outputs: int) -> tuple[Any, ...]:
    """Show an error of a callback that does not own the message box; returns its outputs,
    all unchanged (not ``PreventUpdate``, which would drop the message with the response)."""
    set_props("message", {"children": message_of(e), "className": "wb-msg error"})
    return (no_update,) * n_outputs


def _triggered() -> tuple[Any, Any]:
    """The trigger's id and value; ``PreventUpdate`` when nothing was clicked (a component
    appearing fires its callbacks with ``n_clicks`` 0 or ``None``)."""
    trig = ctx.triggered_id
    value = ctx.triggered[0]["value"] if ctx.triggered else None
    if trig is None or value in (None, 0, []):
        raise PreventUpdate
    return trig, value


def register_changes(app: Any, session: Session) -> None:
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
        *(Input(i, "n_clicks") for i in ("undo", "redo", "start-full", "start-empty")),
        *(Input(i, "n_clicks") for i in ("start-topk", "start-discover")),
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
    def change(*args: Any) -> tuple[Any, ...]:
        trig, value = _triggered()
        scope, method, k, threshold, text, filename, head, version = args[-8:]
        kind = trig["type"] if isinstance(trig, dict) else trig
        if kind not in ACTIONS:
            raise PreventUpdate
        clear_upload = None if kind == "upload" else no_update
        form = Form(scope, method, k, threshold, text, filename, head)
        try:
            ACTIONS[kind](session, trig, value, form)
        except INPUT_ERRORS as e:  # shown in the page; the session is unchanged
            return (*([no_update] * 7), message_of(e), "wb-msg error", no_update, clear_upload)
        with session.lock:
            note = session.last_note
            numbers = render_numbers(session, session.current)
        shown = "wb-msg note" if note else "wb-msg empty"
        return (*numbers, note, shown, (version or 0) + 1, clear_upload)

    @app.callback(
        Output("message", "className", allow_duplicate=True),
        Input("message", "n_clicks"),
        prevent_initial_call=True,
    )
    def dismiss(_n: int) -> str:
        return "wb-msg empty"


def register_circuit(app: Any, session: Session) -> None:
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
            weights, note = session.weights_cached(), ""
            wanted = weights is None and bool(session.edges)
            auto_on = "on" in (auto or [])
            seconds = session.estimated_weight_seconds()
            try:
                if wanted and (
                    ctx.triggered_id == "weigh" or (auto_on and seconds <= AUTO_WEIGH_SECONDS)
                ):
                    weights = session.weights()
                elif wanted and auto_on:
                    note = f" Edges not weighed automatically (about {seconds:.0f} s): press 'weigh now'."
            except INPUT_ERRORS as e:
                note = " Weighing failed: " + message_of(e)
            canvas, caption = circuit_view(session, scope or None, weights)
            return canvas, caption + note


def register_history(app: Any, session: Session) -> None:
    @app.callback(
        Output("pick-a", "data"),
        Output("pick-b", "data"),
        Input({"type": "pick-a", "id": ALL}, "n_clicks"),
        Input({"type": "pick-b", "id": ALL}, "n_clicks"),
        prevent_initial_call=True,
    )
    def pick(_a: Any, _b: Any) -> tuple[Any, Any]:
        trig, _ = _triggered()
        if not isinstance(trig, dict):
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
            a, b = default_pair(session, a, b)
            return history_table(session, a, b), compare_panel(session, a, b)


def register_paths(app: Any, session: Session) -> None:
    @app.callback(
        Output("heat-logits", "figure"),
        Output("heat-logits", "style"),
        Input("heat-go", "n_clicks"),
        prevent_initial_call=True,
    )
    def heads_to_logits(_n: int) -> tuple[Any, Any]:
        try:
            res = session.path_contributions("logits")
        except INPUT_ERRORS as e:
            return show_error(e, 2)
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
    def select(click_logits: Any, click_qkv: Any, head: str | None) -> tuple[Any, ...]:
        try:
            if ctx.triggered_id == "heat-logits" and click_logits:
                return _select_head(session, click_logits)
            if ctx.triggered_id == "heat-qkv" and click_qkv:
                return _select_cell(session, click_qkv, head)
        except INPUT_ERRORS as e:
            return show_error(e, 8)
        raise PreventUpdate


def _select_head(session: Session, click: Any) -> tuple[Any, ...]:
    """A head clicked in heads -> logits: its q/k/v heatmaps and its per-example drill-down."""
    pt = click["points"][0]
    head = f"{int(pt['y'])}.{int(pt['x'])}"
    res = session.path_contributions("logits")
    shown = {"display": "block"}
    drill = figures.drill_figure(session, res, head, "logits")
    qkv = figures.heads_to_qkv(session, head)
    return (
        qkv,
        shown,
        drill,
        shown,
        head,
        f"head {head} selected:",
        f"add {head} → logits",
        {"display": "inline-block"},
    )


def _select_cell(session: Session, click: Any, head: str | None) -> tuple[Any, ...]:
    """A cell clicked in heads -> q/k/v: that path's per-example drill-down."""
    sender, receiver = qkv_cell(click, head)
    if int(sender.split(".")[0]) >= int(receiver.split(".")[0]):
        raise PreventUpdate  # an empty cell (a head of the same or a later layer)
    drill = figures.drill_figure(session, session.path_contributions(receiver), sender, receiver)
    return no_update, no_update, drill, {"display": "block"}, *([no_update] * 4)


def register_export(app: Any, session: Session) -> None:
    files = {
        "export-json": (session.to_json, "hypothesis.json"),
        "export-figures": (lambda: figures.figures_html(session), "workbench-figures.html"),
        "export-snapshot": (session.snapshot_html, "workbench-snapshot.html"),
    }

    @app.callback(
        Output("download", "data"),
        *(Input(i, "n_clicks") for i in files),
        prevent_initial_call=True,
    )
    def export(*_clicks: Any) -> Any:
        if ctx.triggered_id not in files:
            raise PreventUpdate
        make, name = files[ctx.triggered_id]
        try:
            return dcc.send_string(make(), name)
        except INPUT_ERRORS as e:
            return show_error(e, 1)[0]
