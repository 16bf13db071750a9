"""The sender buffer of a circuit run, and the exclusion plans its receivers read through.

A circuit run keeps ``D[s] = out_s - ablated_s`` for every sender computed so far in one
forward pass (:class:`SenderBuffer`); a receiver reads ``resid - sum over its excluded
senders D[s]``, summed by one small matrix product per token whose weights were planned once
on the CPU (:class:`Exclusion`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from apexlens.model import Backend


class SenderBuffer:
    """``D[s] = out_s - ablated_s`` for every sender computed so far in one forward pass, and
    their running total, so that a receiver's input ``resid - sum_{s excluded} D[s]`` costs
    one matrix product over the senders that differ from "all excluded" or "all kept".

    The buffer is ``[batch, pos, slot, d_model]``: slot 0 holds the receiver's ``resid`` (set
    at each read), slot 1 the running total, then the senders in forward order. With the
    senders between the tokens and ``d_model``, the sum is a batch of one small
    ``[columns, slots] @ [slots, d_model]`` product per token, whose output is laid out for the
    norm that reads it (``d_model`` last); ``resid`` and the total are two more slots of that
    product, so nothing is copied around it. On the CPU this runs the sum at about 1.6 times
    the FLOP rate of one ``[columns, senders] @ [senders, tokens x d_model]`` product."""

    RESID, TOTAL, FIRST = 0, 1, 2

    def __init__(self, n_senders: int, scratch: dict[str, Any] | None = None) -> None:
        self.n_senders = n_senders
        self.filled = 0
        self.D: Tensor | None = None  # this pass's rows of ``_mem``
        # the memory, from and kept in ``scratch`` (:attr:`Runs.scratch`) where given
        self.scratch = scratch if scratch is not None else {}
        self._mem: Tensor | None = self.scratch.get("sender_buffer")
        self._free: list[Tensor] = self.scratch.setdefault("workspaces", [])  # not in use

    def start(self, first: Float[Tensor, "k batch pos d_model"]) -> None:
        """A new forward pass, beginning with the embedding sender(s). The memory of the
        previous pass is reused when it holds at least as many examples of the same shape
        (the chunks of one evaluation, largest first): fresh memory of a GB costs a CPU more
        in page faults than the products that fill it."""
        _, n, n_pos, dm = first.shape
        shape = (n_pos, self.FIRST + self.n_senders, dm)
        mem = self._mem
        if (
            mem is None
            or mem.shape[0] < n
            or mem.shape[1:] != shape
            or mem.dtype != first.dtype
            or mem.device != first.device
        ):
            self._mem = self.scratch["sender_buffer"] = mem = first.new_empty(n, *shape)
        self.D = D = mem[:n]
        D[:, :, self.TOTAL] = 0
        self.filled = 0
        self.put(slice(0, first.shape[0]), first)

    def put(self, rows: slice, values: Float[Tensor, "s batch pos d_model"]) -> None:
        assert rows.start == self.filled, "senders are recorded in forward order"
        assert self.D is not None, "start() begins a pass"
        self.D[:, :, self.FIRST + rows.start : self.FIRST + rows.stop] = values.permute(1, 2, 0, 3)
        self.D[:, :, self.TOTAL] += values.sum(0)
        self.filled = rows.stop

    def put_heads(
        self, rows: slice, bk: Backend, layer: int, dz: Float[Tensor, "batch pos head d_head"]
    ) -> None:
        """:meth:`put` of the heads of ``layer`` whose ``hook_z`` changed by ``dz``: each
        head's output written by its own product straight into its slot, the total by one
        product over all heads (under autograd, through :meth:`put`)."""
        if torch.is_grad_enabled():
            self.put(rows, bk.head_outputs(layer, dz))
            return
        assert rows.start == self.filled, "senders are recorded in forward order"
        assert self.D is not None, "start() begins a pass"
        D = self.D
        slots = D[:, :, self.FIRST + rows.start : self.FIRST + rows.stop]
        bk.head_outputs_into(layer, dz, slots, D[:, :, self.TOTAL])
        self.filled = rows.stop

    def read(
        self, resid: Float[Tensor, "n pos d_model"], ex: Exclusion, out: Tensor | None = None
    ) -> Float[Tensor, "n pos u d_model"]:
        """``resid - sum_s ex[s, u] * D[s]`` for every column ``u`` of the plan ``ex`` (``s`` =
        all senders recorded so far), the columns next to ``d_model``: a norm applied to it
        reads contiguous vectors, a column is a view with ``d_model`` contiguous. Written
        into ``out`` (a :meth:`workspace`) where given."""
        assert self.D is not None and ex.n_senders == self.filled, "a receiver reads every sender before it"
        self.D[:, :, self.RESID] = resid
        return ex.apply(self.D, self.FIRST + self.filled, out)

    def workspace(self, numel: int, like: Tensor) -> Tensor | None:
        """A flat tensor of at least ``numel`` elements that nothing else uses until it is
        given back (:meth:`release`); ``None`` under autograd (products with ``out=`` are
        not differentiable). A forward pass reads a layer's receiver inputs into one; the
        next layer reuses it: on a CPU, fresh outputs of hundreds of MB cost more in page
        faults than the products that fill them."""
        if torch.is_grad_enabled():
            return None
        for i, t in enumerate(self._free):
            if t.numel() >= numel and t.dtype == like.dtype and t.device == like.device:
                return self._free.pop(i)[:numel]
        return like.new_empty(numel)

    def release(self, work: Tensor | None) -> None:
        """Give back a :meth:`workspace` (one is kept for the next read)."""
        if work is not None:
            self._free[:] = [work._base if work._base is not None else work]


class Exclusion:
    """Which senders each column ``u`` excludes, planned once on the CPU when the hooks are
    built, as weights over the :class:`SenderBuffer` slots (``resid``, total, senders), so
    that a forward pass runs only tensor arithmetic on the model's device (no host-device
    round trips: on a GPU those synchronisations cost more than the products).

    ``ex`` is ``[sender, u]``, or ``[sender, u, rows, p]``: one mask per row of copies of the
    batch stacked along the batch axis, per position (``p = pos``) or for all positions
    (``p = 1``). A 2-d plan sums through the excluded senders (``resid - sum excluded``) or,
    when fewer, through the kept ones (``resid - total + sum kept``), reading just the slots
    it needs when they are few."""

    def __init__(self, ex: Bool[Tensor, "s u"] | Bool[Tensor, "s u rows p"]) -> None:
        ex = ex.cpu()
        self.n_senders, self.n_cols = int(ex.shape[0]), int(ex.shape[1])
        self.per_pos = ex.ndim == 4 and ex.shape[-1] != 1
        self.per_row: list[Exclusion] = []
        self._on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}
        self.idx: Tensor | None = None
        self.terms: list[tuple[int, float]] = []
        if ex.ndim == 4 and not self.per_pos:
            self.per_row = [Exclusion(ex[:, :, r, 0]) for r in range(ex.shape[2])]
            return
        w = torch.zeros(*ex.shape[1:], 2 + self.n_senders, dtype=torch.float64)
        w[..., SenderBuffer.RESID] = 1
        if self.per_pos:  # [rows, pos, u, slot]: one matrix per row and position
            w[..., 2:] = -ex.permute(1, 2, 3, 0).double()
            self.weights = w.permute(1, 2, 0, 3).contiguous()
            return
        kept = ~ex
        rows_ex, rows_kept = ex.any(1), kept.any(1)
        if int(rows_kept.sum()) < int(rows_ex.sum()):
            w[:, SenderBuffer.TOTAL] = -1
            w[:, 2:] = kept.T.double()
        else:
            w[:, 2:] = -ex.T.double()
        used = w.ne(0).any(0)
        if 4 * int(used.sum()) < w.shape[1]:  # few slots: read just those
            self.idx = used.nonzero().flatten()
            w = w[:, self.idx]
            if self.n_cols == 1:  # (slot, weight) pairs, weights 1 or -1
                self.terms = list(zip(self.idx.tolist(), w[0].tolist(), strict=True))
        self.weights = w.contiguous()  # [u, slot]

    def _device(self, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weights (and slot indices) on ``like``'s device and dtype, copied once."""
        key = (like.device, like.dtype)
        hit = self._on.get(key)
        if hit is None:
            w = self.weights.to(device=like.device, dtype=like.dtype)
            idx = None if self.idx is None else self.idx.to(like.device)
            hit = self._on[key] = (w, idx)
        return hit

    def apply(
        self, D: Float[Tensor, "n pos slot d_model"], n_slots: int, out: Tensor | None = None
    ) -> Float[Tensor, "n pos u d_model"]:
        """The weighted sum of the first ``n_slots`` slots of the buffer ``D`` (contiguous:
        slots are selected from it, not from a view of it, which costs ten times more) for
        every column, into the flat ``out`` where given."""
        n, n_pos, S, dm = D.shape
        if out is not None:
            out = out.view(n, n_pos, self.n_cols, dm)
        if self.per_row:
            rows = len(self.per_row)
            Dr = D.view(rows, -1, S, dm)
            if out is None:
                out = D.new_empty(n, n_pos, self.n_cols, dm)
            out_r = out.view(rows, -1, self.n_cols, dm)
            for r, plan in enumerate(self.per_row):
                plan._tokens(Dr[r], n_slots, out=out_r[r])
            return out
        if self.per_pos:
            w = self._device(D)[0]  # [rows, pos, u, slot]
            rows = w.shape[0]
            Dp = D[:, :, :n_slots].reshape(rows, n // rows, n_pos, n_slots, dm)
            res = torch.matmul(w[:, None], Dp).reshape(n, n_pos, self.n_cols, dm)
            return res if out is None else out.copy_(res)
        flat = None if out is None else out.view(-1, self.n_cols, dm)
        return self._tokens(D.view(-1, S, dm), n_slots, flat).view(n, n_pos, self.n_cols, dm)

    def _tokens(
        self, D: Float[Tensor, "t slot d_model"], n_slots: int, out: Tensor | None = None
    ) -> Float[Tensor, "t u d_model"]:
        """One ``[u, slot] @ [slot, d_model]`` product per token; one column over a few
        slots is a sum of scaled slots (no copy of them)."""
        w, idx = self._device(D)
        if idx is None:
            return torch.bmm(w.expand(D.shape[0], *w.shape), D[:, :n_slots], out=out)
        if self.terms:
            res = None if out is None else out[:, 0]
            (s0, w0), *rest = self.terms
            res = torch.mul(D[:, s0], w0, out=res)
            for slot, weight in rest:
                res.add_(D[:, slot], alpha=weight)
            return res[:, None]
        return torch.bmm(w.expand(D.shape[0], *w.shape), D.index_select(1, idx), out=out)
