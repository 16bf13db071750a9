"""A circuit hypothesis as hooks: planned once, then attached to any forward pass.

:class:`CircuitPlan` turns a keep-matrix over the edge graph into everything a forward pass
needs, once, on the CPU: for every layer which q/k/v slots read which senders (the distinct
exclusion columns of its three channels, one normalisation each), which grouped-query heads
need a key/value of their own, what the MLP and the logits exclude. :meth:`CircuitPlan.hooks`
then makes the hooks of one pass -- cheap closures over a fresh :class:`SenderBuffer` and the
ablated values of that pass's examples -- so a circuit evaluated in example chunks is planned
once and hooked per chunk, and no hook plans anything while the model runs.

Semantics (ACDC / auto-circuit): every receiver reads ``resid - sum over excluded senders
D[s]``, ``D[s] = out_s - ablated_s`` with ``out_s`` the sender's output *in this same run*:
heads through their recomputed q/k/v, MLPs through their input (or a recomputed output), the
logits through the final residual stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from apexlens.engines.circuits.buffer import Exclusion, SenderBuffer
from apexlens.errors import ApexlensError
from apexlens.model import Backend, edits
from apexlens.model.grouped import grouped_kv_hooks
from apexlens.model.hooks import HookFn
from apexlens.model.indexing import index_on
from apexlens.runs.ablation import AblationValues
from apexlens.vocab.edges import EdgeIndex

_FUSED_COPY = 16 * 2**20
"""Bytes up to which a layer's q/k/v inputs are copied to one batched product."""

Keep = Bool[Tensor, "sender receiver"] | Bool[Tensor, "sender receiver pos"] | Bool[
    Tensor, "sender receiver rows pos"
]


@dataclass(frozen=True)
class InputsPlan:
    """The q/k/v inputs of a layer's receiver heads, ``reads[ch] = (slots, ex)`` (column
    ``i`` of ``ex``: the senders excluded from slot ``i``): the distinct columns of all
    channels as one :class:`Exclusion` (one product over the sender buffer, one
    normalisation per distinct column), each channel's ``(column, members)`` groups, and,
    where the layer's MLP excludes senders before this layer's heads, its column
    (``mlp_col``) of the same product."""

    columns: Exclusion
    groups: dict[str, list[tuple[int, list[int]]]]
    slots: dict[str, list[int]]
    mlp_col: int | None
    picks: list[tuple[str, int, int]] | None = None
    """Every ``(channel, slot, column)`` in channel order where each slot reads a column of
    its own (then all channels are projected by one batched product, :meth:`project`)."""

    def project(self, bk: Backend, layer: int, normed: Tensor) -> dict[str, Tensor]:
        """The q/k/v values of every channel's slots from the normalised columns ``normed``
        (``[column, n, pos, d_model]``): one gather of the columns, one of the weights and
        one batched product for the whole layer."""
        assert self.picks is not None
        dev = normed.device
        W = torch.cat([bk.W_in(ch)[layer][index_on(self.slots[ch], dev)] for ch in self.slots])
        b = torch.cat([bk.b_in(ch)[layer][index_on(self.slots[ch], dev)] for ch in self.slots])
        cols = index_on([c for _, _, c in self.picks], dev)
        m, lead, dm = len(self.picks), normed.shape[1:-1], normed.shape[-1]
        x = normed[cols] if isinstance(cols, slice) else normed.index_select(0, cols)
        y = torch.baddbmm(b[:, None], x.reshape(m, -1, dm), W)
        out: dict[str, Tensor] = {}
        at = 0
        for ch, slots in self.slots.items():
            k = len(slots)
            out[ch] = y[at : at + k].permute(1, 0, 2).reshape(*lead, k, y.shape[-1])
            at += k
        return out

    @staticmethod
    def build(
        reads: Mapping[str, tuple[list[int], Tensor]], mlp: Tensor | None = None
    ) -> InputsPlan:
        chans = list(reads)
        extra = [] if mlp is None else [mlp.cpu()[:, None]]
        cat = torch.cat([reads[ch][1].cpu() for ch in chans] + extra, dim=1)
        columns, which = torch.unique(cat, dim=1, return_inverse=True)
        widths = [reads[ch][1].shape[1] for ch in chans]
        groups: dict[str, list[tuple[int, list[int]]]] = {}
        for ch, w in zip(chans, which[: sum(widths)].split(widths), strict=True):
            by_col: dict[int, list[int]] = {}
            for i, c in enumerate(w.tolist()):
                by_col.setdefault(c, []).append(i)
            groups[ch] = list(by_col.items())
        slots = {ch: reads[ch][0] for ch in chans}
        singles = all(len(m) == 1 for ch in chans for _, m in groups[ch])
        picks = None
        if singles:
            col_of = {(ch, m[0]): c for ch in chans for c, m in groups[ch]}
            picks = [(ch, s, col_of[(ch, i)]) for ch in chans for i, s in enumerate(slots[ch])]
        return InputsPlan(
            Exclusion(columns),
            groups,
            slots,
            int(which[-1]) if mlp is not None else None,
            picks,
        )


@dataclass(frozen=True)
class MLPPlan:
    """What MLP ``layer`` excludes: ``plan`` over the senders it reads from the buffer (only
    this layer's heads when the layer's q/k/v product gave it the earlier ones, ``partial``),
    whether it excludes anything, and where its input can be set (``edit``)."""

    sender: int
    plan: Exclusion
    any_excluded: bool
    partial: bool
    reads_heads: bool
    edit: tuple[str, Any] | None


@dataclass(frozen=True)
class LayerPlan:
    inputs: InputsPlan | None
    own_kv: list[tuple[str, list[int], InputsPlan]]
    """Grouped-query heads with a key/value of their own: ``(channel, heads, plan)``."""
    mlp: MLPPlan | None


class CircuitPlan:
    """Everything the hooks of a circuit need, planned once on the CPU (module docstring).

    ``keep`` is ``[sender, receiver]`` (edges at every position), ``[sender, receiver, pos]``
    (position-aware edges) or ``[sender, receiver, rows, pos or 1]``: one circuit per row,
    the forward pass then running ``rows`` copies of the batch stacked along the batch axis
    (the ablated values tiled to match, :meth:`AblationValues.tiled`).
    """

    def __init__(self, bk: Backend, index: EdgeIndex, keep: Keep) -> None:
        if bk.post_norms:
            raise ApexlensError(
                "circuit evaluation on models with norms after attention and the MLP "
                "(use_normalization_before_and_after, Gemma-2) is not supported: head outputs "
                "are not additive there, so an edge from one head is not defined"
            )
        self.bk, self.index = bk, index
        valid = index.valid  # masks stay on the CPU: planning there costs no device syncs
        keep = keep.cpu()
        if keep.ndim == 3:
            keep = keep[:, :, None, :]
        if keep.ndim == 4:
            valid = valid[:, :, None, None]
        excluded = valid & ~keep
        self.layers = [self._layer(excluded, layer) for layer in range(bk.dims.n_layers)]
        ex_l = excluded[:, index.logits]
        self.logits = Exclusion(ex_l[:, None]) if bool(ex_l.any()) else None

    def _layer(self, excluded: Tensor, layer: int) -> LayerPlan:
        bk, index, d = self.bk, self.index, self.bk.dims
        n_up = index.head_sender[layer].start
        reads: dict[str, tuple[list[int], Tensor]] = {}
        own: list[tuple[str, list[int], InputsPlan]] = []
        for ch in "qkv":
            ex = excluded[:n_up, index.head_receiver[(layer, ch)]]
            if not ex.any():
                continue
            heads = _any_but_dim1(ex).nonzero().flatten().tolist()
            if ch in "kv" and d.group > 1:
                heads, mine = _kv_heads(bk, ex)
                if mine:  # heads with a key/value of their own, planned here, not in a hook
                    slots = [bk.slot(h, ch) for h in mine]
                    own.append((ch, mine, InputsPlan.build({ch: (slots, ex[:, mine])})))
            if heads:
                reads[ch] = ([bk.slot(h, ch) for h in heads], ex[:, heads])
        inputs = None
        if reads:
            mlp = excluded[:n_up, index.mlp_receiver[layer]] if d.has_mlps else None
            inputs = InputsPlan.build(reads, mlp if mlp is not None and mlp.any() else None)
        return LayerPlan(inputs, own, self._mlp(excluded, layer, inputs) if d.has_mlps else None)

    def _mlp(self, excluded: Tensor, layer: int, inputs: InputsPlan | None) -> MLPPlan:
        index = self.index
        i_mlp = index.mlp_sender[layer]
        ex_m = excluded[:i_mlp, index.mlp_receiver[layer]]
        any_ex = bool(ex_m.any())
        edit = self.bk.mlp_input_edit(layer) if any_ex else None
        if inputs is not None and inputs.mlp_col is not None:
            late = ex_m.clone()
            late[: index.head_sender[layer].start] = False  # in the partial sum already
            return MLPPlan(i_mlp, Exclusion(late[:, None]), any_ex, True, bool(late.any()), edit)
        return MLPPlan(i_mlp, Exclusion(ex_m[:, None]), any_ex, False, True, edit)

    def hooks(
        self, abl: AblationValues, scratch: dict[str, Any] | None = None
    ) -> list[tuple[str, HookFn]]:
        """The hooks of one forward pass (or one chunk of examples) under the circuit, with
        ``abl`` the ablated values of its examples. ``scratch``: where the sender buffer's
        memory comes from and stays for the next call (:attr:`apexlens.runs.Runs.scratch`)."""
        return _Pass(self, abl, scratch).hooks()


class _Pass:
    """The hooks of one pass: a fresh sender buffer, the pass's state, closures over them."""

    def __init__(
        self, plan: CircuitPlan, abl: AblationValues, scratch: dict[str, Any] | None
    ) -> None:
        self.plan, self.bk, self.abl = plan, plan.bk, abl
        self.buf = SenderBuffer(len(plan.index.senders), scratch)
        self.state: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        bk, index, state, buf, abl = self.bk, self.plan.index, self.state, self.buf, self.abl
        d = bk.dims

        def embed_hook(act: Tensor, hook: Any) -> None:
            if index.split_embed:
                assert abl.tok is not None and abl.pos is not None, "split embed: tok/pos values"
                tok = state["tok"] - abl.tok.to(act)
                pos = state["pos"].expand_as(act) - abl.pos.to(act)
                buf.start(torch.stack([tok, pos]))
            else:
                buf.start((act - abl.embed.to(act))[None])
            state[bk.resid_pre(0)] = act

        hooks: list[tuple[str, HookFn]] = [(bk.resid_pre(0), embed_hook)]
        if index.split_embed:
            hooks[:0] = [
                ("hook_embed", edits.save(state, "tok", clone=False)),
                ("hook_pos_embed", edits.save(state, "pos", clone=False)),
            ]
        for layer, lp in enumerate(self.plan.layers):
            if layer > 0:
                hooks.append((bk.resid_pre(layer), edits.save(state, bk.resid_pre(layer), False)))
            inputs = None
            if lp.inputs is not None:
                inputs = _Inputs(self, layer, lp.inputs)
                for ch, slots in lp.inputs.slots.items():
                    hooks.append((bk.qkv(layer, ch), edits.set_heads(slots, inputs.value(ch))))
            if lp.own_kv:
                hooks += self._own_kv(layer, lp.own_kv)
            hooks.append((bk.z(layer), self._record_heads(layer)))
            if d.has_mlps and not bk.mlp_reads_resid_pre:
                hooks.append((bk.resid_mid(layer), edits.save(state, bk.resid_mid(layer), False)))
            if lp.mlp is not None:
                hooks += self._mlp_hooks(layer, lp.mlp, inputs)
        if self.plan.logits is not None:
            ex_l = self.plan.logits
            read = lambda act: buf.read(act, ex_l)[:, :, 0]  # noqa: E731
            hooks.append((bk.resid_post(d.n_layers - 1), edits.replace(read)))
        return hooks

    def _own_kv(self, layer: int, own: list[tuple[str, list[int], InputsPlan]]) -> list[Any]:
        """Grouped-query heads whose k/v input is their own (:mod:`apexlens.model.grouped`)."""
        runtimes = [(ch, heads, _Inputs(self, layer, p)) for ch, heads, p in own]

        def values(store: Any) -> dict[tuple[int, str], Tensor]:
            out: dict[tuple[int, str], Tensor] = {}
            for ch, heads, rt in runtimes:
                new = rt.value(ch)(store[ch])
                out.update({(h, ch): new[:, :, i] for i, h in enumerate(heads)})
            return out

        items = [(h, ch) for ch, heads, _ in own for h in heads]
        return grouped_kv_hooks(self.bk, layer, items, values)

    def _record_heads(self, layer: int) -> HookFn:
        bk, buf, abl, rows = self.bk, self.buf, self.abl, self.plan.index.head_sender[layer]

        def hook(act: Tensor, hook: Any) -> None:
            buf.put_heads(rows, bk, layer, act - abl.z[layer].to(act))

        return hook

    def _mlp_hooks(
        self, layer: int, mp: MLPPlan, inputs: _Inputs | None
    ) -> list[tuple[str, HookFn]]:
        """MLP ``layer`` reads ``resid - excluded senders`` (set at its input where the
        backend has such a point, so the model's own MLP call computes it; else recomputed
        from it) and its output change is recorded. Where the layer's q/k/v product also gave
        the MLP its sum over the senders before this layer's heads (``inputs.mlp_partial``),
        only this layer's heads are read from the buffer:
        ``partial + (resid - resid_pre) - sum of those heads``."""
        bk, buf, state, abl = self.bk, self.buf, self.state, self.abl

        def read() -> Tensor:
            resid = state[bk.mlp_in_resid(layer)]
            if not mp.partial:
                return buf.read(resid, mp.plan)[:, :, 0]
            assert inputs is not None and inputs.mlp_partial is not None, "q/k/v hooks first"
            partial, inputs.mlp_partial = inputs.mlp_partial, None
            if resid is not state[bk.resid_pre(layer)]:
                partial += resid - state[bk.resid_pre(layer)]
            return buf.read(partial, mp.plan)[:, :, 0] if mp.reads_heads else partial

        edit = mp.edit

        def hook(act: Tensor, hook: Any) -> Tensor:
            if edit is None and mp.any_excluded:
                act = bk.mlp_from_resid(layer, read())
            buf.put(slice(mp.sender, mp.sender + 1), (act - abl.mlp_out[layer].to(act))[None])
            return act

        out: list[tuple[str, HookFn]] = []
        if edit is not None:
            name, normalise = edit
            out.append((name, edits.replace(lambda act: normalise(read()))))
        return [*out, (bk.mlp_out(layer), hook)]


class _Inputs:
    """One pass's q/k/v receiver inputs of a layer (:class:`InputsPlan`): the normalised
    columns are computed at the first of the layer's q/k/v hooks of a forward pass and
    dropped after the last; the MLP's partial sum (:attr:`mlp_partial`) is kept for it."""

    def __init__(self, p: _Pass, layer: int, plan: InputsPlan) -> None:
        self.bk, self.buf, self.state, self.layer, self.plan = p.bk, p.buf, p.state, layer, plan
        self.chans = set(plan.slots)
        self.served: set[str] = set()
        self.source: Tensor | None = None
        self.normed: Tensor | None = None
        self.work: Tensor | None = None  # the buffer's workspace that ``normed`` lives in
        self.mlp_partial: Tensor | None = None
        self.values: dict[str, Tensor] | None = None
        # one product for the layer where each slot has a column of its own and the q/k
        # inputs add no positional embedding (shortformer), within the batched-copy size
        self.fused = plan.picks is not None and p.bk.pos_embed_rows(1) is None

    def value(self, ch: str) -> Any:
        plan = self.plan

        def fn(act: Tensor) -> Tensor:
            resid = self.state[self.bk.resid_pre(self.layer)]
            if self.normed is None or self.source is not resid:  # a new forward pass
                self.source, self.served = resid, set()
                n, n_pos, dm = resid.shape
                self.work = self.buf.workspace(n * n_pos * plan.columns.n_cols * dm, resid)
                x = self.buf.read(resid, plan.columns, self.work)
                if plan.mlp_col is not None:
                    self.mlp_partial = x[:, :, plan.mlp_col].clone()
                # [column, n, pos, d_model], a view; normalised in place where it can be
                self.normed = self.bk.ln1_(self.layer, x).permute(2, 0, 1, 3)
                size = len(plan.picks or ()) * x.numel() // x.shape[2] * x.element_size()
                if self.fused and size <= _FUSED_COPY:  # every channel in one product
                    self.values = plan.project(self.bk, self.layer, self.normed)
            normed = self.normed
            self.served.add(ch)
            if self.values is not None:
                out = self.values.pop(ch)
            else:
                out = self.bk.project_columns(
                    self.layer, ch, normed, plan.groups[ch], plan.slots[ch]
                )
            if self.served == self.chans:  # the layer's last q/k/v: its inputs are done
                self.normed = self.source = self.values = None
                self.buf.release(self.work)
            return out

        return fn


def _kv_heads(bk: Backend, ex: Tensor) -> tuple[list[int], list[int]]:
    """Grouped-query k/v receivers: a representative head per key/value slot whose query
    heads all exclude the same senders (the slot itself is recomputed), and the heads of the
    other slots that exclude something (each gets a k/v of its own)."""
    shared, own = [], []
    for j in range(bk.dims.kv_heads):
        group = bk.group_heads(j)
        cols = ex[:, group]
        if not cols.any():
            continue
        if bool((cols == cols[:, :1]).all()):
            shared.append(group[0])
        else:
            own += [h for i, h in enumerate(group) if bool(cols[:, i].any())]
    return shared, own


def _any_but_dim1(ex: Tensor) -> Tensor:
    """``ex.any(0)`` of ``[sender, head]``, also for ``[sender, head, rows, pos]``."""
    return ex.transpose(0, 1).reshape(ex.shape[1], -1).any(-1)
