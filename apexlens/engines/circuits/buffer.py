"""The sender buffer of a circuit run, and the exclusion plans its receivers read through.

A circuit run keeps ``D[s] = out_s - ablated_s`` for every sender computed so far in one
forward pass (:class:`SenderBuffer`); a receiver reads ``resid - sum over its excluded
senders D[s]``, summed by one small matrix product per token whose weights were planned once
on the CPU, for every receiver of the hypothesis at once
(:func:`apexlens.engines.circuits.masks.plan_exclusions`), as an :class:`Exclusion` each.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.model import Backend


class SenderBuffer:
    """``D[s] = out_s - ablated_s`` for every sender computed so far in one forward pass (and,
    where an exclusion sums through the kept senders, their running total), so that a
    receiver's input ``resid - sum_{s excluded} D[s]`` costs one matrix product.

    The buffer holds slot 0, the receiver's ``resid`` (set at each read), slot 1 the running
    total, then the senders in forward order, in one of two layouts, chosen per pass by the
    work per token:

    * token-major ``[batch, pos, slot, d_model]`` (the usual one): the sum is a batch of one
      small ``[columns, slots] @ [slots, d_model]`` product per token, whose output is laid
      out for the norm that reads it (``d_model`` last); ``resid`` and the total are two more
      slots of that product, so nothing is copied around it. On the CPU this runs the sum at
      about 1.2-1.6 times the FLOP rate of one ``[columns, slots] @ [slots, tokens x
      d_model]`` product (GPT-2 small and medium shapes);
    * slot-major ``[slot, batch, pos, d_model]`` where a token's slots are few and short
      (``slots x d_model <= SLOT_MAJOR``, toy models): there the per-token products are so
      small that launching them costs more than they compute, and the sum is that one
      product; the columns come out one after another, as the q/k/v product reads them.

    :attr:`D` is the token-major view, :attr:`by_slot` ``[slot, token, d_model]`` in both.

    ``total``: whether any exclusion reads the running total (:attr:`Exclusion.kept`); when
    none does, it is not kept up (a product per layer less)."""

    RESID, TOTAL, FIRST = 0, 1, 2
    SLOT_MAJOR = 16384
    """Slots x ``d_model`` up to which the buffer is slot-major (outside autograd)."""

    def __init__(
        self, n_senders: int, scratch: dict[str, Any] | None = None, total: bool = True
    ) -> None:
        self.n_senders = n_senders
        self.total = total
        self.filled = 0
        self.D: Tensor | None = None  # this pass's rows of the memory, token-major
        # ``D`` as ``[token, slot, d_model]`` and ``[slot, token, d_model]``, and the resid
        # slot: views made once per pass
        self.flat: Tensor | None = None
        self.by_slot: Tensor | None = None
        self.resid: Tensor | None = None
        # the memory, from and kept in ``scratch`` (:attr:`Runs.scratch`) where given
        self.scratch = scratch if scratch is not None else {}
        self.slot_major = False
        self._free: list[Tensor] = self.scratch.setdefault("workspaces", [])  # not in use

    def start(self, like: Float[Tensor, "batch pos d_model"]) -> None:
        """A new forward pass of activations shaped like ``like``. The memory of the
        previous pass is reused when it holds at least as many examples of the same shape
        (the chunks of one evaluation, largest first): fresh memory of a GB costs a CPU more
        in page faults than the products that fill it."""
        n, n_pos, dm = like.shape
        n_slots = self.FIRST + self.n_senders
        grad = torch.is_grad_enabled()
        self.slot_major = not grad and n_slots * dm <= self.SLOT_MAJOR
        key = "sender_buffer:slot" if self.slot_major else "sender_buffer"
        mem = None if grad else self.scratch.get(key)
        shape = (n_slots, n_pos, dm) if self.slot_major else (n_pos, n_slots, dm)
        at = 1 if self.slot_major else 0  # the examples' axis
        if (
            mem is None
            or mem.shape[at] < n
            or mem.shape[:at] + mem.shape[at + 1 :] != shape
            or mem.dtype != like.dtype
            or mem.device != like.device
        ):
            mem = like.new_empty(*shape[:at], n, *shape[at:])
            if not grad:
                self.scratch[key] = mem
        if self.slot_major:
            rows = mem[:, :n]
            self.by_slot = rows.view(n_slots, n * n_pos, dm)
            self.D = rows.permute(1, 2, 0, 3)
            self.flat = self.D.view(n * n_pos, n_slots, dm)
        else:
            self.D = mem[:n]
            self.flat = self.D.view(n * n_pos, n_slots, dm)
            self.by_slot = self.flat.transpose(0, 1)
        self.resid = self.D[:, :, self.RESID]
        if not self.total:  # read with weight 0: it must hold numbers
            self.by_slot[self.TOTAL].zero_()
        self.filled = 0

    def put(self, rows: slice, values: Float[Tensor, "s batch pos d_model"]) -> None:
        """Record senders ``rows`` from their output changes (under autograd)."""
        assert rows.start == self.filled, "senders are recorded in forward order"
        assert self.D is not None, "start() begins a pass"
        self.D[:, :, self.FIRST + rows.start : self.FIRST + rows.stop] = values.permute(1, 2, 0, 3)
        if self.total:
            self.D[:, :, self.TOTAL] += values.sum(0)
        self.filled = rows.stop

    def put_one(
        self, row: int, out: Float[Tensor, "batch pos d_model"], ablated: Tensor
    ) -> None:
        """Record the single sender ``row`` (an embedding, an MLP) whose output is ``out``
        and ablated output ``ablated``: the difference is written straight into its slot."""
        assert row == self.filled and self.D is not None, "senders are recorded in forward order"
        slot = self.D[:, :, self.FIRST + row]
        if torch.is_grad_enabled():
            slot.copy_(out - ablated)
        else:
            torch.sub(out, ablated, out=slot)
        if self.total:
            total = self.D[:, :, self.TOTAL]
            total.copy_(slot) if row == 0 else total.add_(slot)
        self.filled = row + 1

    def put_heads(
        self, rows: slice, bk: Backend, layer: int, dz: Float[Tensor, "batch pos head d_head"]
    ) -> None:
        """:meth:`put` of the heads of ``layer`` whose ``hook_z`` changed by ``dz``: each
        head's output written by one batched product (a head per batch entry) straight into
        its slot, the total (where kept) by one product over all heads (under autograd,
        through :meth:`put`)."""
        if torch.is_grad_enabled():
            self.put(rows, bk.head_outputs(layer, dz))
            return
        assert rows.start == self.filled, "senders are recorded in forward order"
        assert self.by_slot is not None, "start() begins a pass"
        W_O = bk.W_O_stacked[layer]
        n_heads, d_head, dm = W_O.shape
        zf = dz.reshape(-1, n_heads, d_head)
        out = self.by_slot[self.FIRST + rows.start : self.FIRST + rows.stop]
        torch.bmm(zf.transpose(0, 1), W_O, out=out)
        if self.total:
            total = self.by_slot[self.TOTAL]
            total.addmm_(zf.view(-1, n_heads * d_head), W_O.reshape(n_heads * d_head, dm))
        self.filled = rows.stop

    def read(
        self, resid: Float[Tensor, "n pos d_model"], ex: Exclusion, out: Tensor | None = None
    ) -> Float[Tensor, "n pos u d_model"]:
        """``resid - sum_s ex[s, u] * D[s]`` for every column ``u`` of the plan ``ex`` (``s`` =
        all senders recorded so far), ``d_model`` contiguous: a norm applied to it reads
        contiguous vectors. Written into ``out`` (a :meth:`workspace`) where given."""
        assert self.D is not None and ex.n_senders == self.filled, "a receiver reads every sender before it"
        assert self.resid is not None
        if torch.is_grad_enabled():  # into the graph's current version
            self.D[:, :, self.RESID] = resid
        else:
            self.resid.copy_(resid)
        return ex.apply(self, self.FIRST + self.filled, out)

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
    """Which senders each column ``u`` excludes, as weights over the :class:`SenderBuffer`
    slots (``resid``, total, senders), planned once with every other exclusion of the
    hypothesis (:func:`~apexlens.engines.circuits.masks.plan_exclusions`) and already on the
    model's device, so that a forward pass runs only tensor arithmetic there (no host-device
    round trips: on a GPU those synchronisations cost more than the products).

    ``weights`` is ``[u, slot]`` (one mask for every row and position), or
    ``[rows, p, u, slot]``: one mask per row of copies of the batch stacked along the batch
    axis, per position (``p = pos``) or for all positions (``p = 1``). The slots are the
    first ``2 + n_senders`` of the buffer, or only those ``idx`` names (an exclusion reading
    a few slots reads just those); ``kept``: the weights sum through the kept senders
    (``resid - total + sum kept``: fewer than the excluded ones) instead of the excluded ones
    (``resid - sum excluded``). ``terms``: a single column over a few slots as ``(slot,
    weight)`` pairs, summed as scaled slots (no copy of them)."""

    def __init__(
        self,
        weights: Tensor,
        n_senders: int,
        kept: bool,
        idx: Tensor | None = None,
        terms: list[tuple[int, float]] | None = None,
    ) -> None:
        self.weights = weights
        self.n_senders = n_senders
        self.n_cols = int(weights.shape[-2])
        self.kept = kept
        self.idx = idx
        self.terms = terms or []
        self.per_row = weights.ndim == 4

    def apply(
        self, buf: SenderBuffer, n_slots: int, out: Tensor | None = None
    ) -> Float[Tensor, "n pos u d_model"]:
        """The weighted sum of the first ``n_slots`` slots of the buffer for every column,
        into the flat ``out`` where given (slots are selected from the buffer itself, not
        from a view of it, which costs ten times more)."""
        D = buf.D
        assert D is not None and buf.by_slot is not None and buf.flat is not None
        n, n_pos, _, dm = D.shape
        T, u = n * n_pos, self.n_cols
        w = self.weights if self.weights.dtype == D.dtype else self.weights.to(D.dtype)
        if self.per_row:  # [rows, p, u, slot]: one matrix per row (and position)
            rows = w.shape[0]
            Ds = D[:, :, :n_slots] if self.idx is None else D.index_select(2, self.idx)
            Dp = Ds.reshape(rows, n // rows, n_pos, Ds.shape[2], dm)
            res = torch.matmul(w[:, None], Dp).reshape(n, n_pos, u, dm)
            return res if out is None else out.view(res.shape).copy_(res)
        if self.terms:  # a sum of scaled slots (no copy of them)
            (s0, w0), *rest = self.terms
            res = torch.mul(buf.by_slot[s0], w0, out=None if out is None else out.view(T, dm))
            for slot, weight in rest:
                res.add_(buf.by_slot[slot], alpha=weight)
            return res.view(n, n_pos, 1, dm)
        if buf.slot_major:  # one [u, slot] @ [slot, token x d_model] product
            by = buf.by_slot[:n_slots] if self.idx is None else buf.by_slot.index_select(0, self.idx)
            res = torch.mm(w, by.reshape(by.shape[0], T * dm), out=None if out is None else out.view(u, T * dm))
            return res.view(u, n, n_pos, dm).permute(1, 2, 0, 3)
        # one [u, slot] @ [slot, d_model] product per token
        slots = buf.flat[:, :n_slots] if self.idx is None else buf.flat.index_select(1, self.idx)
        res = torch.bmm(w.expand(T, *w.shape), slots, out=None if out is None else out.view(T, u, dm))
        return res.view(n, n_pos, u, dm)
