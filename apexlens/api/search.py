"""Searches over circuit hypotheses, built on exact evaluation: faithfulness curves and
greedy pruning. They ask an :class:`~apexlens.api.experiment.Experiment` for batched circuit
evaluations (:meth:`~apexlens.api.experiment.Experiment.evaluate_keeps`) and decide.

**Faithfulness** (:func:`faithfulness`, MIB, Mueller et al. 2025): circuits of the top
0.1%, 0.2%, ... 100% of edges by ``|score|``, every circuit exactly evaluated, all of them
rows of one batched pass; CPR and CMD are areas under ``f`` and ``|1 - f|``. No pruning of
dangling edges: under resample ablation it never changes a metric (a node whose inputs are
all ablated outputs its ablated value exactly; an edge into a node with no path to the
logits changes nothing).

**Greedy exact pruning** (:func:`discover`, ACDC semantics, Conmy et al. 2023): receivers
from the logits backwards; for each, its incoming edges in ``order`` (smallest ``|score|``
first); an edge is removed when the mean metric moves by less than ``threshold`` (compared
with the current circuit, which then shrinks). Each tried removal is an exact circuit
evaluation; candidates are evaluated in batches speculatively (row ``i`` removes candidates
``1..i``) and the walk stops at the first kept edge, so the decisions are exactly those of
the sequential algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.results import DiscoveryResult, EdgeScores, FaithfulnessResult
from apexlens.runs import progress_bar
from apexlens.vocab import Ablation, EdgeIndex, EdgeSpec, Node

if TYPE_CHECKING:
    from apexlens.api.experiment import Experiment


# ============================================================================ faithfulness
def faithfulness(
    exp: Experiment,
    scores: EdgeScores,
    fractions: Sequence[float],
    ablation: Ablation,
    reference_tokens: Tensor | None,
    absolute: bool,
    progress: bool,
) -> FaithfulnessResult:
    """The MIB faithfulness curve of an edge ranking (see the module docstring and
    :func:`apexlens.faithfulness`). The full graph is the clean run and, under resample
    ablation, the empty one the corrupted run, so neither is run again."""
    fr = _fractions(fractions)
    if not isinstance(scores, EdgeScores):
        raise ApexlensError(
            f"scores must be EdgeScores (from attribute_edges), got {type(scores).__name__}"
        )
    idx = exp.edge_index(scores.split_embed)
    table, _ = idx.rows(scores.edges, exp.n_pos, exp.named_positions)
    if len(table) != len(scores):
        raise ApexlensError("scores.edges must name each edge once, with its receiver's channel")
    _finite(scores.scores, "scores")
    keeps, counts = _curve_keeps(idx, table, scores.scores, fr, absolute, exp.n_pos)
    abl = exp.ablation(ablation, reference_tokens)
    values = torch.empty(len(fr), exp.batch, dtype=exp.bk.dtype, device=exp.bk.device)
    positional = keeps[0].ndim == 3
    all_edges = idx.valid if not positional else idx.valid[..., None].expand(keeps[0].shape)
    n_total = int(idx.valid.sum()) * (exp.n_pos if positional else 1)
    todo = []
    for i, keep in enumerate(keeps):
        if counts[i] == n_total and bool((keep == all_edges).all()):
            values[i] = exp.clean_values  # the whole graph is the clean run, exactly
        else:
            todo.append(i)
    if ablation == "resample" and reference_tokens is None:
        empty_values = exp.corrupted_values
        for i in list(todo):
            if counts[i] == 0:
                values[i] = empty_values
                todo.remove(i)
        rows = [keeps[i] for i in todo]
    else:
        rows = [torch.zeros_like(keeps[0])] + [keeps[i] for i in todo]
    if rows:
        got = exp.evaluate_keeps(torch.stack(rows), abl, scores.split_embed, progress)
        if not (ablation == "resample" and reference_tokens is None):
            empty_values, got = got[0], got[1:]
        for n_i, i in enumerate(todo):
            values[i] = got[n_i]
    return FaithfulnessResult(
        fractions=fr,
        n_edges=counts,
        values=values,
        full=float(exp.clean_values.mean()),
        empty=float(empty_values.mean()),
        method=scores.method,
        ablation=ablation,
    )


def _fractions(fractions: Sequence[float]) -> list[float]:
    if isinstance(fractions, (str, bytes)) or any(
        isinstance(q, bool) for q in (fractions if isinstance(fractions, Sequence) else ())
    ):
        raise ApexlensError(f"fractions must be numbers in [0, 1], got {fractions!r}")
    try:
        fr = [float(q) for q in fractions]
    except (TypeError, ValueError):
        raise ApexlensError(f"fractions must be numbers in [0, 1], got {fractions!r}") from None
    if not fr or any(not 0 <= q <= 1 for q in fr) or sorted(fr) != fr:
        raise ApexlensError(f"fractions must be increasing numbers in [0, 1], got {fractions!r}")
    return fr


def _finite(scores: Tensor, what: str) -> None:
    if not bool(torch.isfinite(scores).all()):
        raise ApexlensError(
            f"{what} holds NaN or inf: an edge ranking needs a finite score for every edge"
        )


def _curve_keeps(
    idx: EdgeIndex,
    table: Tensor,
    scores: Tensor,
    fractions: list[float],
    absolute: bool,
    n_pos: int,
) -> tuple[list[Tensor], list[int]]:
    """The keep-matrix of each circuit on the curve (top ``int(q * n)`` edges)."""
    key = scores.abs() if absolute else scores
    order = torch.argsort(-key.double().cpu(), stable=True)
    positional = bool((table[:, 2] >= 0).any())
    shape = (*idx.valid.shape, n_pos) if positional else idx.valid.shape
    keeps, counts = [], []
    for q in fractions:
        kk = int(q * len(table))
        counts.append(kk)
        keep = torch.zeros(shape, dtype=torch.bool)
        for i, j, p in table[order[:kk]].tolist():
            if positional and p >= 0:
                keep[i, j, p] = True
            elif positional:
                keep[i, j, :] = True
            else:
                keep[i, j] = True
        keeps.append(keep)
    return keeps, counts


# ============================================================================ discovery
def discover(
    exp: Experiment,
    threshold: float,
    order: EdgeScores | None,
    edges: EdgeSpec | None,
    split_embed: bool,
    ablation: Ablation,
    reference_tokens: Tensor | None,
    batch_size: int,
    progress: bool,
) -> DiscoveryResult:
    """Greedy exact pruning with ACDC's semantics (module docstring, :func:`apexlens.discover`)."""
    _check_discover(threshold, order, batch_size, split_embed)
    idx = exp.edge_index(split_embed)
    keep = idx.valid.clone() if edges is None else idx.keep(list(edges))
    if keep.ndim != 2:
        raise ApexlensError("discover works on edges at every position; give edges without '@'")
    n_start = int(keep.sum())
    prio = _priorities(exp, idx, order)
    abl = exp.ablation(ablation, reference_tokens)

    def evaluate(rows: Tensor) -> list[float]:
        return exp.evaluate_keeps(rows, abl, split_embed, False).mean(-1).tolist()

    current = float(exp.clean_values.mean()) if edges is None else evaluate(keep[None])[0]
    walk = _Walk(idx, keep, prio, threshold, batch_size, evaluate, current)
    with progress_bar(n_start, "discover: edges decided", progress, unit="edge") as bar:
        walk.bar = bar
        walk.run()
    kept = [(idx.senders[i].name, idx.receivers[j].name) for i, j in keep.nonzero().tolist()]
    evaluation = exp.evaluate_circuit(kept, ablation=ablation, reference_tokens=reference_tokens)
    return DiscoveryResult(
        edges=kept,
        evaluation=evaluation,
        threshold=float(threshold),
        n_total=n_start,
        steps=pd.DataFrame(walk.log, columns=["sender", "receiver", "before", "after", "removed"]),
        n_forward_rows=walk.n_rows,
    )


def _check_discover(
    threshold: Any, order: Any, batch_size: Any, split_embed: bool
) -> None:
    if (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise ApexlensError(f"threshold must be a number >= 0, got {threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ApexlensError(f"batch_size must be a positive integer, got {batch_size!r}")
    if order is not None and not isinstance(order, EdgeScores):
        raise ApexlensError(
            f"order must be EdgeScores (from attribute_edges) or None, got {type(order).__name__}"
        )
    if order is not None and order.split_embed != split_embed:
        raise ApexlensError("order was scored with a different split_embed than discover uses")


def _priorities(exp: Experiment, idx: EdgeIndex, order: EdgeScores | None) -> Tensor:
    """Each edge's priority for removal (smallest first): ``|score|`` of ``order``, else the
    latest sender first."""
    prio = torch.zeros(idx.valid.shape, dtype=torch.float64)
    if order is None:
        return -torch.arange(len(idx.senders), dtype=torch.float64)[:, None].expand_as(prio).clone()
    table, _ = idx.rows(order.edges, exp.n_pos, exp.named_positions)
    if bool((table[:, 2] >= 0).any()):
        raise ApexlensError("order must score edges at every position (no '@')")
    _finite(order.scores, "order")
    prio[table[:, 0], table[:, 1]] = order.scores.abs().double().cpu()
    return prio


class _Walk:
    """ACDC's walk over the receivers, from the logits backwards (module docstring)."""

    def __init__(
        self,
        idx: EdgeIndex,
        keep: Tensor,
        prio: Tensor,
        threshold: float,
        batch_size: int,
        evaluate: Any,
        current: float,
    ) -> None:
        self.idx, self.keep, self.prio, self.threshold = idx, keep, prio, threshold
        self.batch_size, self.evaluate, self.current = batch_size, evaluate, current
        self.log: list[dict[str, Any]] = []
        self.n_rows = 0
        self.bar: Any = None
        self.n_removed = 0

    def has_output(self, r: Node) -> bool:
        if r.kind == "logits":
            return True
        return bool(self.keep[self.idx.sender_id(r.as_sender)].any())

    def run(self) -> None:
        idx = self.idx
        n_layers = idx.dims.n_layers
        for j in sorted(range(len(idx.receivers)), key=lambda j: -idx.receivers[j].order(n_layers)):
            incoming = self.keep[:, j].nonzero().flatten().tolist()
            if not incoming:
                continue
            if not self.has_output(idx.receivers[j]):
                for i in incoming:  # a component with no output: its inputs cannot matter
                    self.keep[i, j] = False
                    self.step(i, j, self.current, self.current, True)
                continue
            self.receiver(j, sorted(incoming, key=lambda i: (float(self.prio[i, j]), i)))

    def receiver(self, j: int, cand: list[int]) -> None:
        pos = 0
        while pos < len(cand):
            batch = cand[pos : pos + self.batch_size]
            rows = self.keep[None].repeat(len(batch), 1, 1)
            for b in range(len(batch)):
                rows[b:, batch[b], j] = False
            vals = self.evaluate(rows)
            self.n_rows += len(batch)
            prev = self.current
            for b, i in enumerate(batch):
                removed = abs(vals[b] - prev) < self.threshold
                self.step(i, j, prev, vals[b], removed)
                pos += 1
                if not removed:
                    break
                self.keep[i, j] = False
                prev = vals[b]
            self.current = prev

    def step(self, i: int, j: int, before: float, after: float, removed: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.n_removed += bool(removed)
            self.bar.set_postfix_str(f"{self.n_removed} removed", refresh=False)
        self.log.append(
            {
                "sender": self.idx.senders[i].name,
                "receiver": self.idx.receivers[j].name,
                "before": before,
                "after": after,
                "removed": removed,
            }
        )
