"""Exact edge scores: ``m(full graph minus the edge) - m(clean)`` for every edge.

With every other edge present, removing one edge equals a direct path patch (attention and
MLPs frozen on the way, the network live after the receiver), so each edge is one row that
starts at its receiver's layer: the receiver's input ``resid + Delta_s`` is put in place and
only the layers from there on run. Edges into the logits need no layer at all. An edge at
one position (``per_position``) changes its receiver there only, so its row runs from that
position on (:func:`~apexlens.runs.suffix.run_suffix_rows`); rows are grouped by receiver
layer and position.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.engines.attribution.base import Job
from apexlens.model import Backend, edits
from apexlens.runs.rows import row_chunks, stack_rows
from apexlens.runs.shard import Share
from apexlens.runs.suffix import run_suffix_rows, suffix_start
from apexlens.vocab import Node


def exact_scores(job: Job) -> Float[Tensor, "edge batch"]:
    """``m(full graph minus the edge) - m(clean)`` per example for every edge row."""
    bk, runs, ro, idx, table, progress = job.bk, job.runs, job.readout, job.index, job.table, job.progress
    c = runs.clean
    D = job.delta()
    out = torch.empty(len(table), runs.batch, dtype=bk.dtype, device=bk.device)
    P = runs.n_pos

    def row_delta(rows: Tensor) -> Tensor:
        d = D[rows[:, 0]]
        p = rows[:, 2]
        if (p >= 0).any():
            m = torch.ones(len(rows), P, dtype=d.dtype, device=d.device)
            sel = p >= 0
            m[sel] = 0
            m[sel.nonzero().flatten(), p[sel]] = 1
            d = d * m[:, None, :, None]
        return d

    recv = [idx.receivers[int(j)] for j in table[:, 1].tolist()]
    start = torch.tensor(
        [
            bk.dims.n_layers + 1 if r.kind == "logits" else r.layer + (1 if r.kind == "mlp" else 0)
            for r in recv
        ]
    )
    # logits: the final residual stream moves by Delta_s, nothing runs
    lg = (start == bk.dims.n_layers + 1).nonzero().flatten()
    n_tok = runs.batch * P
    per_row_chunk = runs.rows_per_chunk(len(table), n_tok, attention=True)
    pos = _first_positions(bk, recv, table[:, 2].tolist(), int(ro.idx.min()))
    with Share("exact edge scores", len(table)) as share:  # each rank: its share of each group
        for rows in row_chunks(share.mine(lg.tolist()), 4096, desc="exact (logits)", progress=progress):
            r = torch.tensor(rows)
            final = ro.gather(c.final)[None] + ro.gather(row_delta(table[r]))
            share.put(r, ro(final))
        for layer in range(bk.dims.n_layers):
            for kind in ("head", "mlp"):
                groups: dict[int, list[int]] = {}
                for i in (start == (layer if kind == "head" else layer + 1)).nonzero().flatten().tolist():
                    if recv[i].kind == kind:
                        groups.setdefault(suffix_start(bk, pos[i]), []).append(i)
                for p0, sel in sorted(groups.items()):
                    for rows in row_chunks(
                        share.mine(sel), per_row_chunk, desc=f"exact (layer {layer})", progress=progress
                    ):
                        r = torch.tensor(rows)
                        share.put(
                            r,
                            _exact_chunk(
                                job, [recv[i] for i in rows], row_delta(table[r]), layer, kind, p0
                            ),
                        )
    return share.fill(out) - job.clean_values


def _first_positions(bk: Backend, recv: list[Node], pos: list[int], read: int) -> list[int]:
    """Each row's first position that can change what the metric reads (``read``: the
    earliest position it reads). An edge at one position changes its receiver there only.
    In the last layer, a query input or an MLP input changes the output at its own position
    only, and nothing after it mixes positions: there only the read positions count, so the
    row runs from the first of them (keys and values -- and, with them, every position of a
    key/value receiver -- still count everywhere)."""
    last = bk.dims.n_layers - 1
    out = []
    for r, p in zip(recv, pos, strict=True):
        if _own_kv(bk, r):  # a packed run (every position): see _packed_block
            out.append(0)
            continue
        p = max(0, p)
        own_position = r.kind == "mlp" or (r.kind == "head" and r.channel == "q")
        if r.layer == last and own_position:
            p = max(p, read)
        out.append(p)
    return out


def _exact_chunk(
    job: Job,
    recv: list[Node],
    delta: Float[Tensor, "rows batch pos d_model"],
    layer: int,
    kind: str,
    p0: int,
) -> Float[Tensor, "rows batch"]:
    """The metric of rows whose receivers (all heads' q/k/v inputs of ``layer``, or all MLP
    ``layer``) read ``resid + delta``, changed at positions ``p0..`` only."""
    bk, runs, ro = job.bk, job.runs, job.readout
    c = runs.clean
    n = len(recv)
    read = int(ro.idx.min())
    delta = delta[:, :, p0:]
    if kind == "mlp":
        new = bk.mlp_from_resid(layer, c[bk.mlp_in_resid(layer)][None, :, p0:] + delta)
        resid = c.resid(layer + 1, bk)[None, :, p0:] + (new - c[bk.mlp_out(layer)][None, :, p0:])
        return ro(ro.gather(run_suffix_rows(runs, c, resid, layer + 1, p0, read_from=read)))
    x = c[bk.resid_pre(layer)][None, :, p0:] + delta
    xn = None if bk.pos_embed_rows(1) is not None else bk.ln1(layer, x)
    own_kv = any(_own_kv(bk, r) for r in recv)
    if own_kv or (p0 == 0 and layer < bk.dims.n_layers - 1):
        packs = _packs(bk, recv)
        if own_kv or max(packs) + 1 < n:  # fewer runs of the block than rows
            assert p0 == 0, "a grouped-query head's own key/value runs from position 0"
            new = _packed_block(job, recv, x, xn, layer, packs)
            del x, xn, delta
            return ro(ro.gather(run_suffix_rows(runs, c, new, layer + 1, 0, read_from=read)))
    hooks = [
        (bk.qkv(layer, ch), edits.scatter_heads(torch.tensor(mine), torch.tensor(slots), vals, n))
        for ch, mine, slots, vals in _new_inputs(bk, layer, recv, x, xn, p0)
    ]
    resid = c[bk.resid_pre(layer)][:, p0:]
    final = run_suffix_rows(runs, c, resid.expand(n, *resid.shape), layer, p0, hooks, read)
    return ro(ro.gather(final))


def _own_kv(bk: Backend, r: Node) -> bool:
    """A grouped-query head's own key/value input: its slot is shared by its group, so no slot
    edit gives it alone; a packed run does (:func:`_packed_block`)."""
    return bk.dims.group > 1 and r.kind == "head" and r.channel in ("k", "v")


def _touched(bk: Backend, r: Node) -> list[int]:
    """The query heads whose ``hook_z`` a row's q/k/v slot edit changes: a query input's own
    head; a key/value slot's whole group (a key/value head, or a grouped-query head's own
    key/value: of its group, only its own ``z`` is the row's, see :func:`_own_heads`)."""
    if r.kind == "kv":
        return bk.group_heads(int(r.head or 0))
    if _own_kv(bk, r):
        return bk.group_heads(_slot(bk, r))
    return [int(r.head or 0)]


def _own_heads(bk: Backend, r: Node) -> list[int]:
    """The query heads whose ``hook_z`` change is the row's: its receiver's head, or a
    key/value head's group."""
    return bk.group_heads(int(r.head or 0)) if r.kind == "kv" else [int(r.head or 0)]


def _packs(bk: Backend, recv: list[Node]) -> list[int]:
    """Rows packed into few runs of the receivers' block: a row changes the ``hook_z`` of the
    heads its slot edit touches only, and heads attend independently, so rows touching
    different heads can share one run. ``out[i]``: row ``i``'s run (first fit)."""
    used: list[set[int]] = []
    out = []
    for r in recv:
        heads = set(_touched(bk, r))
        j = next((j for j, u in enumerate(used) if not u & heads), len(used))
        if j == len(used):
            used.append(set())
        used[j] |= heads
        out.append(j)
    return out


def _packed_block(
    job: Job,
    recv: list[Node],
    x: Float[Tensor, "rows batch pos d_model"],
    xn: Float[Tensor, "rows batch pos d_model"] | None,
    layer: int,
    packs: list[int],
) -> Float[Tensor, "rows batch pos d_model"]:
    """The residual stream leaving block ``layer`` for rows of head receivers at every
    position, the block's attention run once per pack (:func:`_packs`): each pack's q/k/v
    are the clean ones with its rows' new inputs in their slots, its heads' ``z`` computed by
    the block's own attention (:meth:`~apexlens.model.Backend.attn_z`), each row taking its
    own heads' ``z`` (a grouped-query head's own key/value: its slot holds that input in its
    pack's run, and of the group only that head's ``z`` is the row's -- an ungrouped copy of
    the layer with only its slice changed, as :mod:`apexlens.model.grouped` does). A row's
    residual stream is the clean one plus its heads' output change (through a
    post-attention norm where there is one) and the MLP's answer to it. (Its temporaries
    are gone when the rows run on.)"""
    bk, c = job.bk, job.runs.clean
    n, m = len(recv), max(packs) + 1
    pk = torch.tensor(packs)
    qkv = {}
    for ch in "qkv":
        clean = c[bk.qkv(layer, ch)]
        qkv[ch] = clean.expand(m, *clean.shape).clone()
    for ch, mine, slots, vals in _new_inputs(bk, layer, recv, x, xn, 0):
        qkv[ch][pk[mine], :, :, torch.tensor(slots)] = vals.to(qkv[ch].dtype)
    resid = c[bk.resid_pre(layer)]
    z_clean = c[bk.z(layer)]
    z = bk.attn_z(
        layer,
        stack_rows(resid.expand(m, *resid.shape)),
        *(stack_rows(qkv.pop(ch)) for ch in "qkv"),
    ).view(m, *z_clean.shape)
    own = torch.zeros(n, bk.dims.n_heads, dtype=z.dtype, device=z.device)
    for i, r in enumerate(recv):
        own[i, _own_heads(bk, r)] = 1
    dz = z[pk]  # each row: its own heads' change only
    del z
    dz.sub_(z_clean).mul_(own[:, None, None, :, None])
    attn = bk.head_delta(layer, z_clean, dz, list(range(bk.dims.n_heads)))
    del dz
    new = c.resid(layer + 1, bk) + attn
    if bk.dims.has_mlps and not bk.mlp_reads_resid_pre:
        attn += c[bk.mlp_in_resid(layer)]  # the MLP's input
        mlp = bk.mlp_from_resid(layer, attn)
        new += mlp.sub_(c[bk.mlp_out(layer)])
    return new


def _new_inputs(
    bk: Backend,
    layer: int,
    recv: list[Node],
    x: Float[Tensor, "rows batch pos d_model"],
    xn: Float[Tensor, "rows batch pos d_model"] | None,
    p0: int,
) -> Iterator[tuple[str, list[int], list[int], Float[Tensor, "k batch pos d_head"]]]:
    """Per channel with receivers among ``recv``: ``(channel, rows, slots, values)``, the
    ``hook_q/k/v`` slot each of those rows' receivers reads and its new value there
    (:func:`_inputs`)."""
    for ch in "qkv":
        mine = [i for i, r in enumerate(recv) if r.channel == ch]
        if mine:
            slots = [_slot(bk, recv[i]) for i in mine]
            yield ch, mine, slots, _inputs(bk, layer, ch, x, xn, mine, slots, p0)


def _inputs(
    bk: Backend,
    layer: int,
    ch: str,
    x: Float[Tensor, "rows batch pos d_model"],
    xn: Float[Tensor, "rows batch pos d_model"] | None,
    rows: list[int],
    slots: list[int],
    p0: int,
) -> Float[Tensor, "k batch pos d_head"]:
    """``hook_{ch}`` at slot ``slots[i]`` when the block reads ``x[rows[i]]`` (positions
    ``p0..``; ``xn``: all
    rows through ``ln1``), one batched product for the channel; a shortformer's q/k inputs
    add positional embeddings (``xn is None``): there, one product per row."""
    dev = x.device
    if xn is None:
        pos = torch.arange(p0, p0 + x.shape[2], device=dev)
        return torch.stack(
            [
                bk.head_input(layer, ch, x[r], [s], pos)[..., 0, :]
                for r, s in zip(rows, slots, strict=True)
            ]
        )
    idx = torch.tensor(slots, device=dev)
    W = bk.W_in(ch)[layer].index_select(0, idx)
    b = bk.b_in(ch)[layer].index_select(0, idx)
    sel = xn.index_select(0, torch.tensor(rows, device=dev))
    y = torch.baddbmm(b[:, None], sel.reshape(len(rows), -1, sel.shape[-1]), W)
    return y.view(*sel.shape[:-1], y.shape[-1])


def _slot(bk: Backend, r: Node) -> int:
    """The ``hook_q/k/v`` slot a receiver reads (a KV head ``L.kvJ`` is its own slot)."""
    return int(r.head or 0) if r.kind == "kv" else bk.slot(int(r.head or 0), r.channel)
