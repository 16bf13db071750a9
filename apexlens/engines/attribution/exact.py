"""Exact edge scores: ``m(full graph minus the edge) - m(clean)`` for every edge.

With every other edge present, removing one edge equals a direct path patch (attention and
MLPs frozen on the way, the network live after the receiver), so each edge is one row that
starts at its receiver's layer: the receiver's input ``resid + Delta_s`` is put in place and
only the layers from there on run. Edges into the logits need no layer at all.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.engines.attribution.base import Job
from apexlens.model import edits
from apexlens.runs.rows import row_chunks, run_rows
from apexlens.runs.shard import Share
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
    with Share("exact edge scores", len(table)) as share:  # each rank: its share of each layer
        for rows in row_chunks(share.mine(lg.tolist()), 4096, desc="exact (logits)", progress=progress):
            r = torch.tensor(rows)
            final = ro.gather(c.final)[None] + ro.gather(row_delta(table[r]))
            share.put(r, ro(final))
        for layer in range(bk.dims.n_layers):
            for kind in ("head", "mlp"):
                sel = [
                    i
                    for i in (start == (layer if kind == "head" else layer + 1))
                    .nonzero()
                    .flatten()
                    .tolist()
                    if recv[i].kind == kind
                ]
                for rows in row_chunks(
                    share.mine(sel), per_row_chunk, desc=f"exact (layer {layer})", progress=progress
                ):
                    r = torch.tensor(rows)
                    share.put(
                        r,
                        _exact_chunk(
                            job, table[r], [recv[i] for i in rows], row_delta(table[r]), layer, kind
                        ),
                    )
    return share.fill(out) - job.clean_values


def _exact_chunk(
    job: Job,
    rows: Tensor,
    recv: list[Node],
    delta: Float[Tensor, "rows batch pos d_model"],
    layer: int,
    kind: str,
) -> Float[Tensor, "rows batch"]:
    bk, runs, ro = job.bk, job.runs, job.readout
    c = runs.clean
    n = len(rows)
    if kind == "mlp":
        new = bk.mlp_from_resid(layer, c[bk.resid_mid(layer)][None] + delta)
        resid = c.resid(layer + 1, bk)[None] + (new - c[bk.mlp_out(layer)][None])
        final = run_rows(bk, resid, layer + 1) if layer + 1 < bk.dims.n_layers else resid
        return ro(ro.gather(final))
    x = c[bk.resid_pre(layer)][None] + delta
    hooks = []
    for ch in "qkv":
        mine = [i for i, r in enumerate(recv) if r.channel == ch]
        if not mine:
            continue
        heads = [int(recv[i].head or 0) for i in mine]
        vals = torch.empty(len(mine), *x.shape[1:3], bk.dims.d_head, dtype=x.dtype, device=x.device)
        for h in sorted(set(heads)):
            at = [j for j, hh in enumerate(heads) if hh == h]
            xi = x[[mine[j] for j in at]]
            vals[at] = bk.head_input(layer, ch, xi, [h])[..., 0, :]
        hooks.append(
            (
                bk.qkv(layer, ch),
                edits.scatter_heads(torch.tensor(mine), torch.tensor(heads), vals, n),
            )
        )
    resid = c[bk.resid_pre(layer)].expand(n, *c[bk.resid_pre(layer)].shape)
    final = run_rows(bk, resid, layer, hooks)
    return ro(ro.gather(final))
