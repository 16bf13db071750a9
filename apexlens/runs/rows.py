"""Rows: the one place where apexlens produces its modified copies of a batch.

What an engine computes is a set of *rows* -- one per sender, node, circuit or (sigma, draw)
-- each a modified copy of the batch, stacked along the batch axis and run together
(:func:`run_rows`), in chunks that fit the memory budget with one progress bar
(:func:`row_chunks`). Under :func:`apexlens.sharded`, an engine takes its rows from a
:class:`~apexlens.runs.shard.Share` (this rank's part) and gives the per-row results back to
it; progress bars show on rank 0 only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from jaxtyping import Float, Int
from torch import Tensor

from apexlens.model import Backend
from apexlens.model.hooks import Hooks
from apexlens.runs.shard import is_writer

T = TypeVar("T")


PROGRESS_DELAY = 0.5
"""Seconds before a progress bar appears: quick calls print nothing."""


def row_chunks(
    items: Sequence[T], size: int, *, desc: str, progress: bool
) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of ``size``, with one progress bar (on stderr)."""
    chunks = [items[i : i + size] for i in range(0, len(items), max(1, size))]
    if not (progress and is_writer()):
        yield from chunks
        return
    with progress_bar(len(items), desc, True, unit="row") as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "step") -> Any:
    """A progress bar named ``desc`` counting ``total`` steps (a silent one when not
    ``enabled``): tqdm's notebook widget in Jupyter, else a text bar on stderr. It appears
    only when the work takes longer than :data:`PROGRESS_DELAY` seconds and is removed when
    done. Every public function that may take more than a few seconds shows one by default
    (``progress=False`` turns it off); engines receive the flag, they never decide it. Under
    a shard, only rank 0 shows it: progress is shown once."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        leave=False,
        disable=not (enabled and is_writer()),
        delay=PROGRESS_DELAY,
        dynamic_ncols=True,
    )


def stack_rows(x: Float[Tensor, "rows batch ..."]) -> Float[Tensor, "n ..."]:
    """``[rows, batch, ...]`` -> ``[rows * batch, ...]``: rows stacked along the batch."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run_rows(
    bk: Backend,
    resid: Float[Tensor, "rows batch pos d_model"],
    start: int,
    hooks: Hooks = (),
    stop: int | None = None,
    past: Any = None,
) -> Float[Tensor, "rows batch pos d_model"]:
    """Run blocks ``start..stop-1`` on every row at once (rows stacked along the batch);
    hooks see ``[rows * batch, ...]`` activations. Returns the residual leaving the last block.
    ``past``: the positions before ``resid``'s as a :meth:`Backend.prefix` of one batch."""
    rows, batch = resid.shape[:2]
    out = bk.run_layers(stack_rows(resid), start, stop, hooks, past=past)
    return out.reshape(rows, batch, *out.shape[1:])


def run_tokens(
    bk: Backend, tokens: Int[Tensor, "batch pos"], hooks: Hooks
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream of a whole forward pass of ``tokens`` under ``hooks``."""
    final, _ = bk.run_with_cache(tokens, [], fwd_hooks=hooks, logits=False)
    return final


def rows_per_chunk(
    bk: Backend,
    budget: int,
    n_rows: int,
    batch: int,
    n_pos: int,
    n_tok: int,
    attention: bool,
    extra: int = 0,
) -> int:
    """Rows per chunk within ``budget`` bytes (``extra``: more bytes per row)."""
    d = bk.dims
    per_tok = (10 * d.d_model + 2 * bk.dims.d_mlp + 4 * d.n_heads * d.d_head) * bk.dtype.itemsize
    attn = batch * d.n_heads * n_pos * n_pos * 3 * bk.dtype.itemsize if attention else 0
    per_row = n_tok * per_tok + attn + extra
    return max(1, min(n_rows, budget // max(per_row, 1)))
