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

import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.model import Backend
from apexlens.model.hooks import Hooks
from apexlens.runs.cache import Run, Runs
from apexlens.runs.rows import run_rows, stack_rows


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
    read_from: int = 0,
) -> Float[Tensor, "rows batch pos d_model"]:
    """The final residual stream of rows that differ from ``run`` only at positions ``>=
    p0`` from block ``start`` on: ``resid`` holds those positions entering block ``start``
    (every position for ``p0 == 0``), the hooks see them only, and the positions before
    ``p0`` are ``run``'s own (its keys and values read from :func:`prefix_of`).

    ``read_from``: the first position anyone reads from the result. The last block then
    computes its output only from there on (:func:`last_block_from`): the positions between
    ``p0`` and ``read_from`` give it their keys and values only, and hold NaN in the result
    -- never a number that was not computed."""
    bk = runs.bk
    n = bk.dims.n_layers
    q0 = last_block_from(bk, start, p0, read_from, hooks)
    if q0 > p0:
        return _run_reading_from(runs, run, resid, start, p0, q0, hooks)
    if p0 == 0:
        return run_rows(bk, resid, start, hooks) if start < n else resid
    rows = resid.shape[0]
    final = run.final.expand(rows, *run.final.shape).clone()
    if start < n:
        final[:, :, p0:] = run_rows(bk, resid, start, hooks, past=prefix_of(runs, run, start, p0))
    else:
        final[:, :, p0:] = resid
    return final


_BLOCK = re.compile(r"blocks\.(\d+)\.")
_POSITIONWISE = re.compile(
    r"blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_(attn|mlp)_(in|out)|hook_[qkv]_input"
    r"|ln[12](_post)?\.hook_(scale|normalized)|attn\.hook_[qkvz]|mlp\.hook_(pre|pre_linear|post))$"
)
"""Hook points whose activation has positions on axis 1, the ones a run split at a position
can show a slice of (not ``hook_pattern``, ``hook_attn_scores`` or the rotated keys, which
see every position at once); the edit there must be marked ``positionwise`` too
(:mod:`apexlens.model.edits`)."""


def last_block_from(bk: Backend, start: int, p0: int, read_from: int, hooks: Hooks) -> int:
    """Where the last block's output is computed from in a run of blocks ``start..`` whose
    result is read from position ``read_from`` on: there, when the run can be split at a
    position (:attr:`Backend.runs_suffix`) and every hook of the last block acts position by
    position (:mod:`apexlens.model.edits`: marked ``positionwise``, at a hook point whose
    activation has positions on axis 1) and no hook of anyone else's is on the block; else
    ``p0`` (every changed position). Nothing after the last block mixes
    positions, so the positions before ``read_from`` matter there only through their keys
    and values."""
    last = bk.dims.n_layers - 1
    if read_from <= p0 or start > last or not bk.runs_suffix or bk.block_hooked(last):
        return p0
    for name, fn in hooks:
        if _in_block(name, last) and not (
            _POSITIONWISE.fullmatch(name) and getattr(fn, "positionwise", False)
        ):
            return p0
    return read_from


def _run_reading_from(
    runs: Runs,
    run: Run,
    resid: Float[Tensor, "rows batch n d_model"],
    start: int,
    p0: int,
    q0: int,
    hooks: Hooks,
) -> Float[Tensor, "rows batch pos d_model"]:
    """:func:`run_suffix_rows` whose last block computes positions ``q0..`` only: blocks
    ``start..`` up to the last run on positions ``p0..``; the last block's keys and values of
    positions ``p0..q0-1`` are recorded under its hooks (shown those positions), then it runs
    on positions ``q0..`` reading them (and ``run``'s own before ``p0``)."""
    bk = runs.bk
    last = bk.dims.n_layers - 1
    rows, width = resid.shape[0], resid.shape[2]
    early = [(h, f) for h, f in hooks if not _in_block(h, last)]
    late = [(h, f) for h, f in hooks if _in_block(h, last)]
    past = prefix_of(runs, run, start, p0) if p0 > 0 else None
    x = resid if start == last else run_rows(bk, resid, start, early, stop=last, past=past)
    cut = q0 - p0
    keys = bk.prefix(  # after ``past``'s last-block keys and values (of ``run``'s first p0)
        stack_rows(x[:, :, :cut]), last, hooks=_on_positions(late, 0, cut, width), past=past
    )
    out = run_rows(bk, x[:, :, cut:], last, _on_positions(late, cut, width, width), past=keys)
    final = run.final.new_full((rows, *run.final.shape), float("nan"))
    final[:, :, q0:] = out
    return final


def _in_block(name: str, layer: int) -> bool:
    m = _BLOCK.match(name)
    return m is not None and int(m.group(1)) == layer


def _on_positions(hooks: Hooks, lo: int, hi: int, width: int) -> list[tuple[str, Any]]:
    """``hooks`` made for positions ``0..width-1`` (of the run's own), shown positions
    ``lo..hi-1`` only: each sees its activation laid into a full-width one (zeros
    elsewhere, which position-wise edits never mix in) and hands back its slice."""

    def sliced(fn: Any) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            full = act.new_zeros(act.shape[0], width, *act.shape[2:])
            full[:, lo:hi] = act
            out = fn(full, hook=hook)
            return (full if out is None else out)[:, lo:hi]

        return hook

    return [(name, sliced(fn)) for name, fn in hooks]
