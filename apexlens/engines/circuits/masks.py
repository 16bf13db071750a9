"""Every exclusion of a hypothesis planned at once, on the CPU, from its keep-matrix.

A circuit's receivers read ``resid - sum over their excluded senders``; which receivers read
what is fixed by the hypothesis, so it is planned once, before the forward pass
(:class:`~apexlens.engines.circuits.plan.CircuitPlan` asks, this module answers). Each
:class:`Request` names the columns of the exclusion matrix one sum reads (a layer's q/k/v
receivers, an MLP, the logits) and how many senders precede it; :func:`plan_exclusions`
answers all of them with one batched set of tensor operations over the matrix, whatever the
number of layers, heads or columns:

* the distinct columns of each request (one ``torch.unique`` over all requested columns:
  receivers that exclude the same senders share one sum and one normalisation);
* per request, whether summing through its excluded or its kept senders reads fewer slots,
  and whether it reads so few that only those are read (segment sums over the columns);
* the weights of every column, in the model's dtype, moved to its device once.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from apexlens.engines.circuits.buffer import Exclusion


@dataclass(frozen=True)
class Request:
    """One exclusion to plan: ``cols``, the columns of the exclusion matrix it reads (in
    order, repeats allowed), each reading the first ``n_senders`` senders."""

    cols: list[int]
    n_senders: int
    distinct: bool = True
    """Whether requested columns that exclude the same senders share one column (else
    each is a column of its own, in order: where a sum is cheaper than a copy)."""


@dataclass(frozen=True)
class Planned:
    """The answer to a :class:`Request`: its :class:`Exclusion` over the distinct columns,
    and for each requested column its column there (``local``)."""

    ex: Exclusion
    local: list[int]


def plan_exclusions(
    E: Bool[Tensor, "sender column x"],
    requests: list[Request],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Planned]:
    """Plan every request over the exclusion matrix ``E`` (``E[s, c, x]``: column ``c``
    excludes sender ``s`` in cell ``x``; cells are ``rows`` rows x positions, ``x = 1``
    for one mask everywhere). Senders past a request's ``n_senders`` must be excluded nowhere
    in its columns."""
    if not requests:
        return []
    S, X, R = int(E.shape[0]), int(E.shape[2]), len(requests)
    cand = [c for r in requests for c in r.cols]
    sel = E.index_select(1, longs(cand))
    inv = torch.unique(sel, dim=1, return_inverse=True)[1].tolist()
    order, seg, locals_ = _distinct(requests, inv)
    A = sel.index_select(1, longs(order))  # [S, P, X]
    n_send = longs([requests[r].n_senders for r in seg])
    K = (torch.arange(S)[:, None] < n_send)[..., None] & ~A  # kept, in each column's senders
    # per request, the senders any of its columns excludes / keeps in any cell: one
    # scatter over both (``[S, 2R]``), one count
    seg2 = longs(seg + [R + i for i in seg])
    both = torch.zeros(S, 2 * R, dtype=torch.int32).index_add_(
        1, seg2, torch.cat([A.any(-1), K.any(-1)], 1).to(torch.int32)
    ) > 0
    counts = both.sum(0).tolist()
    kept, few = [], []
    for i, r in enumerate(requests):
        n_ex, n_kept, n_slots = counts[i], counts[R + i], 2 + r.n_senders
        # through the kept senders only where that reads fewer slots (the total is one
        # more) and so few that just those are read; else through the excluded ones
        k = n_kept + 2 < n_ex + 1 and 4 * (n_kept + 2) < n_slots
        kept.append(k)
        few.append(4 * ((n_kept + 2) if k else (n_ex + 1)) < n_slots)
    W = _weights(A, K, [kept[r] for r in seg], dtype).to(device)  # [P, X, 2 + S]
    slots = _few_slots(both, few, kept)
    out: list[Planned] = []
    for i, (r, w) in enumerate(zip(requests, W.split([max(c) + 1 for c in locals_]), strict=True)):
        idx = None
        terms: list[tuple[int, float]] | None = None
        if few[i]:
            idx_l = slots[i]
            idx = longs(idx_l).to(device)
            w = w.index_select(-1, idx)
            if w.shape[0] == 1 and X == 1:  # weights are 1 (resid), -1 (total), +-1 (senders)
                sign = 1.0 if kept[i] else -1.0
                terms = [(s, 1.0 if s == 0 else -1.0 if s == 1 else sign) for s in idx_l]
        else:
            w = w[..., : 2 + r.n_senders]
        u = w.shape[0]
        w = w[:, 0] if X == 1 else w.view(u, rows, X // rows, w.shape[-1]).permute(1, 2, 0, 3)
        out.append(Planned(Exclusion(w, r.n_senders, kept[i], idx, terms), locals_[i]))
    return out


def longs(ints: list[int]) -> Tensor:
    """A CPU ``long`` tensor of ``ints`` through a C array (``torch.tensor`` of a list reads
    each element as a Python object: several times slower for the planning's short lists)."""
    if not ints:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", ints), dtype=torch.long)


def bools(flags: list[bool]) -> Tensor:
    """A CPU ``bool`` tensor of ``flags`` (see :func:`longs`)."""
    if not flags:
        return torch.zeros(0, dtype=torch.bool)
    return torch.frombuffer(bytearray(flags), dtype=torch.bool)


def _distinct(
    requests: list[Request], inv: list[int]
) -> tuple[list[int], list[int], list[list[int]]]:
    """Each request's distinct columns (by the ids ``inv`` of the requested columns, in
    order of first appearance): their positions among the requested columns, the request
    each belongs to, and each requested column's place among its request's distinct ones."""
    order: list[int] = []
    seg: list[int] = []
    locals_: list[list[int]] = []
    at = 0
    for i, r in enumerate(requests):
        first: dict[int, int] = {}
        local = []
        for j, u in enumerate(inv[at : at + len(r.cols)]):
            if not r.distinct:
                u = -1 - j  # a column of its own
            if u not in first:
                first[u] = len(first)
                order.append(at + j)
                seg.append(i)
            local.append(first[u])
        locals_.append(local)
        at += len(r.cols)
    return order, seg, locals_


def _weights(
    A: Bool[Tensor, "s col x"], K: Bool[Tensor, "s col x"], kept: list[bool], dtype: torch.dtype
) -> Tensor:
    """``[col, x, 2 + s]``: ``resid - sum excluded`` (``[1, 0, -A]``) or, where ``kept``,
    ``resid - total + sum kept`` (``[1, -1, K]``) -- exact in every dtype (0 and +-1)."""
    P, X = A.shape[1], A.shape[2]
    if not any(kept):  # the usual case: [1, 0, -A]
        head = torch.tensor([1.0, 0.0], dtype=dtype).expand(P, X, 2)
        return torch.cat([head, A.permute(1, 2, 0).to(dtype).neg_()], -1)
    k = bools(kept)
    head = torch.tensor([[1.0, -1.0] if c else [1.0, 0.0] for c in kept], dtype=dtype)
    sign = torch.tensor([1.0 if c else -1.0 for c in kept], dtype=dtype)
    body = torch.where(k[:, None], K, A).permute(1, 2, 0).to(dtype) * sign[:, None, None]
    return torch.cat([head[:, None].expand(P, X, 2), body], -1)


def _few_slots(
    both: Bool[Tensor, "s two_requests"], few: list[bool], kept: list[bool]
) -> dict[int, list[int]]:
    """The buffer slots of each request that reads only a few: ``resid``, the total where
    it sums through the kept senders, and the senders it reads (``both``: per request the
    senders excluded, then per request the senders kept; one ``nonzero`` for all)."""
    which = [i for i, f in enumerate(few) if f]
    if not which:
        return {}
    R = both.shape[1] // 2
    cols = [R + i if kept[i] else i for i in which]
    pairs = both[:, cols].T.nonzero().tolist()
    out = {i: [0, 1] if kept[i] else [0] for i in which}
    for j, s in pairs:
        out[which[j]].append(2 + s)
    return out
