"""The workbench's state, in plain Python (no Dash): one :class:`Session` per server.

A session holds an :class:`apexlens.Experiment` (clean and corrupted runs cached once), the
*edge universe* (every edge of ``apexlens.full_graph``, spelled ``"SENDER->RECEIVER"`` in
apexlens' node names: ``"0.1->1.3.k"``, ``"embed->logits"``, ``"0.1@end->1.3.k@end"``), the
current hypothesis (a set of edge names), undo/redo stacks and the history of every
hypothesis evaluated. Every change is evaluated at once by ``Experiment.evaluate_circuit``
-- the numbers shown are that call's, not an approximation -- and a change whose evaluation
fails is rolled back, so the current hypothesis always has numbers.

The Dash app (:mod:`apexlens.ui.workbench.app`) is a thin view over this class; tests drive
it directly. All public methods hold one lock (the server is threaded; one user).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import apexlens
from apexlens import ApexlensError
from apexlens.ui.workbench import engine

SEP = "->"
METHODS = ("exact", "eap", "eap-ig")
MAX_JSON_BYTES = 20_000_000
_MIB_HEAD = re.compile(r"^a(\d+)\.h(\d+)(?:<([qkv])>)?$")
_MIB_MLP = re.compile(r"^m(\d+)$")


def edge_name(sender: str, receiver: str) -> str:
    return f"{sender}{SEP}{receiver}"


def split_edge(name: str) -> tuple[str, str]:
    s, _, r = name.partition(SEP)
    return s, r


def _base(spelling: str) -> str:
    return spelling.split("@", 1)[0]


def _at(spelling: str) -> str | None:
    return spelling.split("@", 1)[1] if "@" in spelling else None


def _owner(receiver: str) -> str:
    """The component a receiver belongs to: ``"1.3.k"`` -> ``"1.3"``."""
    parts = receiver.split(".")
    return ".".join(parts[:2]) if len(parts) == 3 else receiver


@dataclass(frozen=True)
class Entry:
    """One evaluated hypothesis: its edges and the numbers of ``evaluate_circuit``."""

    id: int
    label: str
    edges: frozenset[str]
    recovery: float
    explained: float
    metric: float
    sem: float
    clean: float
    ablated: float
    per_example: tuple[float, ...]
    clean_per_example: tuple[float, ...]
    ablated_per_example: tuple[float, ...]
    seconds: float
    result: Any = field(default=None, compare=False, repr=False)

    @property
    def n_edges(self) -> int:
        return len(self.edges)


class Session:
    """A circuit-hypothesis session on one Experiment (see the module docstring).

    Args:
        experiment: the :class:`apexlens.Experiment` (its metric is the one reported).
        ablation: what an edge outside the hypothesis carries (``"resample"``, ``"mean"``,
            ``"zero"``), as for ``evaluate_circuit``.
        start: ``"full"`` (every edge), ``"empty"``, or edges; default: the full graph when
            it has at most 400 edges, else nothing.
        task, batch: where the data came from (token labels in the drill-down, the title).
        title: shown in the page and the snapshot.
    """

    def __init__(
        self,
        experiment: apexlens.Experiment,
        *,
        ablation: str = "resample",
        start: str | Iterable[Any] | None = None,
        task: Any = None,
        batch: Any = None,
        title: str = "",
    ) -> None:
        if not isinstance(experiment, apexlens.Experiment):
            raise ApexlensError(
                f"a workbench session needs an apexlens.Experiment, got {type(experiment).__name__}"
            )
        if ablation not in ("resample", "mean", "zero"):
            raise ApexlensError(f"ablation must be resample, mean or zero, got {ablation!r}")
        self.exp = experiment
        self.ablation = ablation
        self.task = task
        self.batch = batch
        self.title = title or "apexlens workbench"
        self.lock = threading.RLock()
        pairs = [(str(s), str(r)) for s, r in apexlens.full_graph(experiment.model)]
        self.universe: list[str] = [edge_name(s, r) for s, r in pairs]
        self._rank = {e: i for i, e in enumerate(self.universe)}
        self.senders: list[str] = list(dict.fromkeys(s for s, _ in pairs))
        self.receivers: list[str] = list(dict.fromkeys(r for _, r in pairs))
        heads = [apexlens.parse_node(s) for s in self.senders if s[0].isdigit()]
        self.n_layers = 1 + max((n.layer for n in heads), default=-1)
        self.n_heads = 1 + max((int(n.head or 0) for n in heads), default=-1)
        self.has_mlps = any(s.startswith("m") for s in self.senders)
        self.position_names, self.varying_positions = self._shared_positions()
        self._edges: frozenset[str] = frozenset()
        self._undo: list[tuple[frozenset[str], str]] = []
        self._redo: list[tuple[frozenset[str], str]] = []
        self.history: list[Entry] = []
        self._by_edges: dict[frozenset[str], Entry] = {}
        self._weights: dict[frozenset[str], dict[str, float]] = {}
        self._scores: dict[str, Any] = {}
        self._paths: dict[str, Any] = {}
        self.last_note = ""
        self._row_seconds: float | None = None
        if start is None:
            start = "full" if len(self.universe) <= 400 else "empty"
        if start == "full":
            edges, label = frozenset(self.universe), "full graph"
        elif start == "empty":
            edges, label = frozenset(), "nothing"
        else:
            edges, label = frozenset(self._normalize_all(start)), "start"  # type: ignore[arg-type]
        self._edges = edges
        self.current = self._evaluate(label)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        model: Any,
        task: Any,
        *,
        n: int = 32,
        seed: int = 0,
        ablation: str = "resample",
        start: str | Iterable[Any] | None = None,
        title: str = "",
    ) -> Session:
        """A session on ``task.batch(n, seed=seed)`` (``task``: a task object or name) with
        the task's logit-difference metric and named positions -- the batch a script gets
        from ``apexlens.get_task(task).batch(n, seed=seed)``."""
        if isinstance(task, str):
            task = apexlens.get_task(task)
        if n < 1:
            raise ApexlensError("n must be at least 1")
        batch = task.batch(n, seed=seed)
        exp = apexlens.Experiment(
            model,
            batch.clean_tokens,
            batch.corrupted_tokens,
            metric=batch.logit_diff(),
            positions=batch.named_positions,
        )
        return cls(exp, ablation=ablation, start=start, task=task, batch=batch, title=title)

    def _shared_positions(self) -> tuple[list[str], list[str]]:
        shared, varying = [], []
        for name, value in self.exp.named_positions.items():
            v = torch.as_tensor(value)
            if v.ndim == 0 or (v.ndim == 1 and bool((v == v.flatten()[0]).all())):
                shared.append(name)
            else:
                varying.append(name)
        return shared, varying

    # ------------------------------------------------------------------ reading state
    @property
    def edges(self) -> frozenset[str]:
        """The current hypothesis (edge names)."""
        return self._edges

    def edge_pairs(self, edges: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """``(sender, receiver)`` pairs in graph order, as ``evaluate_circuit`` takes them."""
        return [split_edge(e) for e in self.sorted(self._edges if edges is None else edges)]

    def sorted(self, edges: Iterable[str]) -> list[str]:
        def key(e: str) -> tuple[int, str]:
            s, r = split_edge(e)
            return self._rank.get(edge_name(_base(s), _base(r)), len(self._rank)), e

        return sorted(edges, key=key)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def entry(self, entry_id: int) -> Entry:
        for e in self.history:
            if e.id == entry_id:
                return e
        raise ApexlensError(f"no hypothesis #{entry_id} in the history")

    # ------------------------------------------------------------------ edge names
    def parse_edges(self, text: str) -> list[str]:
        """Edge names from text: ``"0.1->1.3.k, embed->1.3.q"`` (commas, semicolons or new
        lines between edges). A receiver ``"1.3"`` means its q, k and v."""
        parts = [p.strip() for p in re.split(r"[,;\n]+", text) if p.strip()]
        if not parts:
            raise ApexlensError("no edge given: write SENDER->RECEIVER, e.g. 0.1->1.3.k")
        out: list[str] = []
        for p in parts:
            if SEP not in p:
                raise ApexlensError(
                    f"{p!r} is not an edge: write SENDER->RECEIVER, e.g. 0.1->1.3.k"
                )
            s, r = (x.strip() for x in p.split(SEP, 1))
            out += self.normalize_edge(s, r)
        return out

    def normalize_edge(self, sender: Any, receiver: Any) -> list[str]:
        """Check one ``(sender, receiver)`` pair against this model and spell it the way the
        session does (one name per receiver channel)."""
        text = f"{sender} -> {receiver}"
        try:
            s = apexlens.parse_node(sender)
            r = apexlens.parse_node(receiver)
        except ApexlensError as e:
            raise ApexlensError(f"edge {text}: {e}") from None
        if s.kind in ("tok_embed", "pos_embed") or r.kind in ("tok_embed", "pos_embed"):
            raise ApexlensError(
                f"edge {text}: the workbench uses 'embed' (tok_embed / pos_embed split edges are not supported here)"
            )
        if s.kind in ("logits", "resid") or (s.kind == "head" and s.channel is not None):
            raise ApexlensError(
                f"edge {text} cannot exist: {s.name} does not send (senders: embed, heads 'L.H', MLPs 'mL')"
            )
        if r.kind in ("embed", "resid"):
            raise ApexlensError(
                f"edge {text} cannot exist: {r.name} does not receive (receivers: 'L.H.q/k/v', 'mL', 'logits')"
            )
        ps, pr = s.positions, r.positions
        if ps is not None and pr is not None and ps != pr:
            raise ApexlensError(
                f"edge {text} joins different positions: a sender's output at a position reaches "
                "a receiver only at the same position (write the edge at one position, e.g. "
                f"{s.name}@{self._spell(pr)}->{r.name}@{self._spell(pr)})"
            )
        pos = ps if ps is not None else pr
        at = "" if pos is None else "@" + self._check_positions(pos, text)
        if r.kind == "head" and r.channel is None:
            receivers = [f"{r.name}.{c}" for c in "qkv"]
        else:
            receivers = [r.name]
        out = []
        for rn in receivers:
            base = edge_name(s.name, rn)
            if base not in self._rank:
                raise ApexlensError(f"edge {s.name} -> {rn} cannot exist: {self._why(s, rn)}")
            out.append(edge_name(s.name + at, rn + at))
        return out

    @staticmethod
    def _spell(pos: Any) -> str:
        return pos if isinstance(pos, str) else ",".join(str(p) for p in pos)

    def _check_positions(self, pos: Any, text: str) -> str:
        if isinstance(pos, str):
            if pos in self.varying_positions:
                raise ApexlensError(
                    f"edge {text}: position {pos!r} differs between examples; an edge can only be "
                    f"restricted to positions every example shares ({', '.join(self.position_names) or 'none named'}, or numbers)"
                )
            if pos not in self.position_names:
                known = ", ".join(self.position_names) or "none were given"
                raise ApexlensError(f"edge {text}: unknown position name {pos!r} (known: {known})")
            return pos
        n = self.exp.n_pos
        for p in pos:
            if not -n <= int(p) < n:
                raise ApexlensError(f"edge {text}: position {p} is out of range for {n} tokens")
        return self._spell(pos)

    def _why(self, s: Any, rn: str) -> str:
        r = apexlens.parse_node(rn)
        for node in (s, r):
            if node.kind == "head" and (
                node.layer >= self.n_layers or int(node.head or 0) >= self.n_heads
            ):
                return f"this model has {self.n_layers} layers of {self.n_heads} heads (no {node.name})"
            if node.kind == "mlp" and (not self.has_mlps or node.layer >= self.n_layers):
                return (
                    "this model has no MLPs"
                    if not self.has_mlps
                    else f"this model has {self.n_layers} layers (no {node.name})"
                )
        if s.kind == "head" and r.kind == "head" and s.layer == r.layer:
            return "heads of the same layer do not read each other's outputs"
        return f"it goes backwards: {rn} reads the residual stream before {s.name} writes to it"

    def _normalize_all(self, edges: Iterable[Any]) -> list[str]:
        out: list[str] = []
        for e in edges:
            if isinstance(e, str):
                out += self.parse_edges(e)
            else:
                try:
                    s, r = e
                except (TypeError, ValueError):
                    raise ApexlensError(
                        f"an edge is a (sender, receiver) pair or 'S->R', got {e!r}"
                    ) from None
                out += self.normalize_edge(s, r)
        return out

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, label: str) -> Entry:
        edges = self._edges
        if edges in self._by_edges:
            return self._by_edges[edges]
        t0 = time.perf_counter()
        # any order gives the same circuit (a set of edges); sorting 30k names is not free
        pairs = [split_edge(e) for e in edges]
        res = self.exp.evaluate_circuit(pairs, ablation=self.ablation)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            explained = float(res.proportion_explained)
        seconds = time.perf_counter() - t0

        def floats(t: Any) -> tuple[float, ...]:
            return tuple(float(x) for x in t.values.double().cpu())

        entry = Entry(
            id=len(self.history) + 1,
            label=label,
            edges=edges,
            recovery=float(res.recovery),
            explained=explained,
            metric=res.scores.mean,
            sem=res.scores.sem,
            clean=res.clean.mean,
            ablated=res.corrupted.mean,
            per_example=floats(res.scores),
            clean_per_example=floats(res.clean),
            ablated_per_example=floats(res.corrupted),
            seconds=seconds,
            result=res,
        )
        self.history.append(entry)
        self._by_edges[edges] = entry
        return entry

    def evaluate(self) -> Entry:
        """The current hypothesis' numbers (evaluated when it was set; cached)."""
        with self.lock:
            return self._evaluate("evaluate")

    def _change(self, edges: Iterable[str], label: str) -> Entry:
        with self.lock:
            new = frozenset(edges)
            if new == self._edges:
                self.last_note = f"{label}: no change"
                return self.current
            old = self._edges
            self._edges = new
            try:
                entry = self._evaluate(label)
            except Exception:
                self._edges = old
                raise
            self._undo.append((old, label))
            self._redo.clear()
            self.current = entry
            self.last_note = label
            return entry

    # ------------------------------------------------------------------ changes
    def toggle_edge(self, edge: str | tuple[str, str]) -> Entry:
        """Remove the edge if it is in the hypothesis, else add it (``"0.1->1.3.k"``)."""
        with self.lock:
            names = self._normalize_all([edge])
            if len(names) == 1 and names[0] in self._edges:
                return self._change(self._edges - {names[0]}, f"- {names[0]}")
            if all(n in self._edges for n in names):
                return self._change(self._edges - set(names), f"- {', '.join(names)}")
            return self._change(self._edges | set(names), f"+ {', '.join(names)}")

    def node_edges(self, node: str, at: str | None = None) -> list[str]:
        """Every edge of the universe touching ``node`` (a sender ``"0.1"``, a head as
        receiver through its q/k/v, a port ``"1.3.k"``, ``"m0"``, ``"embed"``, ``"logits"``),
        at positions ``at`` (``None``: all positions)."""
        name = apexlens.parse_node(node).name
        out = []
        for e in self.universe:
            s, r = split_edge(e)
            if s == name or r == name or _owner(r) == name:
                out.append(e if at is None else edge_name(f"{s}@{at}", f"{r}@{at}"))
        if not out:
            raise ApexlensError(f"node {node} has no edges in this model")
        return out

    def toggle_node(self, node: str, at: str | None = None) -> Entry:
        """Remove every hypothesis edge touching ``node`` (at ``at``: only those at that
        position); if there is none, add all of the node's edges (at ``at``)."""
        with self.lock:
            if at is not None:
                self._check_positions(
                    apexlens.parse_node(f"embed@{at}").positions, f"node {node}@{at}"
                )
            name = apexlens.parse_node(node).name
            candidates = self.node_edges(name, at)
            touching = set()
            for e in self._edges:
                s, r = split_edge(e)
                if at is not None and _at(s) != at:
                    continue
                bs, br = _base(s), _base(r)
                if bs == name or br == name or _owner(br) == name:
                    touching.add(e)
            where = f"@{at}" if at else ""
            if touching:
                return self._change(self._edges - touching, f"- node {name}{where}")
            return self._change(self._edges | set(candidates), f"+ node {name}{where}")

    def set_edges(self, edges: Iterable[Any], label: str = "set") -> Entry:
        """Replace the hypothesis (edge names or ``(sender, receiver)`` pairs; checked)."""
        with self.lock:
            return self._change(self._normalize_all(edges), label)

    def add_text(self, text: str) -> Entry:
        with self.lock:
            names = self.parse_edges(text)
            return self._change(self._edges | set(names), f"+ {', '.join(names)}")

    def remove_text(self, text: str) -> Entry:
        with self.lock:
            names = self.parse_edges(text)
            missing = [n for n in names if n not in self._edges]
            if len(missing) == len(names):
                raise ApexlensError(f"{', '.join(names)}: not in the hypothesis")
            return self._change(self._edges - set(names), f"- {', '.join(names)}")

    def undo(self) -> Entry:
        with self.lock:
            if not self._undo:
                raise ApexlensError("nothing to undo")
            edges, label = self._undo.pop()
            self._redo.append((self._edges, label))
            self._edges = edges
            self.current = self._evaluate(label)
            self.last_note = f"undid {label}"
            return self.current

    def redo(self) -> Entry:
        with self.lock:
            if not self._redo:
                raise ApexlensError("nothing to redo")
            edges, label = self._redo.pop()
            self._undo.append((self._edges, label))
            self._edges = edges
            self.current = self._evaluate(label)
            self.last_note = f"redid {label}"
            return self.current

    def restore(self, entry_id: int) -> Entry:
        """Make a hypothesis of the history the current one (undoable)."""
        with self.lock:
            e = self.entry(entry_id)
            return self._change(e.edges, e.label)

    # ------------------------------------------------------------------ starting points
    def start_full(self) -> Entry:
        return self.set_edges(self.universe, "full graph")

    def start_empty(self) -> Entry:
        return self.set_edges([], "nothing")

    def scores(self, method: str) -> Any:
        """``apexlens.attribute_edges`` over every edge (cached per method)."""
        if method not in METHODS:
            raise ApexlensError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        with self.lock:
            if method not in self._scores:
                self._scores[method] = apexlens.attribute_edges(
                    self.exp,
                    None,
                    None,
                    metric=engine.experiment_metric(self.exp),
                    method=method,  # type: ignore[arg-type]
                    ablation=self.ablation,  # type: ignore[arg-type]
                )
            return self._scores[method]

    def start_top_k(self, method: str, k: int) -> Entry:
        """The ``k`` edges with the largest ``|score|`` of an ``attribute_edges`` method."""
        if not isinstance(k, int) or k < 0:
            raise ApexlensError(f"k must be a whole number >= 0, got {k!r}")
        with self.lock:
            top = self.scores(method).top(min(k, len(self.universe)))
            return self.set_edges(top, f"top {k} by {method}")

    def start_discover(self, threshold: float | None = None, method: str = "eap-ig") -> Entry:
        """``apexlens.discover`` (greedy exact pruning, ordered by ``method``'s scores);
        ``threshold`` in metric units, default 2% of the clean-ablated gap."""
        with self.lock:
            gap = abs(self.current.clean - self.current.ablated)
            thr = 0.02 * gap if threshold is None else float(threshold)
            if not math.isfinite(thr) or thr < 0:
                raise ApexlensError(f"threshold must be a number >= 0, got {threshold!r}")
            found = apexlens.discover(
                self.exp,
                None,
                None,
                metric=engine.experiment_metric(self.exp),
                threshold=thr,
                order=self.scores(method),
                ablation=self.ablation,  # type: ignore[arg-type]
            )
            return self.set_edges(found.edges, f"discover (threshold {thr:.3g}, {method} order)")

    # ------------------------------------------------------------------ files
    def load_json(self, text: str | bytes, filename: str = "JSON") -> Entry:
        """Load a hypothesis from an apexlens circuit JSON (``Circuit.save``'s format) or an
        EAP-IG / MIB graph JSON (the edges marked ``in_graph``). Parsed with ``json.loads``
        only; a bad file raises :class:`ApexlensError` and changes nothing."""
        with self.lock:
            if len(text) > MAX_JSON_BYTES:
                raise ApexlensError(f"{filename}: larger than {MAX_JSON_BYTES // 1_000_000} MB")
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                where = (
                    f" (line {e.lineno}, column {e.colno})"
                    if isinstance(e, json.JSONDecodeError)
                    else ""
                )
                raise ApexlensError(
                    f"{filename} is not valid JSON{where}: it is neither an apexlens circuit nor a MIB graph"
                ) from None
            note = ""
            if isinstance(obj, dict) and "format" in obj:
                pairs, ablation = engine.circuit_from_json(obj)
                if ablation != self.ablation:
                    note = f" (saved with {ablation} ablation; this session evaluates with {self.ablation})"
                kind = "circuit"
            elif isinstance(obj, dict) and isinstance(obj.get("edges"), dict):
                pairs = mib_edges(obj)
                kind = "MIB graph"
            else:
                raise ApexlensError(
                    f"{filename}: not a circuit file -- expected an apexlens circuit "
                    '({"format": "apexlens.circuit", "version": 1, "edges": [["0.1", "1.3.k"], ...]}) '
                    'or an EAP-IG/MIB graph ({"edges": {"a0.h1->a1.h3<k>": {"in_graph": true, ...}}})'
                )
            try:
                names = self._normalize_all(pairs)
            except ApexlensError as e:
                raise ApexlensError(f"{filename}: {e}") from None
            entry = self._change(names, f"loaded {kind} {filename}")
            self.last_note = f"loaded {len(set(names))} edges from {filename}{note}"
            return entry

    def to_json(self) -> str:
        """The current hypothesis as an apexlens circuit JSON."""
        with self.lock:
            return engine.circuit_to_json(self.edge_pairs(), self.ablation)

    # ------------------------------------------------------------------ analysis
    def weights(self, edges: frozenset[str] | None = None) -> dict[str, float]:
        """The exact effect of removing each edge of a hypothesis (default: the current one)
        on its recovery: ``recovery(H) - recovery(H without e)`` (positive: the edge helps).
        One batched pass of ``len(H)`` circuits; cached."""
        with self.lock:
            edges = self._edges if edges is None else edges
            if edges in self._weights:
                return self._weights[edges]
            entry = self._by_edges.get(edges)
            if entry is None:
                raise ApexlensError("weights are computed for evaluated hypotheses only")
            order = self.sorted(edges)
            if not order:
                return {}
            rows = [[split_edge(x) for x in edges if x != e] for e in order]
            t0 = time.perf_counter()
            values = engine.evaluate_many(self.exp, rows, self.ablation).double().mean(-1).cpu()
            self._row_seconds = (time.perf_counter() - t0) / len(rows)
            gap = entry.clean - entry.ablated
            out = {
                e: entry.recovery - (float(v) - entry.ablated) / gap
                for e, v in zip(order, values, strict=True)
            }
            self._weights[edges] = out
            return out

    def weights_cached(self) -> dict[str, float] | None:
        return self._weights.get(self._edges)

    def estimated_weight_seconds(self) -> float:
        """A rough time for :meth:`weights` of the current hypothesis: the measured time per
        row of the last weighing, else a third of one evaluation per edge (rows are batched)."""
        per_row = self._row_seconds if self._row_seconds is not None else self.current.seconds / 3
        return per_row * len(self._edges)

    def compare(self, a: int, b: int) -> dict[str, Any]:
        """Two hypotheses of the history side by side: their entries, the edges only in
        each and the number they share."""
        with self.lock:
            ea, eb = self.entry(a), self.entry(b)
            return {
                "a": ea,
                "b": eb,
                "only_a": self.sorted(ea.edges - eb.edges),
                "only_b": self.sorted(eb.edges - ea.edges),
                "common": len(ea.edges & eb.edges),
            }

    def path_contributions(self, receiver: str = "logits") -> Any:
        """Every head's path to ``receiver`` (``apexlens.Experiment.path_patch``; cached)."""
        name = apexlens.parse_node(receiver).name
        with self.lock:
            if name not in self._paths:
                self._paths[name] = self.exp.path_patch("all-heads", name)
            return self._paths[name]

    def token_labels(self, example: int) -> list[str]:
        tokens = self.exp.clean_tokens[example]
        if self.task is not None and hasattr(self.task, "token_labels"):
            return list(self.task.token_labels(tokens))
        return [str(int(t)) for t in tokens]

    def snapshot_html(self) -> str:
        """A self-contained HTML file of the session's results (as ``apexlens demo``'s report)."""
        from apexlens.ui.workbench import figures

        with self.lock:
            return figures.snapshot(self)


def mib_node(name: str) -> str:
    """An EAP-IG / MIB graph node name in apexlens' spelling: ``input`` -> ``embed``,
    ``aL.hH`` -> ``L.H``, ``aL.hH<q>`` -> ``L.H.q``, ``mL`` -> ``mL``, ``logits``."""
    if name == "input":
        return "embed"
    if name == "logits":
        return "logits"
    m = _MIB_HEAD.fullmatch(name)
    if m:
        return f"{m[1]}.{m[2]}" + (f".{m[3]}" if m[3] else "")
    m = _MIB_MLP.fullmatch(name)
    if m:
        return f"m{m[1]}"
    raise ApexlensError(
        f"MIB graph: node {name!r} has no apexlens equivalent (known: input, logits, aL.hH, "
        "aL.hH<q|k|v>, mL)"
    )


def mib_edges(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The edges marked ``in_graph`` of an EAP-IG / MIB graph JSON, in apexlens' names."""
    edges = obj["edges"]
    out: list[tuple[str, str]] = []
    marked = False
    for key, value in edges.items():
        if not isinstance(key, str) or SEP not in key:
            raise ApexlensError(f"MIB graph: edge {key!r} is not 'SENDER->RECEIVER'")
        s, r = key.split(SEP, 1)
        sender, receiver = mib_node(s), mib_node(r)
        if isinstance(value, Mapping) and "in_graph" in value:
            marked = True
            if value["in_graph"] is True:
                out.append((sender, receiver))
    if not marked:
        raise ApexlensError("MIB graph: no edge carries 'in_graph', so it names no circuit")
    return out


def history_rows(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    return [
        {
            "id": e.id,
            "label": e.label,
            "n_edges": e.n_edges,
            "recovery": e.recovery,
            "proportion_explained": e.explained,
            "metric": e.metric,
        }
        for e in entries
    ]
