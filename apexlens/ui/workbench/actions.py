"""Every way the page changes the hypothesis, as a table: the id of the control that fired
-> one :class:`~apexlens.ui.workbench.session.Session` call.

The Dash callback (:func:`apexlens.ui.workbench.callbacks.register_changes`) looks the
trigger up in :data:`ACTIONS` and calls it with the trigger's id, its value and the page's
:class:`Form` (the inputs a change reads). Plain Python: an action raises
:class:`ApexlensError` for input it cannot take, and the callback shows that in the page.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apexlens import ApexlensError
from apexlens.ui.workbench.session import Session


@dataclass(frozen=True)
class Form:
    """The page's inputs a change reads (the callback's states)."""

    scope: str | None = None
    method: str = "eap-ig"
    k: Any = None
    threshold: Any = None
    text: str | None = None
    filename: str | None = None
    head: str | None = None


Action = Callable[[Session, Any, Any, Form], object]


def decode_upload(contents: str, filename: str | None) -> str:
    """The text of a ``dcc.Upload`` data URL (decoded in memory; never unpickled)."""
    name = filename or "upload"
    try:
        _, b64 = contents.split(",", 1)
        return base64.b64decode(b64, validate=False).decode("utf-8")
    except (ValueError, binascii.Error):  # no comma, bad base64, not UTF-8
        raise ApexlensError(f"{name}: not a UTF-8 text file (expected a circuit JSON)") from None


def qkv_cell(click: dict[str, Any], head: str | None) -> tuple[str, str]:
    """``(sender, receiver)`` of a clicked cell of the heads -> q/k/v heatmaps (one
    heatmap per channel: the trace number is the channel; x the head, y the layer)."""
    if not head:
        raise ApexlensError("select a head in the heads -> logits heatmap first")
    pt = click["points"][0]
    channel = "qkv"[int(pt.get("curveNumber", 0))]
    return f"{int(pt['y'])}.{int(pt['x'])}", f"{head}.{channel}"


def _top_k(s: Session, trig: Any, value: Any, form: Form) -> object:
    try:
        whole = form.k is not None and float(form.k) == int(form.k) and form.k >= 0
    except (TypeError, ValueError, OverflowError):  # text, NaN, infinity
        whole = False
    if not whole:
        raise ApexlensError("top-k needs a whole number of edges >= 0")
    return s.start_top_k(form.method, int(form.k))


def _discover(s: Session, trig: Any, value: Any, form: Form) -> object:
    threshold = None if form.threshold in (None, "") else float(form.threshold)
    return s.start_discover(threshold, form.method)


def _heatmap_cell(s: Session, trig: Any, value: Any, form: Form) -> object:
    sender, receiver = qkv_cell(value, form.head)
    name = f"{sender}->{receiver}"
    if name in s.edges:
        s.last_note = f"{name} is already in the hypothesis"
        return s.current
    return s.add_text(name)


def _head_to_logits(s: Session, trig: Any, value: Any, form: Form) -> object:
    if not form.head:
        raise ApexlensError("select a head in the heads -> logits heatmap first")
    return s.add_text(f"{form.head}->logits")


ACTIONS: dict[str, Action] = {
    "edge": lambda s, trig, v, f: s.toggle_edge(trig["edge"]),
    "node": lambda s, trig, v, f: s.toggle_node(trig["node"], at=f.scope or None),
    "restore": lambda s, trig, v, f: s.restore(int(trig["id"])),
    "undo": lambda s, trig, v, f: s.undo(),
    "redo": lambda s, trig, v, f: s.redo(),
    "start-full": lambda s, trig, v, f: s.start_full(),
    "start-empty": lambda s, trig, v, f: s.start_empty(),
    "start-topk": _top_k,
    "start-discover": _discover,
    "upload": lambda s, trig, v, f: s.load_json(
        decode_upload(v, f.filename), f.filename or "upload"
    ),
    "edge-add": lambda s, trig, v, f: s.add_text(f.text or ""),
    "edge-text": lambda s, trig, v, f: s.add_text(f.text or ""),
    "edge-remove": lambda s, trig, v, f: s.remove_text(f.text or ""),
    "heat-qkv": _heatmap_cell,
    "add-logits-edge": _head_to_logits,
}
"""Trigger -> change: ``(session, trigger id, trigger value, form)``; the trigger id is a
string, or a dict for the pattern-matching ids of edges, nodes and history rows."""
