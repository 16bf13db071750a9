"""A circuit hypothesis as hooks: planned once, then attached to any forward pass.

:class:`CircuitPlan` turns a keep-matrix over the edge graph into everything a forward pass
needs, once, on the CPU: for every layer which q/k/v slots read which senders (the distinct
exclusion columns of its three channels, one normalisation each), which grouped-query heads
need a key/value of their own, what the MLP and the logits exclude. The exclusions of every
layer are planned together, by one batched set of tensor operations over the keep-matrix
(:mod:`~apexlens.engines.circuits.masks`); what is left per layer is a few list operations.
:meth:`CircuitPlan.hooks` then makes the hooks of one pass -- cheap closures over a fresh
:class:`SenderBuffer` and the ablated values of that pass's examples -- so a circuit
evaluated in example chunks is planned once and hooked per chunk, and no hook plans
anything while the model runs.

Semantics (ACDC / auto-circuit): every receiver reads ``resid - sum over excluded senders
D[s]``, ``D[s] = out_s - ablated_s`` with ``out_s`` the sender's output *in this same run*:
heads through their recomputed q/k/v, MLPs through their input (or a recomputed output), the
logits through the final residual stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from apexlens.engines.circuits.buffer import Exclusion, SenderBuffer
from apexlens.engines.circuits.masks import Planned, Request, longs, plan_exclusions
from apexlens.errors import ApexlensError
from apexlens.model import Backend, edits
from apexlens.model.grouped import grouped_kv_hooks
from apexlens.model.hooks import HookFn
from apexlens.model.indexing import index_on
from apexlens.runs.ablation import AblationValues
from apexlens.vocab.edges import EdgeIndex

_FUSED_COPY = 16 * 2**20
"""Bytes up to which a layer's q/k/v inputs are copied to one batched product (where the
columns its slots read are not already in slot order)."""

Keep = Bool[Tensor, "sender receiver"] | Bool[Tensor, "sender receiver pos"] | Bool[
    Tensor, "sender receiver rows pos"
]


@dataclass(frozen=True)
class Fused:
    """All of a layer's q/k/v slots in one batched product: the stacked weights and biases
    of the slots in channel order, the column each reads (a slice where those are the first
    columns, in order: read in place; else gathered, within :data:`_FUSED_COPY`), each
    channel's range."""

    W: Tensor
    b: Tensor
    cols: slice | Tensor
    ranges: dict[str, tuple[int, int]]

    def project(self, normed: Tensor) -> dict[str, Tensor]:
        """The q/k/v values of every channel's slots from the normalised columns ``normed``
        (``[column, n, pos, d_model]``): one batched product for the whole layer, read in
        place where the columns are in slot order."""
        m, lead, dm = self.W.shape[0], normed.shape[1:-1], normed.shape[-1]
        x = normed[self.cols] if isinstance(self.cols, slice) else normed.index_select(0, self.cols)
        y = torch.baddbmm(self.b, x.reshape(m, -1, dm), self.W)
        y = y.view(m, *lead, -1).permute(1, 2, 0, 3)  # [n, pos, slot, d_head]
        return {ch: y[:, :, a:e] for ch, (a, e) in self.ranges.items()}


@dataclass(frozen=True)
class InputsPlan:
    """The q/k/v inputs of a layer's receiver heads: ``slots[ch]`` read the distinct columns
    of ``columns`` (one product over the sender buffer, one normalisation per column) as
    each channel's ``(column, members)`` ``groups``; where the layer's MLP excludes senders
    before this layer's heads, its column (``mlp_col``) of the same product. ``fused``: one
    product for every channel (:class:`Fused`)."""

    columns: Exclusion
    groups: dict[str, list[tuple[int, list[int]]]]
    slots: dict[str, list[int]]
    mlp_col: int | None
    fused: Fused | None = None

    @staticmethod
    def of(planned: Planned, slots: dict[str, list[int]], mlp: bool) -> InputsPlan:
        """From the planned exclusion of the channels' columns (in channel order, then the
        MLP's where ``mlp``)."""
        groups: dict[str, list[tuple[int, list[int]]]] = {}
        at = 0
        for ch, sl in slots.items():
            by_col: dict[int, list[int]] = {}
            for i, c in enumerate(planned.local[at : at + len(sl)]):
                by_col.setdefault(c, []).append(i)
            groups[ch] = list(by_col.items())
            at += len(sl)
        return InputsPlan(planned.ex, groups, slots, planned.local[-1] if mlp else None)

    def picks(self) -> list[int]:
        """The column every slot reads, in channel order."""
        out: list[int] = []
        for ch, g in self.groups.items():
            col = [0] * len(self.slots[ch])
            for c, members in g:
                for i in members:
                    col[i] = c
            out += col
        return out


@dataclass(frozen=True)
class MLPPlan:
    """What MLP ``layer`` excludes: ``plan`` over the senders it reads from the buffer (only
    this layer's heads when the layer's q/k/v product gave it the earlier ones, ``partial``;
    ``None`` where it reads none), whether it excludes anything, and where its input can be
    set (``edit``)."""

    sender: int
    plan: Exclusion | None
    any_excluded: bool
    partial: bool
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
    (the ablated values tiled to match, :meth:`AblationValues.tiled`). ``cache``: where the
    stacked q/k/v weights of fused layers stay for the next hypothesis (:attr:`Runs.scratch`).
    """

    def __init__(
        self, bk: Backend, index: EdgeIndex, keep: Keep, cache: dict[str, Any] | None = None
    ) -> None:
        if bk.post_norms:
            raise ApexlensError(
                "circuit evaluation on models with norms after attention and the MLP "
                "(use_normalization_before_and_after, Gemma-2) is not supported: head outputs "
                "are not additive there, so an edge from one head is not defined"
            )
        self.bk, self.index = bk, index
        self._versions: dict[int, list[tuple[int, int]]] = {}
        valid = index.valid  # masks stay on the CPU: planning there costs no device syncs
        keep = keep.cpu()
        if keep.ndim == 3:
            keep = keep[:, :, None, :]
        if keep.ndim == 4:
            valid = valid[:, :, None, None]
        excluded = valid & ~keep
        rows = int(excluded.shape[2]) if excluded.ndim == 4 else 1
        E = self._columns(excluded.reshape(*excluded.shape[:2], -1))
        self.col_any: list[bool] = E.any(-1).any(0).tolist()
        self.shared = self._shared_kv(E)
        requests: list[Request] = []
        layouts = [self._layout(layer, requests) for layer in range(bk.dims.n_layers)]
        logits = None
        if self.col_any[index.logits]:
            logits = len(requests)
            requests.append(Request([index.logits], len(index.senders)))
        planned = plan_exclusions(E, requests, rows, bk.dtype, bk.device)
        self.total = any(p.ex.kept for p in planned)
        self.logits = None if logits is None else planned[logits].ex
        self.layers = [self._layer(layer, lay, planned, cache) for layer, lay in enumerate(layouts)]

    def _columns(self, E: Tensor) -> Tensor:
        """The exclusion matrix ``[sender, receiver, cell]`` with two more columns per layer
        with an MLP: its exclusions before the layer's heads (read with the heads' q/k/v
        inputs) and of the layer's heads (read at the MLP): one operation for all layers."""
        index, d = self.index, self.bk.dims
        if not d.has_mlps:
            return E
        S, L = E.shape[0], d.n_layers
        mlp = E.index_select(1, longs([index.mlp_receiver[la] for la in range(L)]))
        n_up = longs([index.head_sender[la].start for la in range(L)])
        up = (torch.arange(S)[:, None] < n_up)[..., None]
        return torch.cat([E, mlp & up, mlp & ~up], 1)

    def _shared_kv(self, E: Tensor) -> list[list[list[bool]]] | None:
        """Grouped-query attention: ``shared[layer][k or v][j]``, whether every query head of
        key/value head ``j`` excludes the same senders (one slot read for all of them), for
        all layers at once."""
        d, index = self.bk.dims, self.index
        if d.group <= 1:
            return None
        cols = [
            list(range(index.head_receiver[(la, ch)].start, index.head_receiver[(la, ch)].stop,
                       index.head_receiver[(la, ch)].step))
            for la in range(d.n_layers)
            for ch in "kv"
        ]
        G = E.index_select(1, longs([c for cs in cols for c in cs]))
        G = G.view(E.shape[0], d.n_layers, 2, d.kv_heads, d.group, E.shape[-1])
        same = (G == G[:, :, :, :, :1]).all(-1).all(0).all(-1)  # [layer, 2, kv]
        return same.tolist()

    def _heads(self, layer: int, ch: str) -> list[int]:
        """The heads whose ``ch`` input excludes anything."""
        sl = self.index.head_receiver[(layer, ch)]
        a = self.col_any
        return [h for h, c in enumerate(range(sl.start, sl.stop, sl.step)) if a[c]]

    def _col(self, layer: int, ch: str, head: int) -> int:
        sl = self.index.head_receiver[(layer, ch)]
        return sl.start + head * sl.step

    def _layout(self, layer: int, requests: list[Request]) -> dict[str, Any]:
        """What layer ``layer`` reads, as requests appended to ``requests`` (their numbers
        in the returned layout)."""
        index, d = self.index, self.bk.dims
        n_up = index.head_sender[layer].start
        reads: dict[str, list[int]] = {}
        own: list[tuple[str, list[int], int]] = []
        for ch in "qkv":
            heads = self._heads(layer, ch)
            if heads and self.shared is None and not self.bk.shortformer:
                # every head of the channel (those excluding nothing read ``resid``): the
                # pass sets the whole value, so the model's own projection is skipped
                # (:func:`apexlens.model.skips.hooked_pass`) and no heads are copied
                heads = list(range(d.n_heads))
            if ch in "kv" and self.shared is not None and heads:
                heads, mine = self._kv_split(layer, ch, heads)
                if mine:  # heads with a key/value of their own, planned here, not in a hook
                    own.append((ch, mine, len(requests)))
                    requests.append(Request([self._col(layer, ch, h) for h in mine], n_up))
            if heads:
                reads[ch] = heads
        lay: dict[str, Any] = {"reads": reads, "own": own, "inputs": None, "mlp": None}
        n_cols = len(index.receivers)
        mlp_in = d.has_mlps and bool(reads) and self.col_any[n_cols + layer]
        if reads:
            cols = [self._col(layer, ch, h) for ch, heads in reads.items() for h in heads]
            lay["inputs"] = len(requests)
            # where a token's sum is short, each slot sums its own column (cheaper than
            # gathering shared columns for the layer's one q/k/v product)
            short = (SenderBuffer.FIRST + n_up) * d.d_model <= SenderBuffer.SLOT_MAJOR
            cols += [n_cols + layer] if mlp_in else []
            requests.append(Request(cols, n_up, distinct=not short or self.bk.shortformer))
        lay["mlp_in"] = mlp_in
        if d.has_mlps:
            i_mlp = index.mlp_sender[layer]
            late = n_cols + d.n_layers + layer
            col = late if mlp_in else index.mlp_receiver[layer]
            if self.col_any[col]:
                lay["mlp"] = len(requests)
                requests.append(Request([col], i_mlp))
        return lay

    def _kv_split(self, layer: int, ch: str, heads: list[int]) -> tuple[list[int], list[int]]:
        """Grouped-query k/v receivers: a representative head per key/value slot whose query
        heads all exclude the same senders (the slot itself is recomputed), and the heads of
        the other slots that exclude something (each gets a k/v of its own)."""
        assert self.shared is not None
        same = self.shared[layer]["kv".index(ch)]
        shared: list[int] = []
        own: list[int] = []
        for h in heads:
            j = self.bk.slot(h, ch)
            if not same[j]:
                own.append(h)
            elif not shared or self.bk.slot(shared[-1], ch) != j:
                shared.append(self.bk.group_heads(j)[0])
        return shared, own

    def _layer(
        self, layer: int, lay: dict[str, Any], planned: list[Planned], cache: dict[str, Any] | None
    ) -> LayerPlan:
        bk = self.bk
        slots = lambda ch, heads: [bk.slot(h, ch) for h in heads]  # noqa: E731
        inputs = None
        if lay["inputs"] is not None:
            reads = {ch: slots(ch, heads) for ch, heads in lay["reads"].items()}
            inputs = InputsPlan.of(planned[lay["inputs"]], reads, lay["mlp_in"])
            inputs = self._fused(layer, inputs, cache)
        own = [
            (ch, mine, InputsPlan.of(planned[i], {ch: slots(ch, mine)}, False))
            for ch, mine, i in lay["own"]
        ]
        mlp = None
        if bk.dims.has_mlps:
            any_ex = self.col_any[self.index.mlp_receiver[layer]]
            plan = None if lay["mlp"] is None else planned[lay["mlp"]].ex
            edit = bk.mlp_input_edit(layer) if any_ex else None
            mlp = MLPPlan(self.index.mlp_sender[layer], plan, any_ex, bool(lay["mlp_in"]), edit)
        return LayerPlan(inputs, own, mlp)

    def _fused(self, layer: int, inputs: InputsPlan, cache: dict[str, Any] | None) -> InputsPlan:
        """``inputs`` with every channel in one product (:class:`Fused`) where each slot
        reads a column of its own and the q/k inputs add no positional embedding
        (shortformer). The stacked weights stay in ``cache`` while the model's are unchanged
        (the same tensors, at the same version)."""
        bk = self.bk
        if bk.shortformer:
            return inputs
        picks = inputs.picks()
        dev = bk.device
        params = self._params(layer, inputs)
        slots = [(ch, tuple(s)) for ch, s in inputs.slots.items()]
        versions = self._versions[layer] = _versions_of(params)
        key = f"fused-qkv:{layer}:{slots!r}:{versions!r}"
        hit = None if cache is None else cache.get(key)
        if hit is None:
            idx = [index_on(s, dev) for s in inputs.slots.values()]
            W = torch.cat([w[i] for (w, _), i in zip(params, idx, strict=True)])
            b = torch.cat([b[i] for (_, b), i in zip(params, idx, strict=True)])[:, None]
            hit = (W, b)
            if cache is not None:
                for k in [k for k in cache if k.startswith(f"fused-qkv:{layer}:")]:
                    del cache[k]  # one entry per layer
                cache[key] = hit
        ranges, at = {}, 0
        for ch, s in inputs.slots.items():
            ranges[ch] = (at, at + len(s))
            at += len(s)
        fused = Fused(hit[0], hit[1], index_on(picks, dev), ranges)
        return InputsPlan(inputs.columns, inputs.groups, inputs.slots, inputs.mlp_col, fused)

    def _params(self, layer: int, inputs: InputsPlan) -> list[tuple[Tensor, Tensor]]:
        """The q/k/v weights and biases of ``layer``'s channels that ``inputs`` reads."""
        return [(self.bk.W_in(ch)[layer], self.bk.b_in(ch)[layer]) for ch in inputs.slots]

    def _unchanged(self, layer: int, inputs: InputsPlan) -> bool:
        """Whether the weights ``layer``'s fused product stacked are the model's still (the
        same tensors, at the same version)."""
        return self._versions.get(layer) == _versions_of(self._params(layer, inputs))

    def refreshed(self, cache: dict[str, Any] | None) -> CircuitPlan:
        """The plan again for the next pass of the same hypothesis: everything it planned
        depends on the keep-matrix and the model's structure only, except the stacked q/k/v
        weights of fused layers, which are looked up again (:meth:`_fused`: rebuilt where
        the model's weights changed since)."""
        self.layers = [
            replace(lp, inputs=self._fused(layer, lp.inputs, cache))
            if lp.inputs is not None and lp.inputs.fused is not None
            and not self._unchanged(layer, lp.inputs)
            else lp
            for layer, lp in enumerate(self.layers)
        ]
        return self

    def hooks(
        self, abl: AblationValues, scratch: dict[str, Any] | None = None
    ) -> list[tuple[str, HookFn]]:
        """The hooks of one forward pass (or one chunk of examples) under the circuit, with
        ``abl`` the ablated values of its examples. ``scratch``: where the sender buffer's
        memory comes from and stays for the next call (:attr:`apexlens.runs.Runs.scratch`)."""
        return _Pass(self, abl, scratch).hooks()

    def open(self, abl: AblationValues, scratch: dict[str, Any] | None = None) -> _Pass:
        """One pass (as :meth:`hooks` makes), its sender buffer (:attr:`_Pass.buf`) open to a
        caller that resumes a pass part-way (:mod:`~apexlens.engines.circuits.resume`)."""
        return _Pass(self, abl, scratch)


def _versions_of(params: list[tuple[Tensor, Tensor]]) -> list[tuple[int, int]]:
    """Where each weight and bias lives and its in-place version (equal exactly when none
    was replaced or changed in place)."""
    return [(t.data_ptr(), t._version) for wb in params for t in wb]


PLANS_KEPT = 8
"""Hypotheses whose plans :func:`plan_for` keeps (the most recently evaluated ones)."""


def plan_for(
    bk: Backend, index: EdgeIndex, keep: Keep, cache: dict[str, Any] | None
) -> CircuitPlan:
    """The :class:`CircuitPlan` of ``keep``, kept in ``cache`` (:attr:`Runs.scratch`) for the
    next evaluation of the same hypothesis (the same edges of the same edge graph: the
    keep-matrix's bytes are the key, compared exactly) -- re-evaluating a hypothesis (a
    workbench toggling an edge back, another ablation or report of it) plans nothing."""
    if cache is None:
        return CircuitPlan(bk, index, keep, cache)
    k = keep.cpu()
    key = (tuple(k.shape), k.numpy().tobytes())
    plans: dict[Any, tuple[EdgeIndex, CircuitPlan]] = cache.setdefault("circuit-plans", {})
    hit = plans.pop(key, None)
    if hit is not None and hit[0] is index:
        plan = hit[1].refreshed(cache)
    else:
        plan = CircuitPlan(bk, index, keep, cache)
    plans[key] = (index, plan)  # the most recent last
    while len(plans) > PLANS_KEPT:
        del plans[next(iter(plans))]
    return plan


class _Pass:
    """The hooks of one pass: a fresh sender buffer, the pass's state, closures over them."""

    def __init__(
        self, plan: CircuitPlan, abl: AblationValues, scratch: dict[str, Any] | None
    ) -> None:
        self.plan, self.bk, self.abl = plan, plan.bk, abl
        self.buf = SenderBuffer(len(plan.index.senders), scratch, total=plan.total)
        self.state: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        bk, index, state, buf, abl = self.bk, self.plan.index, self.state, self.buf, self.abl
        d = bk.dims

        def embed_hook(act: Tensor, hook: Any) -> None:
            buf.start(act)
            if index.split_embed:
                assert abl.tok is not None and abl.pos is not None, "split embed: tok/pos values"
                buf.put_one(0, state["tok"], abl.tok.to(act))
                buf.put_one(1, state["pos"].expand_as(act), abl.pos.to(act))
            else:
                buf.put_one(0, act, abl.embed.to(act))
            state[bk.resid_pre(0)] = act

        hooks: list[tuple[str, HookFn]] = [(bk.resid_pre(0), embed_hook)]
        if index.split_embed:
            hooks[:0] = [
                ("hook_embed", edits.save(state, "tok", clone=False)),
                ("hook_pos_embed", edits.save(state, "pos", clone=False)),
            ]
        n_slots = {"q": d.n_heads, "k": d.kv_heads, "v": d.kv_heads}
        for layer, lp in enumerate(self.plan.layers):
            if layer > 0:
                hooks.append((bk.resid_pre(layer), edits.save(state, bk.resid_pre(layer), False)))
            inputs = None
            if lp.inputs is not None:
                inputs = _Inputs(self, layer, lp.inputs)
                for ch, slots in lp.inputs.slots.items():
                    # every slot of the channel: the value is the activation (no copy of it)
                    if slots == list(range(n_slots[ch])):  # the model's value is not read
                        edit = edits.overwrite(functools.partial(inputs.get, ch))
                    else:
                        edit = edits.set_heads(slots, inputs.value(ch))
                    hooks.append((bk.qkv(layer, ch), edit))
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
        """The heads' output changes into the buffer. ``hook_z`` is laid out head-major in
        TransformerLens; the difference is written token-major into one tensor kept for the
        pass (every layer's ``z`` has the same shape), which the head-output product reads."""
        bk, buf, abl, rows = self.bk, self.buf, self.abl, self.plan.index.head_sender[layer]
        state = self.state

        def hook(act: Tensor, hook: Any) -> None:
            a = abl.z[layer].to(act)
            if torch.is_grad_enabled():
                buf.put_heads(rows, bk, layer, act - a)
                return
            dz = state.get("dz")
            if dz is None or dz.shape != act.shape:
                dz = state["dz"] = torch.empty(act.shape, dtype=act.dtype, device=act.device)
            buf.put_heads(rows, bk, layer, torch.sub(act, a, out=dz))

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
                assert mp.plan is not None, "an MLP that excludes senders reads them"
                return buf.read(resid, mp.plan)[:, :, 0]
            assert inputs is not None and inputs.mlp_partial is not None, "q/k/v hooks first"
            partial, inputs.mlp_partial = inputs.mlp_partial, None
            if resid is not state[bk.resid_pre(layer)]:
                partial += resid - state[bk.resid_pre(layer)]
            return buf.read(partial, mp.plan)[:, :, 0] if mp.plan is not None else partial

        edit = mp.edit

        def hook(act: Tensor, hook: Any) -> Tensor:
            if edit is None and mp.any_excluded:
                act = bk.mlp_from_resid(layer, read())
            buf.put_one(mp.sender, act, abl.mlp_out[layer].to(act))
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
        self.key = self.bk.resid_pre(layer)

    def _start(self, resid: Tensor) -> None:
        """A new forward pass: the layer's columns, normalised (and, fused, projected)."""
        plan = self.plan
        self.source, self.served = resid, set()
        n, n_pos, dm = resid.shape
        self.work = self.buf.workspace(n * n_pos * plan.columns.n_cols * dm, resid)
        x = self.buf.read(resid, plan.columns, self.work)
        if plan.mlp_col is not None:
            self.mlp_partial = x[:, :, plan.mlp_col].clone()
        # [column, n, pos, d_model], a view; normalised in place where it can be
        self.normed = self.bk.ln1_(self.layer, x).permute(2, 0, 1, 3)
        fused = plan.fused
        if fused is not None:
            copies = not isinstance(fused.cols, slice)
            size = fused.W.shape[0] * n * n_pos * dm * x.element_size()
            if not copies or size <= _FUSED_COPY:  # every channel in one product
                self.values = fused.project(self.normed)

    def value(self, ch: str) -> Any:
        """Channel ``ch``'s value as a hook value (a function of the activation, unread)."""
        return lambda act: self.get(ch)

    def get(self, ch: str) -> Tensor:
        """Channel ``ch``'s q/k/v values of the layer's receiver slots in this pass."""
        plan = self.plan
        resid = self.state[self.key]
        if self.normed is None or self.source is not resid:  # a new forward pass
            self._start(resid)
        assert self.normed is not None
        self.served.add(ch)
        if self.values is not None:
            out = self.values.pop(ch)
        else:
            out = self.bk.project_columns(
                self.layer, ch, self.normed, plan.groups[ch], plan.slots[ch]
            )
        if self.served == self.chans:  # the layer's last q/k/v: its inputs are done
            self.normed = self.source = self.values = None
            self.buf.release(self.work)
        return out
