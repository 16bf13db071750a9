"""Position-restricted work: only the positions a question can reach.

With attention frozen, a residual delta stays at its own position and MLPs act position by
position, so propagating senders to receivers restricted to positions needs only those
positions (:func:`needed_columns`, :func:`take`). Once the network runs live again, a change
at position ``p`` reaches only positions ``>= p`` (causal attention): a run from a block on
whose earliest changed position is ``p0`` computes positions ``p0..`` only and reads the keys
and values of the earlier ones from the unchanged run, as a key/value cache does
(:func:`run_suffix_rows`, over :meth:`apexlens.model.Backend.prefix`). Where the model class
has no such runs (a ``TransformerBridge``), the run covers every position: same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.model import Backend
from apexlens.model.hooks import Hooks
from apexlens.runs.cache import Run, Runs
from apexlens.runs.rows import run_rows


def first_position(masks: Sequence[Bool[Tensor, "batch pos"] | None]) -> int:
    """The earliest position any of ``masks`` covers (in any example); 0 when one is
    ``None`` (every position) or none is given."""
    if not masks or any(m is None for m in masks):
        return 0
    cols = torch.stack([m.any(0) for m in masks if m is not None]).any(0)  # type: ignore[union-attr]
    hit = cols.nonzero()
    return int(hit[0, 0]) if len(hit) else 0


def needed_columns(
    masks: Sequence[Bool[Tensor, "batch pos"] | None],
    read: Int[Tensor, "batch k"] | None,
    n_pos: int,
) -> Int[Tensor, " k"] | None:
    """The positions (in any example) where the masks act or the metric reads (``read``);
    ``None`` when that is every position."""
    if any(m is None for m in masks):
        return None
    dev = read.device if read is not None else masks[0].device  # type: ignore[union-attr]
    cols = torch.zeros(n_pos, dtype=torch.bool, device=dev)
    for m in masks:
        assert m is not None
        cols |= m.any(0).to(dev)
    if read is not None:
        cols[read.flatten()] = True
    if bool(cols.all()):
        return None
    return cols.nonzero().flatten()


def take(x: Tensor, cols: Int[Tensor, " k"] | None) -> Tensor:
    """``x[..., cols, :]`` (positions on axis -2); ``x`` itself for ``None``."""
    return x if cols is None else x.index_select(-2, cols)


def spread(
    x: Float[Tensor, "... k d"], cols: Int[Tensor, " k"] | None, start: int, n_pos: int
) -> Float[Tensor, "... n d"]:
    """Values at positions ``cols`` (axis -2) laid out at positions ``start..n_pos-1``
    (zeros where ``cols`` has none; columns before ``start`` dropped)."""
    if cols is None:
        return x[..., start:, :]
    out = x.new_zeros(*x.shape[:-2], n_pos - start, x.shape[-1])
    keep = cols >= start
    out[..., cols[keep] - start, :] = x[..., keep, :]
    return out


def suffix_start(bk: Backend, p0: int) -> int:
    """``p0`` where the backend runs suffixes (:attr:`Backend.runs_suffix`), else 0."""
    return p0 if p0 > 0 and bk.runs_suffix else 0


def prefix_of(runs: Runs, run: Run, start: int, p0: int) -> Any:
    """The keys/values of ``run``'s first ``p0`` positions from block ``start`` on, computed
    once per :class:`Runs` (a partial forward of one batch over the prefix)."""
    key = f"prefix:{id(run)}:{start}:{p0}"
    hit = runs.scratch.get(key)
    if hit is None:
        resid = run.resid(start, runs.bk)[:, :p0]
        hit = runs.scratch[key] = runs.bk.prefix(resid, start)
    return hit


def run_suffix_rows(
    runs: Runs,
    run: Run,
    resid: Float[Tensor, "rows batch n d_model"],
    start: int,
    p0: int,
    hooks: Hooks = (),
) -> Float[Tensor, "rows batch pos d_model"]:
    """The final residual stream of rows that differ from ``run`` only at positions ``>=
    p0`` from block ``start`` on: ``resid`` holds those positions entering block ``start``
    (every position for ``p0 == 0``), the hooks see them only, and the positions before
    ``p0`` are ``run``'s own (its keys and values read from :func:`prefix_of`)."""
    bk = runs.bk
    n = bk.dims.n_layers
    if p0 == 0:
        return run_rows(bk, resid, start, hooks) if start < n else resid
    rows = resid.shape[0]
    final = run.final.expand(rows, *run.final.shape).clone()
    if start < n:
        final[:, :, p0:] = run_rows(bk, resid, start, hooks, past=prefix_of(runs, run, start, p0))
    else:
        final[:, :, p0:] = resid
    return final
