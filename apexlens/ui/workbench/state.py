"""The hypothesis state of a workbench session: the current hypothesis, undo and redo, and
the history of every hypothesis evaluated -- plain Python, no model.

A change is evaluated before it becomes current: :meth:`History.change` takes the function
that evaluates a hypothesis (:class:`~apexlens.ui.workbench.evaluation.Evaluator`), so a
change whose evaluation fails leaves the state as it was, and the current hypothesis always
has its numbers. A hypothesis seen before is not evaluated again (its entry is reused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from apexlens import ApexlensError


@dataclass(frozen=True)
class Entry:
    """One evaluated hypothesis: its edges and the numbers of ``evaluate_circuit``
    (``result``: the :class:`apexlens.CircuitResult` itself)."""

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


Evaluate = Callable[[frozenset[str], str, int], Entry]
"""``(edges, label, id) -> Entry``: the exact evaluation of a hypothesis."""


class History:
    """The current hypothesis, undo/redo stacks and every evaluated hypothesis, in order.

    ``evaluate`` is called for each hypothesis not seen before; an error it raises leaves
    everything unchanged."""

    def __init__(self, evaluate: Evaluate, edges: Iterable[str], label: str) -> None:
        self._evaluate_new = evaluate
        self.entries: list[Entry] = []
        self._by_edges: dict[frozenset[str], Entry] = {}
        self._undo: list[tuple[frozenset[str], str]] = []
        self._redo: list[tuple[frozenset[str], str]] = []
        self.current = self._evaluate(frozenset(edges), label)

    @property
    def edges(self) -> frozenset[str]:
        return self.current.edges

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def entry(self, entry_id: int) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise ApexlensError(f"no hypothesis #{entry_id} in the history")

    def seen(self, edges: frozenset[str]) -> Entry | None:
        return self._by_edges.get(edges)

    def _evaluate(self, edges: frozenset[str], label: str) -> Entry:
        if edges in self._by_edges:
            return self._by_edges[edges]
        entry = self._evaluate_new(edges, label, len(self.entries) + 1)
        self.entries.append(entry)
        self._by_edges[edges] = entry
        return entry

    def change(self, edges: Iterable[str], label: str) -> Entry | None:
        """Make ``edges`` the current hypothesis (undoable); ``None`` if it already is."""
        new = frozenset(edges)
        if new == self.edges:
            return None
        entry = self._evaluate(new, label)  # raises before anything changes
        self._undo.append((self.edges, label))
        self._redo.clear()
        self.current = entry
        return entry

    def undo(self) -> tuple[Entry, str]:
        """Go back one change: the hypothesis before it and the change's label."""
        return self._step(self._undo, self._redo, "undo")

    def redo(self) -> tuple[Entry, str]:
        return self._step(self._redo, self._undo, "redo")

    def _step(
        self,
        source: list[tuple[frozenset[str], str]],
        target: list[tuple[frozenset[str], str]],
        what: str,
    ) -> tuple[Entry, str]:
        if not source:
            raise ApexlensError(f"nothing to {what}")
        edges, label = source[-1]
        entry = self._evaluate(edges, label)  # evaluated before: cached, but checked first
        source.pop()
        target.append((self.edges, label))
        self.current = entry
        return entry, label
