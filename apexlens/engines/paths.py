"""The path-patching engine: cached runs + senders + receivers -> per-row metric values.

**Path patching** (Wang et al. 2022, appendix B; Goldowsky-Dill et al. 2023) asks how much
of a behaviour flows along the paths from a *sender* to a set of *receivers*. In the
clean run, the sender's output is replaced by its value on the corrupted run *only along
the paths into the receivers*: every other attention head is frozen at its clean output on
the way, MLPs on the way recompute (``mlps="live"``, the IOI/ARENA default) or are frozen
too (``mlps="frozen"``, the strict direct edge). The receivers' inputs are replaced by what
they received along those paths, and their changed outputs flow through the rest of the
network normally to the logits.

**The mechanism.** Everything is a *residual delta*: a sender ``s`` adds
``delta_s = out_s(corrupted) - out_s(clean)`` to the residual stream where it writes. With
attention frozen, a delta never moves between positions; only MLPs change it, position by
position. So, on top of the cached clean and corrupted runs (:class:`~apexlens.runs.Runs`):

1. every sender's delta is one row; rows are chunked to a memory budget and walked through
   the layers, recomputing only the MLPs (:func:`propagate`, *frozen propagation*), only at
   the positions that matter (with ``logits`` as the only receiver: those the metric reads);
2. each receiver's new input is computed from ``resid_clean + delta`` (a head's q/k/v
   through ``ln1`` and ``W_Q``/``W_K``/``W_V``; an MLP's output; the final residual);
3. the network runs normally from the first receiver's layer with the receivers' inputs
   substituted (:func:`substitutions`, :mod:`apexlens.model.edits`), and the metric is read.

Multi-hop paths ``s -> m -> r`` (``via=[m]``, treeified semantics of Goldowsky-Dill et al.)
reuse step 1: the change of ``m``'s output, caused only by ``s``'s delta arriving at
``m``'s input, becomes the delta that travels on to ``r``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import edits
from apexlens.model.grouped import grouped_kv_hooks
from apexlens.model.hooks import Hooks
from apexlens.model.indexing import index_on
from apexlens.runs import Readout, Runs, row_chunks, run_rows, stack_rows
from apexlens.runs.shard import Share
from apexlens.runs.suffix import (
    first_position,
    needed_columns,
    run_suffix_rows,
    spread,
    suffix_start,
    take,
)
from apexlens.vocab import Node, as_receivers
from apexlens.vocab.specs import MLPMode

SenderGroup = Sequence[Node]
Gather = Callable[[Tensor], Tensor]
Entry = tuple[int, list[int], Tensor]
"""``(order, rows, deltas)``: ``deltas[i]`` enters row ``rows[i]`` where that order writes."""


# ============================================================================ entry point
def path_patch_rows(
    runs: Runs,
    readout: Readout,
    groups: Sequence[SenderGroup],
    receivers: Sequence[Node],
    *,
    via: Sequence[Sequence[Node]] = (),
    mlps: MLPMode = "live",
    separate: bool = False,
    progress: bool = False,
) -> Float[Tensor, "group batch"] | Float[Tensor, "group receiver batch"]:
    """Per-example metric when each group of senders is patched (jointly) to the receivers.

    A group with no path to the receivers keeps the clean metric. ``separate``: one value
    per receiver (each node of ``receivers`` patched alone, the others left clean),
    ``[group, receiver, batch]``, from one propagation to all of them.
    """
    if mlps not in ("live", "frozen"):
        raise ApexlensError(f"mlps must be 'live' or 'frozen', got {mlps!r}")
    n_layers = runs.bk.dims.n_layers
    order = lambda n: n.order(n_layers)  # noqa: E731
    sets = [as_receivers([r]) for r in receivers] if separate else [as_receivers(receivers)]
    recv = list(dict.fromkeys(r for rs in sets for r in rs))
    hops = [as_receivers(h) for h in via]
    _check_chain(hops, recv, order)
    first_targets = hops[0] if hops else recv
    last_target = max(order(r) for r in first_targets)
    has_path = [bool(g) and min(order(s) for s in g) < last_target for g in groups]
    if not any(has_path):
        names = [str(s) for g in groups for s in g]
        raise ApexlensError(
            f"no sender has a path to the receivers: receiver(s) {[str(r) for r in first_targets]}"
            f" come before (or in the same layer as) sender(s) {names[:6]}"
            f"{'...' if len(names) > 6 else ''}"
        )
    clean_values = readout(readout.gather(runs.clean.final))
    out = clean_values.expand(len(groups), len(sets), -1).clone()
    active = [i for i, ok in enumerate(has_path) if ok]
    # sorted by where each group's first delta enters, so the started rows form a prefix
    active.sort(key=lambda i: min(order(s) for s in groups[i]))
    only_logits = not hops and all(r.kind == "logits" for r in recv) and readout.fast
    plan = _Where.of(runs, readout, recv, hops, only_logits)
    chunk = runs.rows_per_chunk(
        len(active), runs.batch * plan.n_cols, attention=not only_logits, readout=readout
    )
    with Share("path patching", len(active)) as share:
        for rows in row_chunks(share.mine(active), chunk, desc="path patching", progress=progress):
            share.put(
                rows, _patch_chunk(runs, readout, [groups[i] for i in rows], sets, hops, mlps, plan)
            )
    out = share.fill(out)
    for j, rs in enumerate(sets):  # a receiver no sender of a group reaches: clean
        last = hops[0] if hops else rs
        reach = max(order(r) for r in last)
        for i in active:
            if min(order(s) for s in groups[i]) >= reach:
                out[i, j] = clean_values
    return out if separate else out[:, 0]


def _suffix_from(runs: Runs, others: list[Node]) -> int:
    """Where the run after the receivers can start: their earliest position where the
    backend runs suffixes, else 0 (also when a grouped-query head reads a key/value of its
    own: that runs its block at every position)."""
    bk = runs.bk
    if any(r.kind == "head" and r.channel in ("k", "v") and bk.dims.group > 1 for r in others):
        return 0
    return suffix_start(bk, first_position([runs.mask(r) for r in others]))


class _Where:
    """The positions a question is computed at: ``cols``, those propagated (``None``: all;
    with logits as the only receiver, the metric's read positions, per example), and
    ``n_cols`` their number."""

    def __init__(self, cols: Tensor | None, only_logits: bool, n_cols: int) -> None:
        self.cols, self.only_logits, self.n_cols = cols, only_logits, n_cols

    @staticmethod
    def of(
        runs: Runs, readout: Readout, recv: list[Node], hops: list[list[Node]], only_logits: bool
    ) -> _Where:
        if only_logits:
            return _Where(None, True, int(readout.idx.shape[1]))
        if hops:  # an intermediate node's output is computed at every position
            return _Where(None, False, runs.n_pos)
        masks = [runs.mask(r) for r in recv if r.kind != "logits"]
        read = readout.idx if any(r.kind == "logits" for r in recv) else None
        cols = needed_columns(masks, read, runs.n_pos)
        after = runs.n_pos - _suffix_from(runs, [r for r in recv if r.kind != "logits"])
        return _Where(cols, False, max(after, runs.n_pos if cols is None else len(cols)))

    def gather(self, readout: Readout) -> Gather:
        if self.only_logits:
            return readout.gather
        cols = self.cols
        return lambda x: take(x, cols)


def _check_chain(hops: list[list[Node]], recv: list[Node], order: Callable[[Node], int]) -> None:
    for hop in hops:
        comps = {(n.kind, n.layer, n.head) for n in hop}
        if len(comps) != 1 or hop[0].kind not in ("head", "mlp"):
            raise ApexlensError(
                "each 'via' hop must be one head (or one of its q/k/v inputs) or one MLP, got "
                f"{[str(n) for n in hop]}"
            )
    prev_out = None
    for hop in hops:
        if prev_out is not None and prev_out >= order(hop[0]):
            raise ApexlensError(
                "the 'via' nodes must be in forward order (each after the previous)"
            )
        prev_out = order(hop[0].as_sender)
    if prev_out is not None and all(prev_out >= order(r) for r in recv):
        raise ApexlensError(
            f"receivers {[str(r) for r in recv]} come before the last 'via' node: no path"
        )


def _patch_chunk(
    runs: Runs,
    readout: Readout,
    groups: list[SenderGroup],
    sets: list[list[Node]],
    hops: list[list[Node]],
    mlps: MLPMode,
    where: _Where,
) -> Float[Tensor, "chunk receiver batch"]:
    n_layers = runs.bk.dims.n_layers
    gather = where.gather(readout)
    entries: list[Entry] = []  # (order, rows, deltas)
    lone: dict[int, list[tuple[int, Node]]] = {}  # layer -> (row, head) of one-head groups
    for row, g in enumerate(groups):
        if len(g) == 1 and g[0].kind == "head":
            lone.setdefault(g[0].layer, []).append((row, g[0]))
            continue
        for order, delta in group_deltas(runs, g, gather):
            entries.append((order, [row], delta[None]))
    for layer, items in lone.items():  # every one-head group of a layer in one product
        nodes = [n for _, n in items]
        deltas = _each_head_delta(runs, layer, nodes, gather)
        entries.append((nodes[0].order(n_layers), [row for row, _ in items], deltas))
    for hop in hops:
        new = propagate(runs, entries, len(groups), hop, mlps, gather)
        delta = _hop_output(runs, hop, new)
        order = hop[0].as_sender.order(n_layers)
        entries = [(order, list(range(len(groups))), delta)]
    recv = list(dict.fromkeys(r for rs in sets for r in rs))
    new = propagate(runs, entries, len(groups), recv, mlps, gather, where.cols)
    return torch.stack(
        [_finish(runs, readout, rs, new, len(groups), where) for rs in sets], dim=1
    )


def group_deltas(
    runs: Runs, group: Sequence[Node], gather: Gather = lambda x: x
) -> list[tuple[int, Tensor]]:
    """``(order, delta)`` of a group of senders patched together: one entry per embed or
    MLP sender, one per layer for its heads (after a post-attention norm, heads of one layer
    change the residual stream only together). Only at the positions ``gather`` keeps."""
    n_layers = runs.bk.dims.n_layers
    out: list[tuple[int, Tensor]] = []
    heads: dict[int, list[Node]] = {}
    for s in group:
        if s.kind == "head":
            heads.setdefault(s.layer, []).append(s)
        else:
            out.append((s.order(n_layers), sender_delta(runs, s, gather)))
    for layer, nodes in heads.items():
        out.append((nodes[0].order(n_layers), _heads_delta(runs, layer, nodes, gather)))
    return out


def _each_head_delta(
    runs: Runs, layer: int, nodes: Sequence[Node], gather: Gather = lambda x: x
) -> Float[Tensor, "k batch pos d_model"]:
    """The residual change of each of ``nodes`` (heads of ``layer``) patched *alone*, stacked:
    the same numbers as one :func:`_heads_delta` per node, in one product."""
    z, dz, heads = _head_dz(runs, layer, nodes, gather)
    return runs.bk.each_head_delta(layer, z, dz, heads)


def _heads_delta(
    runs: Runs, layer: int, nodes: Sequence[Node], gather: Gather = lambda x: x
) -> Tensor:
    """The residual change of ``nodes`` (heads of ``layer``) patched together, computed only
    at the positions ``gather`` keeps (``z`` is gathered before ``W_O`` and any post-norm:
    both act position by position)."""
    z, dz, heads = _head_dz(runs, layer, nodes, gather)
    return runs.bk.head_delta(layer, z, dz, heads)


def _head_dz(
    runs: Runs, layer: int, nodes: Sequence[Node], gather: Gather
) -> tuple[Tensor, Tensor, list[int]]:
    """The clean ``z`` of ``layer`` and ``z(corrupted) - z(clean)`` of ``nodes`` (zero outside
    each node's positions), both at the positions ``gather`` keeps, and the nodes' heads."""
    bk, c, k = runs.bk, runs.clean, runs.corrupted
    assert k is not None, "path patching needs a corrupted run"
    heads = [int(n.head or 0) for n in nodes]
    z_c = c[bk.z(layer)]
    idx = index_on(heads, z_c.device)
    dz = k[bk.z(layer)][:, :, idx] - z_c[:, :, idx]
    masks = [runs.mask(n) for n in nodes]
    if any(m is not None for m in masks):
        ones = torch.ones(dz.shape[:2], dtype=torch.bool, device=dz.device)
        m = torch.stack([ones if m is None else m for m in masks], dim=-1)
        dz = dz * m[..., None].to(dz.dtype)

    def at(t: Tensor) -> Tensor:  # gather positions of a [batch, pos, head, d_head] tensor
        b, p, h, dh = t.shape
        return gather(t.reshape(b, p, h * dh)).reshape(b, -1, h, dh)

    return at(z_c), at(dz), heads


# ============================================================================ pieces
def sender_delta(
    runs: Runs, node: Node, gather: Gather = lambda x: x
) -> Float[Tensor, "batch pos d_model"]:
    """``out(corrupted) - out(clean)`` of a sender, zero outside its positions (only at the
    positions ``gather`` keeps: a head's ``z`` is gathered before ``W_O``)."""
    bk, c, k = runs.bk, runs.clean, runs.corrupted
    assert k is not None, "path patching needs a corrupted run"
    if node.kind == "head":
        return _heads_delta(runs, node.layer, [node], gather)
    if node.kind == "embed":
        d = gather(k[bk.resid_pre(0)] - c[bk.resid_pre(0)])
    else:
        d = gather(k[bk.mlp_out(node.layer)] - c[bk.mlp_out(node.layer)])
    m = runs.mask(node)
    return d if m is None else d * gather(m[..., None].to(d.dtype))


def propagate(
    runs: Runs,
    entries: list[Entry],
    n_rows: int,
    targets: list[Node],
    mlps: MLPMode,
    gather: Gather,
    positions: Tensor | None = None,
) -> dict[Node, Tensor]:
    """Frozen propagation: walk the deltas to every target and return its new input.

    ``entries`` are ``(order, rows, deltas)``: ``deltas[i]`` enters the residual stream of
    row ``rows[i]`` where a node of that order writes. Returns, per target: a head channel -> its
    new ``hook_q/k/v`` values ``[rows, batch, pos, d_head]``; an MLP -> its new output
    ``[rows, batch, pos, d_model]``; ``logits`` -> the delta of the final residual stream.
    Only at the positions ``gather`` keeps (``positions``: which, where the q/k inputs add a
    positional embedding).
    """
    bk, c = runs.bk, runs.clean
    n_layers = bk.dims.n_layers
    last = max(t.order(n_layers) for t in targets)
    ref = entries[0][2]
    acc = torch.zeros(n_rows, *ref.shape[1:], dtype=ref.dtype, device=ref.device)
    first = [10**9] * n_rows
    by_order: dict[int, list[tuple[slice | Tensor, Tensor]]] = {}
    for o, rows, d in entries:
        for row in rows:
            first[row] = min(first[row], o)
        by_order.setdefault(o, []).append((index_on(rows, acc.device), d))
    starts = torch.tensor(first)
    out: dict[Node, Tensor] = {}

    def add(o: int) -> None:
        for rows, d in by_order.get(o, []):
            acc[rows] += d

    add(0)

    def mlp_step(layer: int, before: int) -> None:
        """MLP ``layer`` reads the deltas entered before order ``before``."""
        mlp_target = [t for t in targets if t.kind == "mlp" and t.layer == layer]
        clean_out = gather(c[bk.mlp_out(layer)])
        n_started = int((starts < before).sum())
        if n_started == 0:
            for t in mlp_target:
                out[t] = clean_out.expand(n_rows, *acc.shape[1:]).clone()
        elif mlps == "live" or mlp_target:
            resid = gather(c[bk.mlp_in_resid(layer)]) + acc[:n_started]
            new_out = bk.mlp_from_resid(layer, resid)
            if mlp_target:
                full = clean_out.expand(n_rows, *new_out.shape[1:]).clone()
                full[:n_started] = new_out
                out[mlp_target[0]] = full
            if mlps == "live":
                acc[:n_started] += new_out - clean_out

    for layer in range(n_layers):
        o_attn, o_mlp = 2 * layer + 1, 2 * layer + 2
        if o_attn > last:
            break
        heads_here = [t for t in targets if t.kind in ("head", "kv") and t.layer == layer]
        if heads_here:
            resid = gather(c[bk.resid_pre(layer)]) + acc
            for ch in "qkv":
                ts = [t for t in heads_here if t.channel == ch]
                if ts:
                    vals = bk.head_input(
                        layer, ch, resid, [slot_of(bk, t) for t in ts], positions
                    )
                    for i, t in enumerate(ts):
                        out[t] = vals[..., i, :]
        use_mlp = o_mlp <= last and bk.dims.has_mlps
        if use_mlp and bk.mlp_reads_resid_pre:
            mlp_step(layer, o_attn)  # parallel block: the MLP does not see this layer's heads
        add(o_attn)
        if use_mlp and not bk.mlp_reads_resid_pre:
            mlp_step(layer, o_mlp)
        add(o_mlp)
    for t in targets:
        if t.kind == "logits":
            out[t] = acc
    return out


def _hop_output(
    runs: Runs, hop: list[Node], new: dict[Node, Tensor]
) -> Float[Tensor, "rows batch pos d_model"]:
    """How much an intermediate node's output changes when only its patched input changes."""
    bk, c = runs.bk, runs.clean
    node = hop[0]
    layer = node.layer
    if node.kind == "mlp":
        change = new[node] - c[bk.mlp_out(layer)]
        m = runs.mask(node)
        return change if m is None else change * m[..., None].to(change.dtype)
    rows = next(iter(new.values())).shape[0]
    z_new: dict[str, Tensor] = {}
    hooks = [
        *substitutions(runs, {t: new[t] for t in hop}, rows),
        (bk.z(layer), edits.save(z_new, "z", clone=False)),
    ]
    resid = c[bk.resid_pre(layer)].expand(rows, *c[bk.resid_pre(layer)].shape)
    run_rows(bk, resid, layer, hooks, stop=layer + 1)
    z = z_new["z"][:, :, node.head].reshape(rows, runs.batch, runs.n_pos, -1)
    dz = z - c[bk.z(layer)][:, :, node.head]
    return bk.head_delta(layer, c[bk.z(layer)], dz[..., None, :], [int(node.head or 0)])


def slot_of(bk: Any, t: Node) -> int:
    """The ``hook_q/k/v`` slot a receiver reads (a KV head is its own slot)."""
    return int(t.head or 0) if t.kind == "kv" else bk.slot(int(t.head or 0), t.channel)


def substitutions(runs: Runs, new: Mapping[Node, Tensor], rows: int) -> list[tuple[str, Any]]:
    """Hook edits that put each receiver's new input in place (only at its positions).

    ``new[t]`` is ``[rows, batch, pos, ...]``; the hooks act on rows stacked along the batch.
    """
    return input_edits(runs.bk, list(new), new.__getitem__, runs.mask, rows, runs.batch, runs.n_pos)


def input_edits(
    bk: Any,
    targets: Sequence[Node],
    value: Callable[[Node], Tensor],
    mask: Callable[[Node], Tensor | None],
    rows: int,
    batch: int,
    n_pos: int,
) -> list[tuple[str, Any]]:
    """:func:`substitutions` with values read when the hooks fire (``value(t)``).

    A q input, a KV head's k/v input (``"L.kvJ.k"``) and, without grouped-query attention,
    every k/v input is one slot of ``hook_q/k/v``. Under grouped-query attention, a query
    head's own k/v input (``"L.H.k"``) changes only that head's attention
    (:func:`~apexlens.model.grouped.grouped_kv_hooks`), attached after the slot edits.
    """
    hooks: list[tuple[str, Any]] = []
    grouped: dict[int, list[Node]] = {}
    by_site: dict[str, list[Node]] = {}
    for t in targets:
        if t.kind == "head" and t.channel in ("k", "v") and bk.dims.group > 1:
            grouped.setdefault(t.layer, []).append(t)
        elif t.kind in ("head", "kv", "mlp"):
            by_site.setdefault(t.hook(bk), []).append(t)
    full = torch.ones(batch, n_pos, dtype=torch.bool, device=bk.device)
    for site, ts in by_site.items():
        masks = [mask(t) for t in ts]
        if ts[0].kind in ("head", "kv"):
            slots = [slot_of(bk, t) for t in ts]
            where = None
            if any(m is not None for m in masks):
                where = torch.stack([full if m is None else m for m in masks], -1).repeat(
                    rows, 1, 1
                )

            def vals(act: Tensor, ts: list[Node] = ts) -> Tensor:
                return stack_rows(torch.stack([value(t) for t in ts], dim=-2))

            hooks.append((site, edits.set_heads(slots, vals, where, positionwise=True)))
        else:
            m = masks[0]
            where = None if m is None else m.repeat(rows, 1)[..., None]

            def out(act: Tensor, t: Node = ts[0]) -> Tensor:
                return stack_rows(value(t))

            hooks.append((site, edits.replace_where(where, out, positionwise=True)))
    for layer, ts in grouped.items():

        def kv_values(
            store: Mapping[str, Tensor], ts: list[Node] = ts
        ) -> dict[tuple[int, str], Tensor]:
            vals: dict[tuple[int, str], Tensor] = {}
            for t in ts:
                assert t.channel is not None
                h = int(t.head or 0)
                new = stack_rows(value(t))
                m = mask(t)
                if m is not None:
                    old = store[t.channel][:, :, bk.slot(h, t.channel)]
                    new = torch.where(m.repeat(rows, 1)[..., None], new.to(old.dtype), old)
                vals[(h, t.channel)] = new
            return vals

        items = [(int(t.head or 0), str(t.channel)) for t in ts]
        hooks += grouped_kv_hooks(bk, layer, items, kv_values)
    return hooks


def logits_delta(runs: Runs, node: Node, acc: Tensor) -> Tensor:
    """The final-residual delta of a ``logits`` receiver, zero outside its positions."""
    m = runs.mask(node)
    return acc if m is None else acc * m[..., None].to(acc.dtype)


def _from(m: Tensor | None, p0: int) -> Tensor | None:
    """A ``[batch, pos]`` mask from position ``p0`` on (``None``: every position)."""
    return None if m is None else m[:, p0:]


def _logits_mask(runs: Runs, node: Node, like: Tensor, where: _Where) -> Tensor | None:
    """A ``logits`` receiver's positions as a multiplier at the positions of ``where``."""
    m = runs.mask(node)
    return None if m is None else take(m[..., None].to(like.dtype), where.cols)


def _finish(
    runs: Runs,
    readout: Readout,
    recv: list[Node],
    new: dict[Node, Tensor],
    rows: int,
    where: _Where,
) -> Float[Tensor, "rows batch"]:
    """The metric of every row once its receivers read their new inputs (held at the
    positions of ``where``). The network runs from the first receiver's layer, from its
    earliest changed position on (:func:`~apexlens.runs.suffix.run_suffix_rows`)."""
    bk, c = runs.bk, runs.clean
    logits_nodes = [r for r in recv if r.kind == "logits"]
    others = [r for r in recv if r.kind != "logits"]
    if not others and where.only_logits:
        acc = new[logits_nodes[0]]
        m = runs.mask(logits_nodes[0])
        if m is not None:
            acc = acc * readout.gather(m[..., None].to(acc.dtype))
        return readout(readout.gather(c.final) + acc)
    cols, n_pos = where.cols, runs.n_pos
    p0 = _suffix_from(runs, others)
    if others:
        masks = {r: runs.mask(r) for r in others}
        vals = {r: spread(new[r], cols, p0, n_pos) for r in others}
        hooks: Hooks = input_edits(
            bk,
            others,
            vals.__getitem__,
            lambda t: _from(masks[t], p0),
            rows,
            runs.batch,
            n_pos - p0,
        )
        start = min(r.layer for r in others)
        resid = c[bk.resid_pre(start)][:, p0:]
        read = int(readout.idx.min())
        final = run_suffix_rows(runs, c, resid.expand(rows, *resid.shape), start, p0, hooks, read)
    else:
        final = c.final.expand(rows, *c.final.shape).clone()
    if logits_nodes:
        m = _logits_mask(runs, logits_nodes[0], c.final, where)
        acc = new[logits_nodes[0]] if m is None else new[logits_nodes[0]] * m
        final = final + spread(acc, cols, 0, n_pos)
    return readout(readout.gather(final))


# ============================================================================ interactive
def live_path_hooks(
    bk: Any,
    runs_for: Callable[[Tensor], Runs],
    senders: Sequence[Node],
    receivers: Sequence[Node],
    mlps: MLPMode,
    mask: Callable[[Node], Tensor | None],
    shape: tuple[int, int],
) -> list[tuple[str, Any]]:
    """Hooks under which *any* forward pass of the model runs with ``senders`` (jointly)
    path-patched into ``receivers``.

    ``runs_for(resid0)`` makes the :class:`Runs` of the pass being run (its clean run from
    the residual stream entering block 0, plus the cached corrupted run); it is called when
    the pass enters block 0, before any receiver fires. ``mask(node)`` gives a node's
    positions for inputs of ``shape`` ``(batch, pos)``.
    """
    recv = as_receivers(receivers)
    state: dict[str, Any] = {"busy": False}

    def prepare(act: Tensor, hook: Any) -> None:
        if state["busy"]:
            return
        state["busy"] = True
        try:
            runs = runs_for(act.detach())
            n_layers = runs.bk.dims.n_layers
            entries: list[Entry] = [(o, [0], d[None]) for o, d in group_deltas(runs, senders)]
            if min(o for o, _, _ in entries) >= max(r.order(n_layers) for r in recv):
                raise ApexlensError("no sender has a path to the receivers")
            state["runs"], state["new"] = runs, propagate(runs, entries, 1, recv, mlps, lambda x: x)
        finally:
            state["busy"] = False

    def gated(fn: Any) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            if state["busy"] or "new" not in state:
                return None
            return fn(act, hook)

        return hook

    def add_logits(act: Tensor, hook: Any) -> Tensor | None:
        t = next(r for r in recv if r.kind == "logits")
        return act + logits_delta(state["runs"], t, state["new"][t][0])

    others = [t for t in recv if t.kind != "logits"]
    edit_hooks = input_edits(bk, others, lambda t: state["new"][t], mask, 1, *shape)
    hooks: list[tuple[str, Any]] = [(bk.resid_pre(0), prepare)]
    hooks += [(name, gated(fn)) for name, fn in edit_hooks]
    if len(others) < len(recv):
        hooks.append((bk.resid_post(bk.dims.n_layers - 1), gated(add_logits)))
    return hooks
