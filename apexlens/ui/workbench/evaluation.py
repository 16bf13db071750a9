"""Exact numbers of hypotheses: every number the workbench shows comes from here.

A hypothesis (a set of edge names, :mod:`~apexlens.ui.workbench.names`) becomes the
keep-matrix of ``Experiment.edge_index()`` (:class:`Keeps`) and is evaluated by
``Experiment.evaluate_keep`` -- :meth:`apexlens.Experiment.evaluate_circuit` on the matrix,
the same engine and the same :class:`apexlens.CircuitResult`, without re-reading tens of
thousands of edge spellings on every toggle, and ``incremental``: the pass of a toggled
hypothesis runs only from the toggled receiver's block on (everything before it is the last
hypothesis', kept), bit-for-bit the numbers of a whole pass. Edge weights (the exact effect of removing each
edge) are rows of one batched pass (``Experiment.evaluate_keeps``); attribution scores and
path contributions are the library's own calls, cached.
"""

from __future__ import annotations

import array
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

import apexlens
from apexlens import ApexlensError
from apexlens.ui.workbench.names import edge_name, split_edge
from apexlens.ui.workbench.state import Entry

METHODS = ("exact", "eap", "eap-ig")
WEIGH_ROWS = 256  # hypotheses per batched weighing call (bounds the stacked keep-matrices)


class Keeps:
    """Edge names -> keep-matrices of ``exp.edge_index()``.

    Each edge of the universe is one entry of the ``[sender, receiver]`` matrix, found by a
    dictionary look-up (no spelling parsed per toggle); edges at named positions
    (``"0.1@end->1.3.k@end"``, few) go through ``EdgeIndex.keep`` itself, so positions mean
    exactly what they mean to ``evaluate_circuit``. The last matrix is kept: a hypothesis a
    few plain edges away from it (a toggle, a weighing row) flips those entries of a copy
    instead of looking up every edge again."""

    FLIPS = 64  # at most this many changed edges are flipped; more: built afresh

    def __init__(self, exp: apexlens.Experiment) -> None:
        self.exp = exp
        self.index = exp.edge_index()
        n_r = len(self.index.receivers)
        s = [str(n) for n in self.index.senders]
        r = [str(n) for n in self.index.receivers]
        self.flat = {
            edge_name(s[i], r[j]): i * n_r + j for i, j in self.index.valid.nonzero().tolist()
        }
        self._last: tuple[frozenset[str], Tensor] | None = None

    def __call__(
        self, edges: Iterable[str]
    ) -> Bool[Tensor, "sender receiver"] | Bool[Tensor, "sender receiver pos"]:
        """The keep-matrix of ``edges`` (a new tensor: the caller may keep or change it)."""
        edges = frozenset(edges)
        keep = self._flipped(edges)
        if keep is None:
            keep = self._built(edges)
        self._last = (edges, keep)
        return keep.clone()

    def _flipped(self, edges: frozenset[str]) -> Tensor | None:
        if self._last is None or self._last[1].ndim != 2:
            return None
        changed = edges ^ self._last[0]
        if len(changed) > self.FLIPS or not all(e in self.flat for e in changed):
            return None
        keep = self._last[1].clone()
        flat = keep.view(-1)
        for e in changed:
            flat[self.flat[e]] = e in edges
        return keep

    def _built(self, edges: frozenset[str]) -> Tensor:
        plain = array.array("q")
        positioned: list[tuple[str, str]] = []
        for e in edges:
            k = self.flat.get(e)
            if k is None:
                positioned.append(split_edge(e))
            else:
                plain.append(k)
        keep = torch.zeros(self.index.valid.numel(), dtype=torch.bool)
        if plain:
            keep[torch.frombuffer(plain, dtype=torch.long)] = True
        keep = keep.view(self.index.valid.shape)
        if not positioned:
            return keep
        extra = self.index.keep(positioned, self.exp.n_pos, self.exp.named_positions)
        return keep | extra if extra.ndim == 2 else keep[..., None] | extra


def _floats(t: Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in t.double().cpu())


class Evaluator:
    """The exact evaluation of hypotheses on one Experiment with one ablation, and the
    analyses built on it (module docstring). Not locked: the session holds its lock."""

    def __init__(self, exp: apexlens.Experiment, ablation: str) -> None:
        self.exp, self.ablation = exp, ablation
        self.keeps = Keeps(exp)
        self.scores: dict[str, Any] = {}
        self.paths: dict[str, Any] = {}
        self.weights: dict[frozenset[str], dict[str, float]] = {}
        self.row_seconds: float | None = None

    def __call__(self, edges: frozenset[str], label: str, entry_id: int) -> Entry:
        """The numbers of ``exp.evaluate_circuit(edges)``, as an :class:`Entry`."""
        t0 = time.perf_counter()
        res = self.exp.evaluate_keep(
            self.keeps(edges), ablation=self.ablation, incremental=True  # type: ignore[arg-type]
        )  # resumed from the block of the first changed receiver: the same numbers
        with warnings.catch_warnings():  # NaN where undefined; the page shows "nan"
            warnings.simplefilter("ignore", RuntimeWarning)
            explained = float(res.proportion_explained)
        return Entry(
            id=entry_id,
            label=label,
            edges=edges,
            recovery=float(res.recovery),
            explained=explained,
            metric=res.scores.mean,
            sem=res.scores.sem,
            clean=res.clean.mean,
            ablated=res.corrupted.mean,
            per_example=_floats(res.scores.values),
            clean_per_example=_floats(res.clean.values),
            ablated_per_example=_floats(res.corrupted.values),
            seconds=time.perf_counter() - t0,
            result=res,
        )

    def weigh(self, entry: Entry, order: list[str]) -> dict[str, float]:
        """``recovery(H) - recovery(H without e)`` for each edge ``e`` of ``order`` (the
        edges of ``entry``): rows of batched passes; cached per hypothesis."""
        if entry.edges in self.weights:
            return self.weights[entry.edges]
        t0 = time.perf_counter()
        abl = self.exp.ablation(self.ablation)  # type: ignore[arg-type]
        values = []
        for start in range(0, len(order), WEIGH_ROWS):
            keeps = [self.keeps(entry.edges - {e}) for e in order[start : start + WEIGH_ROWS]]
            if len({k.ndim for k in keeps}) > 1:  # some rows still at positions: all per position
                keeps = [
                    k if k.ndim == 3 else k[..., None].expand(*k.shape, self.exp.n_pos)
                    for k in keeps
                ]
            values.append(self.exp.evaluate_keeps(torch.stack(keeps), abl, progress=False).double().mean(-1).cpu())
        self.row_seconds = (time.perf_counter() - t0) / max(len(order), 1)
        gap = entry.clean - entry.ablated
        means = torch.cat(values) if values else torch.zeros(0)
        out = {
            e: entry.recovery - (float(v) - entry.ablated) / gap
            for e, v in zip(order, means, strict=True)
        }
        self.weights[entry.edges] = out
        return out

    def estimated_weigh_seconds(self, entry: Entry) -> float:
        """A rough time for :meth:`weigh`: the measured time per row of the last weighing,
        else a third of one evaluation per edge (rows are batched)."""
        per_row = self.row_seconds if self.row_seconds is not None else entry.seconds / 3
        return per_row * entry.n_edges

    def attribution(self, method: str) -> Any:
        """``apexlens.attribute_edges`` over every edge (cached per method)."""
        if method not in METHODS:
            raise ApexlensError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if method not in self.scores:
            self.scores[method] = self.exp.attribute_edges(
                method=method,
                ablation=self.ablation,  # type: ignore[arg-type]
                progress=False,  # the page shows its own progress
            )
        return self.scores[method]

    def any_attribution(self) -> Any:
        """The attribution scores computed so far (exact first), or ``None``."""
        return next((self.scores[m] for m in ("exact", "eap-ig", "eap") if m in self.scores), None)

    def discover(self, threshold: float, method: str) -> Any:
        """``apexlens.discover``: greedy exact pruning ordered by ``method``'s scores."""
        return self.exp.discover(
            threshold=threshold,
            order=self.attribution(method),
            ablation=self.ablation,  # type: ignore[arg-type]
            progress=False,
        )

    def path_contributions(self, receiver: str) -> Any:
        """Every head's path to ``receiver`` (``Experiment.path_patch``; cached)."""
        name = apexlens.parse_node(receiver).name
        if name not in self.paths:
            self.paths[name] = self.exp.path_patch("all-heads", name, progress=False)
        return self.paths[name]
