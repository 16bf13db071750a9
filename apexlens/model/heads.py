"""Head algebra: a head's q/k/v input from a residual stream, its output into the residual
stream, and the attention of one block under given q/k/v -- the same for every model class,
written once over :class:`apexlens.model.Backend`'s weights and pieces."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.model import edits
from apexlens.model.hooks import silenced
from apexlens.model.indexing import index_on

if TYPE_CHECKING:
    from collections.abc import Sequence

    from apexlens.model.dims import Dims
    from apexlens.model.protocol import ModelAdapter

_BATCHED_COPY = 16 * 2**20
"""Bytes up to which :meth:`HeadAlgebra.project_columns` copies inputs to batch products."""


class _StopAtZ(Exception):
    """Raised by a hook to end a one-block run once the block's ``hook_z`` is known."""


class HeadAlgebra:
    """The head-level pieces of :class:`~apexlens.model.Backend` (a mixin over its weights,
    norms and runs; every method here is exact on every architecture the Backend knows)."""

    if TYPE_CHECKING:  # what the Backend provides
        model: Any
        adapter: ModelAdapter
        dims: Dims

        def W_in(self, channel: str) -> Sequence[Tensor]: ...
        def b_in(self, channel: str) -> Sequence[Tensor]: ...
        @property
        def W_O_stacked(self) -> Sequence[Tensor]: ...
        @property
        def b_O_stacked(self) -> Sequence[Tensor]: ...
        @property
        def post_norms(self) -> bool: ...
        def ln1(self, layer: int, x: Tensor) -> Tensor: ...
        def ln1_post(self, layer: int, x: Tensor) -> Tensor: ...
        def pos_embed_rows(self, n_pos: int) -> Tensor | None: ...
        def qkv(self, layer: int, channel: str) -> str: ...
        def z(self, layer: int) -> str: ...

    def _with_pos(
        self, channel: str, x: Tensor, pos_axis: int, positions: Tensor | None = None
    ) -> Tensor:
        """Shortformer: the q/k input plus the positional embedding of its positions (the
        first ``n`` unless ``positions`` says which)."""
        if channel not in ("q", "k"):
            return x
        n = x.shape[pos_axis] if positions is None else int(positions.max()) + 1
        pe = self.pos_embed_rows(n)
        if pe is None:
            return x
        if positions is not None:
            pe = pe[positions]
        return x + pe.view(pe.shape[0], *([1] * (-pos_axis - 2)), pe.shape[1]).to(x.dtype)

    def head_input(
        self,
        layer: int,
        channel: str,
        resid: Float[Tensor, "... pos d_model"],
        slots: Tensor | list[int] | None = None,
        positions: Tensor | None = None,
    ) -> Float[Tensor, "... pos slot d_head"]:
        """``hook_q/k/v`` values at ``slots`` (see :meth:`slot`; all if ``None``) of
        ``layer`` when the block's input is ``resid`` (positions on axis -2: the first ones,
        or those ``positions`` names)."""
        W = self.W_in(channel)[layer]
        b = self.b_in(channel)[layer]
        if slots is not None:
            idx = index_on(slots, W.device)
            W, b = W[idx], b[idx]
        x = self._with_pos(channel, self.ln1(layer, resid), -2, positions)
        return torch.einsum("...m,hmd->...hd", x, W) + b

    def heads_input(
        self,
        layer: int,
        channel: str,
        resid: Float[Tensor, "... pos head d_model"],
        slots: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... pos head d_head"]:
        """Like :meth:`head_input`, but entry ``i`` of axis -2 reads its own residual stream
        ``resid[..., i, :]`` through slot ``slots[i]`` (positions on axis -3)."""
        return self.project_heads(layer, channel, self.ln1(layer, resid), slots)

    def project_heads(
        self,
        layer: int,
        channel: str,
        normed: Float[Tensor, "... pos head d_model"],
        slots: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... pos head d_head"]:
        """:meth:`heads_input` from inputs already through ``ln1`` (positions on axis -3)."""
        W = self.W_in(channel)[layer]
        b = self.b_in(channel)[layer]
        if slots is not None:
            idx = index_on(slots, W.device)
            W, b = W[idx], b[idx]
        x = self._with_pos(channel, normed, -3)
        return torch.einsum("...hm,hmd->...hd", x, W) + b

    def project_columns(
        self,
        layer: int,
        channel: str,
        normed: Float[Tensor, "column ... pos d_model"],
        groups: list[tuple[int, list[int]]],
        slots: list[int],
    ) -> Float[Tensor, "... pos slot d_head"]:
        """``hook_q/k/v`` values at ``slots`` of ``layer`` where slot ``slots[i]`` reads the
        already-normalised input ``normed[c]`` for the ``(c, members)`` of ``groups`` with
        ``i`` in ``members``: one product per column, no per-slot copy of its input."""
        W = self.W_in(channel)[layer]  # [slot, d_model, d_head]
        b = self.b_in(channel)[layer]
        dh = b.shape[-1]
        lead, dm = normed.shape[1:-1], normed.shape[-1]
        out = normed.new_empty(math.prod(lead), len(slots), dh)
        dev = W.device  # indices made once per device (no per-call host-device copies)
        singles = [(c, members[0]) for c, members in groups if len(members) == 1]
        n_rows = math.prod(lead)
        if len(singles) > 1 and len(singles) * n_rows * dm * normed.itemsize <= _BATCHED_COPY:
            # slots with a column each, in one batched product over a copy of their columns
            # (small inputs: one kernel instead of one per slot; large ones read in place)
            cols = index_on([c for c, _ in singles], dev)
            x = self._with_pos(channel, normed[cols], -2).reshape(len(singles), -1, dm)
            y = torch.bmm(x, W[index_on([slots[i] for _, i in singles], dev)])
            out[:, index_on([i for _, i in singles], dev)] = y.transpose(0, 1)
            groups = [(c, members) for c, members in groups if len(members) > 1]
        for c, members in groups:
            x = self._with_pos(channel, normed[c], -2).reshape(-1, dm)
            if len(members) == 1:
                Wc = W[slots[members[0]]]
            else:
                Wc = W[index_on([slots[i] for i in members], dev)]
                Wc = Wc.permute(1, 0, 2).reshape(dm, -1)
            y = (x @ Wc).view(-1, len(members), dh)
            out[:, index_on(members, dev)] = y
        out += b[index_on(slots, dev)]
        return out.view(*lead, len(slots), dh)

    def head_outputs(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        heads: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "head ... d_model"]:
        """``z[..., h, :] @ W_O[h]`` per head, heads first (before any post-attention norm:
        additive contributions only without :attr:`post_norms`)."""
        W_O = self.W_O_stacked[layer]
        if heads is not None:
            W_O = W_O[index_on(heads, W_O.device)]
        return torch.einsum("...hk,hkd->h...d", z, W_O)

    def head_outputs_into(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        out: Float[Tensor, "... head d_model"],
        total: Float[Tensor, "... d_model"] | None = None,
    ) -> None:
        """:meth:`head_outputs` of every head written into ``out`` (heads before ``d_model``;
        any strides that merge the leading axes, ``d_model`` contiguous), and their sum added
        to ``total`` where given: one batched product (a head per batch entry) straight into
        place and one for the sum, no temporary of the whole output and no copy of it.
        Outside autograd (``out=`` products are not differentiable)."""
        W_O = self.W_O_stacked[layer]
        n_heads, d_head, dm = W_O.shape
        zf = z.reshape(-1, n_heads, d_head)
        torch.bmm(zf.transpose(0, 1), W_O, out=out.view(-1, n_heads, dm).transpose(0, 1))
        if total is not None:
            tf = total.view(-1, dm)
            tf.addmm_(zf.reshape(-1, n_heads * d_head), W_O.reshape(n_heads * d_head, dm))

    def attn_output(
        self, layer: int, z: Float[Tensor, "... head d_head"]
    ) -> Float[Tensor, "... d_model"]:
        """What attention ``layer`` adds to the residual stream given every head's ``hook_z``:
        ``ln1_post(sum_h z_h W_O[h] + b_O)``."""
        return self.ln1_post(layer, self._attn_sum(layer, z))

    def _attn_sum(self, layer: int, z: Float[Tensor, "... head d_head"]) -> Tensor:
        """``sum_h z_h W_O[h] + b_O``: attention's output before any post-attention norm."""
        return torch.einsum("...hk,hkd->...d", z, self.W_O_stacked[layer]) + self.b_O_stacked[layer]

    def head_delta(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        dz: Float[Tensor, "... k d_head"],
        heads: list[int],
    ) -> Float[Tensor, "... d_model"]:
        """The change of the residual stream when heads ``heads`` of ``layer`` change their
        ``hook_z`` by ``dz`` (together) and the others keep ``z``: ``sum dz W_O`` -- or, after
        a post-attention norm, ``ln1_post(A + sum dz W_O) - ln1_post(A)``."""
        W_O = self.W_O_stacked[layer]
        d = torch.einsum("...hk,hkd->...d", dz, W_O[index_on(heads, W_O.device)])
        return self._after_post_norm(layer, z, d)

    def each_head_delta(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        dz: Float[Tensor, "... k d_head"],
        heads: list[int],
    ) -> Float[Tensor, "k ... d_model"]:
        """:meth:`head_delta` for each of ``heads`` changing *alone* (``dz[..., i, :]`` for
        head ``heads[i]``), stacked along a new first axis: one product for all of them."""
        return self._after_post_norm(layer, z, self.head_outputs(layer, dz, heads))

    def _after_post_norm(self, layer: int, z: Tensor, d: Tensor) -> Tensor:
        """A change ``d`` of the heads' summed output (any leading axes) as the change of the
        residual stream: ``d`` itself, or ``ln1_post(A + d) - ln1_post(A)`` after a
        post-attention norm, ``A`` the summed output for ``z``."""
        if not self.post_norms:
            return d
        a = self._attn_sum(layer, z)
        return self.ln1_post(layer, a + d) - self.ln1_post(layer, a)

    def attn_z(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> Float[Tensor, "batch pos head d_head"]:
        """``hook_z`` of block ``layer`` when its input is ``resid`` and its ``hook_q/k/v``
        hold ``q``, ``k``, ``v``: the block's own attention (rotary, soft caps, windows,
        qk-norm... all included), run with every hook point of the block silenced.

        This is how a query head of a grouped-query layer reads a key or value of its own:
        its shadow ``z`` is taken from a call where its key/value slot holds that input.
        """
        out: dict[str, Tensor] = {}

        def stop(act: Tensor, hook: Any) -> None:
            out["z"] = act
            raise _StopAtZ

        given = {"q": q, "k": k, "v": v}
        hooks = [  # values that never read the model's (its projections may be skipped)
            *((self.qkv(layer, ch), edits.overwrite(functools.partial(given.__getitem__, ch))) for ch in "qkv"),
            (self.z(layer), stop),
        ]
        with silenced(self.model.blocks[layer]):
            try:
                self.adapter.run_blocks(resid, layer, layer + 1, hooks)
            except _StopAtZ:
                pass
        return out["z"]
