"""The activation-patching engine: cached runs + nodes -> per-row metric values.

Activation patching (TransformerLens' ``get_act_patch_*`` convention) runs the corrupted
input and puts one node's clean activation back -- a head's ``hook_z``, an MLP's
``hook_mlp_out``, the residual stream entering a block (``"rL"``, ``"embed"`` = ``r0``) --
and lets everything downstream recompute. One row per node; nodes of the same layer run
together, each row starting from the cached corrupted residual stream entering that layer
(nothing before it changes), so the earlier layers are never recomputed. A node patched at
positions changes nothing before the first of them: rows are grouped by layer and first
position, and run only from there (:func:`~apexlens.runs.suffix.run_suffix_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import edits
from apexlens.runs import Readout, Runs, row_chunks, stack_rows
from apexlens.runs.shard import Share
from apexlens.runs.suffix import first_position, run_suffix_rows, suffix_start
from apexlens.vocab import Node, unique


def check_nodes(nodes: Sequence[Node]) -> list[Node]:
    """Nodes activation patching can patch: outputs (heads, MLPs, embed, residual streams)."""
    out = list(nodes)
    for n in out:
        if n.kind in ("logits", "kv") or (n.kind == "head" and n.channel is not None):
            raise ApexlensError(f"activation patching patches outputs; {n} is not one")
        if n.kind in ("tok_embed", "pos_embed"):
            raise ApexlensError(f"activation patching patches 'embed' (or 'r0'), not {n}")
    if not out:
        raise ApexlensError("the node set is empty")
    return unique(out, "node")


def per_position(
    nodes: list[Node], grid: tuple[int, ...] | None, n_pos: int
) -> tuple[list[Node], tuple[int, ...]]:
    """Every node at every position on its own, and the result's grid: for all heads
    TransformerLens' ``by_pos`` layout ``[layer, pos, head]``, else ``[node, pos]``."""
    if any(n.positions is not None for n in nodes):
        raise ApexlensError("per_position=True patches every position: give nodes without '@'")
    if grid is not None:
        layers, heads = grid
        out = [
            Node("head", la, h).at(p)
            for la in range(layers)
            for p in range(n_pos)
            for h in range(heads)
        ]
        return out, (layers, n_pos, heads)
    out = [n.at(p) for n in nodes for p in range(n_pos)]
    return out, (len(out) // n_pos, n_pos)


def act_patch_rows(
    runs: Runs, readout: Readout, nodes: Sequence[Node], *, progress: bool = False
) -> Float[Tensor, "node batch"]:
    """Per-example metric with each node's clean activation put into the corrupted run."""
    bk, k = runs.bk, runs.corrupted
    assert k is not None, "activation patching needs a corrupted run"
    nodes = check_nodes(nodes)
    out = torch.empty(len(nodes), runs.batch, dtype=bk.dtype, device=bk.device)
    by_start: dict[tuple[int, int], list[int]] = {}
    for i, n in enumerate(nodes):
        layer = 0 if n.kind == "embed" else n.layer
        by_start.setdefault((layer, suffix_start(bk, first_position([runs.mask(n)]))), []).append(i)
    chunk = runs.rows_per_chunk(len(nodes), runs.batch * runs.n_pos, attention=True, readout=readout)
    with Share("activation patching", len(nodes)) as share:
        # every rank takes its share of every (layer, first position) group (later ones
        # cost less)
        mine = {start: share.mine(idx) for start, idx in sorted(by_start.items())}
        work = [
            (start, idx[j : j + chunk])
            for start, idx in mine.items()
            for j in range(0, len(idx), chunk)
        ]
        for piece in row_chunks(work, 1, desc="activation patching", progress=progress):
            (layer, p0), idx = piece[0]
            rows = [nodes[i] for i in idx]
            resid = k.resid(layer, bk)[:, p0:].expand(len(rows), -1, -1, -1).clone()
            _restore_resid(runs, rows, resid, layer, p0)
            hooks = _restore_hooks(runs, rows, layer, p0)
            final = run_suffix_rows(runs, k, resid, layer, p0, hooks, int(readout.idx.min()))
            share.put(idx, readout(readout.gather(final)))
    return share.fill(out)


def _restore_resid(runs: Runs, rows: list[Node], resid: Tensor, layer: int, p0: int) -> None:
    """Rows patching a residual stream (``embed``, ``rL``) start from the clean one there
    (``resid`` holds positions ``p0..``)."""
    clean = runs.clean.resid(layer, runs.bk)[:, p0:]
    for r, n in enumerate(rows):
        if n.kind in ("embed", "resid"):
            m = runs.mask(n)
            resid[r] = clean if m is None else torch.where(m[:, p0:, None], clean, resid[r])


def _restore_hooks(
    runs: Runs, rows: list[Node], layer: int, p0: int
) -> list[tuple[str, Any]]:
    """Hook edits putting clean head outputs (``hook_z``) and MLP outputs back, per row (at
    positions ``p0..``)."""
    bk, c = runs.bk, runs.clean
    hooks: list[tuple[str, Any]] = []
    n_rows, shape = len(rows), (runs.batch, runs.n_pos - p0)
    heads = [(r, n) for r, n in enumerate(rows) if n.kind == "head"]
    if heads:
        sel = torch.zeros(n_rows, *shape, bk.dims.n_heads, dtype=torch.bool, device=bk.device)
        for r, n in heads:
            m = runs.mask(n)
            sel[r, :, :, n.head] = True if m is None else m[:, p0:]
        z = c[bk.z(layer)][:, p0:]
        clean_z = z.expand(n_rows, *z.shape)
        hooks.append(
            (bk.z(layer), edits.replace_where(stack_rows(sel)[..., None], stack_rows(clean_z)))
        )
    mlps = [(r, n) for r, n in enumerate(rows) if n.kind == "mlp"]
    if mlps:
        sel = torch.zeros(n_rows, *shape, dtype=torch.bool, device=bk.device)
        for r, n in mlps:
            m = runs.mask(n)
            sel[r] = True if m is None else m[:, p0:]
        mlp = c[bk.mlp_out(layer)][:, p0:]
        clean_out = mlp.expand(n_rows, *mlp.shape)
        hooks.append(
            (
                bk.mlp_out(layer),
                edits.replace_where(stack_rows(sel)[..., None], stack_rows(clean_out)),
            )
        )
    return hooks
