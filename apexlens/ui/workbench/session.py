"""A workbench session, in plain Python (no Dash): one :class:`Session` per server.

A session joins three parts, each in its own module:

* :class:`~apexlens.ui.workbench.names.EdgeNames` -- the *edge universe* (every edge of
  ``apexlens.full_graph``, spelled ``"SENDER->RECEIVER"`` in apexlens' node names:
  ``"0.1->1.3.k"``, ``"embed->logits"``, ``"0.1@end->1.3.k@end"``) and the checks of what a
  user clicks, types or loads;
* :class:`~apexlens.ui.workbench.state.History` -- the current hypothesis (a set of edge
  names), undo/redo and every hypothesis evaluated;
* :class:`~apexlens.ui.workbench.evaluation.Evaluator` -- the exact numbers: every change
  is evaluated at once by ``Experiment.evaluate_keep`` (``evaluate_circuit`` on the
  hypothesis' keep-matrix) -- the numbers shown are that call's, not an approximation -- and
  a change whose evaluation fails changes nothing, so the current hypothesis always has
  numbers.

The Dash app (:mod:`apexlens.ui.workbench.app`) is a thin view over this class; tests drive
it directly. Every public method holds one lock (the server is threaded; one user).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Any

import apexlens
from apexlens import ApexlensError
from apexlens.ui.workbench import engine
from apexlens.ui.workbench.evaluation import METHODS, Evaluator
from apexlens.ui.workbench.formats import mib_node, read_circuit
from apexlens.ui.workbench.names import EdgeNames, split_edge
from apexlens.ui.workbench.names import at as positions_of
from apexlens.ui.workbench.state import Entry, History

__all__ = ["METHODS", "Entry", "Session", "mib_node"]


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
        self.exp, self.ablation, self.task, self.batch = experiment, ablation, task, batch
        self.title = title or "apexlens workbench"
        self.lock = threading.RLock()
        self.names = EdgeNames(experiment)
        self.evaluator = Evaluator(experiment, ablation)
        self.last_note = ""
        if start is None:
            start = "full" if len(self.universe) <= 400 else "empty"
        if start == "full":
            edges, label = self.universe, "full graph"
        elif start == "empty":
            edges, label = [], "nothing"
        else:
            edges, label = self.names.normalize_all(start), "start"  # type: ignore[arg-type]
        self.state = History(self.evaluator, edges, label)

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

    # ------------------------------------------------------------------ reading state
    @property
    def universe(self) -> list[str]:
        return self.names.universe

    @property
    def position_names(self) -> list[str]:
        return self.names.position_names

    @property
    def current(self) -> Entry:
        return self.state.current

    @property
    def edges(self) -> frozenset[str]:
        """The current hypothesis (edge names)."""
        return self.state.edges

    @property
    def history(self) -> list[Entry]:
        return self.state.entries

    @property
    def can_undo(self) -> bool:
        return self.state.can_undo

    @property
    def can_redo(self) -> bool:
        return self.state.can_redo

    def sorted(self, edges: Iterable[str]) -> list[str]:
        return self.names.sorted(edges)

    def edge_pairs(self, edges: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """``(sender, receiver)`` pairs in graph order, as ``evaluate_circuit`` takes them."""
        return [split_edge(e) for e in self.sorted(self.edges if edges is None else edges)]

    def entry(self, entry_id: int) -> Entry:
        return self.state.entry(entry_id)

    # ------------------------------------------------------------------ changes
    def _change(self, edges: Iterable[str], label: str) -> Entry:
        with self.lock:
            entry = self.state.change(edges, label)
            self.last_note = label if entry is not None else f"{label}: no change"
            return self.current

    def toggle_edge(self, edge: str | tuple[str, str]) -> Entry:
        """Remove the edge if it is in the hypothesis, else add it (``"0.1->1.3.k"``)."""
        with self.lock:
            names = self.names.normalize_all([edge])
            if all(n in self.edges for n in names):
                return self._change(self.edges - set(names), f"- {', '.join(names)}")
            return self._change(self.edges | set(names), f"+ {', '.join(names)}")

    def toggle_node(self, node: str, at: str | None = None) -> Entry:
        """Remove every hypothesis edge touching ``node`` (at positions ``at``: only those
        there); if there is none, add all of the node's edges (at ``at``)."""
        where = at
        with self.lock:
            if where is not None:
                pos = apexlens.parse_node(f"embed@{where}").positions
                self.names.check_positions(pos, f"node {node}@{where}")
            name = apexlens.parse_node(node).name
            candidates = self.names.node_edges(name, where)
            touching = {
                e
                for e in self.edges
                if self.names.touches(e, name) and (where is None or _at_of(e) == where)
            }
            suffix = f"@{where}" if where else ""
            if touching:
                return self._change(self.edges - touching, f"- node {name}{suffix}")
            return self._change(self.edges | set(candidates), f"+ node {name}{suffix}")

    def set_edges(self, edges: Iterable[Any], label: str = "set") -> Entry:
        """Replace the hypothesis (edge names or ``(sender, receiver)`` pairs; checked)."""
        with self.lock:
            return self._change(self.names.normalize_all(edges), label)

    def add_text(self, text: str) -> Entry:
        with self.lock:
            names = self.names.parse(text)
            return self._change(self.edges | set(names), f"+ {', '.join(names)}")

    def remove_text(self, text: str) -> Entry:
        with self.lock:
            names = self.names.parse(text)
            if not any(n in self.edges for n in names):
                raise ApexlensError(f"{', '.join(names)}: not in the hypothesis")
            return self._change(self.edges - set(names), f"- {', '.join(names)}")

    def undo(self) -> Entry:
        with self.lock:
            entry, label = self.state.undo()
            self.last_note = f"undid {label}"
            return entry

    def redo(self) -> Entry:
        with self.lock:
            entry, label = self.state.redo()
            self.last_note = f"redid {label}"
            return entry

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
        with self.lock:
            return self.evaluator.attribution(method)

    def start_top_k(self, method: str, k: int) -> Entry:
        """The ``k`` edges with the largest ``|score|`` of an ``attribute_edges`` method."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
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
            found = self.evaluator.discover(thr, method)
            return self.set_edges(found.edges, f"discover (threshold {thr:.3g}, {method} order)")

    # ------------------------------------------------------------------ files
    def load_json(self, text: str | bytes, filename: str = "JSON") -> Entry:
        """Load a hypothesis from an apexlens circuit JSON (``Circuit.save``'s format) or an
        EAP-IG / MIB graph JSON (the edges marked ``in_graph``); a bad file raises
        :class:`ApexlensError` and changes nothing (:mod:`~apexlens.ui.workbench.formats`)."""
        with self.lock:
            found = read_circuit(text, filename)
            try:
                names = self.names.normalize_all(found.edges)
            except ApexlensError as e:
                raise ApexlensError(f"{filename}: {e}") from None
            entry = self._change(names, f"loaded {found.kind} {filename}")
            note = ""
            if found.ablation is not None and found.ablation != self.ablation:
                note = f" (saved with {found.ablation} ablation; this session evaluates with {self.ablation})"
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
        Batched passes of ``len(H)`` circuits; cached."""
        with self.lock:
            entry = self.current if edges is None else self.state.seen(edges)
            if entry is None:
                raise ApexlensError("weights are computed for evaluated hypotheses only")
            return self.evaluator.weigh(entry, self.sorted(entry.edges))

    def weights_cached(self) -> dict[str, float] | None:
        return self.evaluator.weights.get(self.edges)

    def estimated_weight_seconds(self) -> float:
        return self.evaluator.estimated_weigh_seconds(self.current)

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
        with self.lock:
            return self.evaluator.path_contributions(receiver)

    def computed_paths(self, receiver: str = "logits") -> Any:
        """The path contributions to ``receiver`` if computed, else ``None``."""
        return self.evaluator.paths.get(receiver)

    def computed_scores(self) -> Any:
        """The attribution scores computed so far (exact first), else ``None``."""
        return self.evaluator.any_attribution()

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


def _at_of(edge: str) -> str | None:
    return positions_of(split_edge(edge)[0])
