"""The circuit engine: cached runs + a keep-matrix (or many) -> per-example metric values.

A hypothesis is a set of edges of the edge graph (:class:`~apexlens.vocab.edges.EdgeIndex`),
given here already resolved to a boolean keep-matrix. Evaluating it runs the clean input once
under :class:`~apexlens.engines.circuits.plan.CircuitPlan`'s hooks. :func:`evaluate` gives the
values a report needs (the metric with the hypothesis, fully ablated and clean, and the
per-example KL divergences behind the proportion explained); :func:`circuit_rows` evaluates
many hypotheses as rows of one batched pass (faithfulness curves, discovery, the workbench).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from apexlens.engines.circuits.plan import CircuitPlan, Keep, plan_for
from apexlens.engines.circuits.resume import resumed_final
from apexlens.errors import ApexlensError
from apexlens.runs.ablation import AblationValues
from apexlens.runs.cache import Runs
from apexlens.runs.readout import Readout
from apexlens.runs.rows import row_chunks, rows_per_chunk, run_tokens
from apexlens.runs.shard import Share
from apexlens.vocab.edges import EdgeIndex


@dataclass(frozen=True)
class CircuitValues:
    """Per-example values of one evaluated hypothesis (``[batch]`` each)."""

    values: Float[Tensor, " batch"]
    """The metric with every edge outside the hypothesis ablated."""
    ablated: Float[Tensor, " batch"]
    """The metric with every edge ablated."""
    clean: Float[Tensor, " batch"]
    kl_circuit: Float[Tensor, " batch"]
    """``KL(clean || hypothesis)`` of the next-token distributions at the read positions."""
    kl_ablated: Float[Tensor, " batch"]
    """``KL(clean || fully ablated)``."""
    gap: tuple[float, float]
    """The means of ``clean`` and ``ablated`` (float64 of their float values)."""

    @property
    def recovery(self) -> float:
        """``(mean metric - mean ablated) / (mean clean - mean ablated)``."""
        clean, ablated = self.gap
        return (float(self.values.double().mean()) - ablated) / (clean - ablated)


def scratch_of(runs: Runs) -> dict[str, Any] | None:
    """The memory a circuit run on ``runs`` reuses from the previous one (the CPU only:
    :attr:`Runs.scratch`)."""
    return runs.scratch if runs.bk.device.type == "cpu" else None


def circuit_final(
    runs: Runs,
    tokens: Tensor,
    index: EdgeIndex,
    keep: Keep,
    abl: AblationValues,
    incremental: bool = False,
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream of ``tokens`` under the circuit ``keep``.

    The run holds every sender's output change at once (``[batch, pos, senders, d_model]``),
    so examples run in chunks that keep that buffer within the memory budget (at most a
    quarter over it, where that saves a small last chunk). The circuit is planned once (and
    kept for the next evaluation of the same hypothesis: :func:`plan_for`); each chunk gets
    its hooks over its own examples' ablated values. Under a shard, each rank runs a
    contiguous block of the examples (one hypothesis has one row: its examples are split).

    ``incremental``: where the whole batch runs as one chunk in one process, the pass is
    resumed from the first block whose receivers differ from the last incremental pass on
    ``runs`` (:mod:`~apexlens.engines.circuits.resume`: bit-for-bit the same result, at the
    memory of one more sender buffer kept with the runs)."""
    bk = runs.bk
    per_example = len(index.senders) * tokens.shape[1] * bk.dims.d_model * bk.dtype.itemsize
    size = max(1, runs.memory_budget // max(per_example, 1))
    n = tokens.shape[0]
    plan = plan_for(bk, index, keep, runs.scratch)
    with Share("circuit (examples)", n) as share:
        mine = share.block(n)
        m = len(mine)
        if m > size and m % size < size / 4:  # no small tail chunk: each costs a forward's
            size = -(-m // (m // size))  # fixed overhead; its examples join the others (< 25%)
        if share.world == 1 and m <= size:  # one process, one chunk: the whole batch
            if incremental and not torch.is_grad_enabled():
                return resumed_final(runs.scratch, plan, tokens, keep, abl)
            return run_tokens(bk, tokens, plan.hooks(abl, scratch_of(runs)))
        for start in range(mine.start, mine.stop, size):
            stop = min(start + size, mine.stop)
            hooks = plan.hooks(abl.rows(slice(start, stop)), scratch_of(runs))
            share.put(range(start, stop), run_tokens(bk, tokens[start:stop], hooks))
    d = bk.dims.d_model
    return share.fill(torch.empty(n, tokens.shape[1], d, dtype=bk.dtype, device=bk.device))


def circuit_rows(
    runs: Runs,
    readout: Readout,
    tokens: Tensor,
    index: EdgeIndex,
    keeps: Bool[Tensor, "rows sender receiver"] | Bool[Tensor, "rows sender receiver pos"],
    abl: AblationValues,
    progress: bool = False,
) -> Float[Tensor, "rows batch"]:
    """Per-example metric of many circuits, each a row of one batched forward pass."""
    bk = runs.bk
    n, batch, n_pos = len(keeps), runs.batch, runs.n_pos
    out = torch.empty(n, batch, dtype=bk.dtype, device=bk.device)
    d_buf = len(index.senders) * batch * n_pos * bk.dims.d_model * bk.dtype.itemsize
    chunk = rows_per_chunk(
        bk, runs.memory_budget, n, batch, n_pos, batch * n_pos, attention=True, extra=2 * d_buf
    )
    with Share("circuits", n) as share:
        for rows in row_chunks(share.mine(range(n)), chunk, desc="circuits", progress=progress):
            k = keeps[list(rows)]
            k4 = k.permute(1, 2, 0)[..., None] if k.ndim == 3 else k.permute(1, 2, 0, 3)
            m = len(rows)
            hooks = CircuitPlan(bk, index, k4, runs.scratch).hooks(abl.tiled(m), scratch_of(runs))
            final = run_tokens(bk, tokens.repeat(m, 1), hooks)
            share.put(rows, readout(readout.gather(final.reshape(m, batch, *final.shape[1:]))))
    return share.fill(out)


def _kl_of(lp_c: Tensor, lp: Tensor) -> Float[Tensor, " batch"]:
    """``KL(clean || other)`` from log-probabilities, mean over the read positions."""
    return (lp_c.exp() * (lp_c - lp)).sum(-1).mean(-1)


def _once(runs: Runs, readout: Readout, what: str, make: Any) -> Any:
    """What depends only on the cached runs and the readout, computed on the first
    hypothesis and kept with the runs (:attr:`Runs.scratch`) for the next ones."""
    key = f"circuit-fixed:{id(readout)}:{what}"
    if key not in runs.scratch:
        runs.scratch[key] = make()
    return runs.scratch[key]


def evaluate(
    runs: Runs,
    readout: Readout,
    tokens: Tensor,
    index: EdgeIndex,
    keep: Keep,
    abl: AblationValues,
    empty_is_corrupted: bool,
    incremental: bool = False,
) -> CircuitValues:
    """Evaluate one hypothesis on the clean ``tokens``: its metric, the fully ablated and the
    clean metric, and the KL divergences behind the proportion explained.

    ``empty_is_corrupted``: the fully ablated model is the corrupted run (resample ablation
    with the corrupted tokens as reference), so it is not run again; its values, the clean
    ones and the clean log-probabilities are kept with the runs for the next hypothesis.
    ``incremental``: the hypothesis' pass is resumed where the last one's can be
    (:func:`circuit_final`; the same numbers)."""
    read = readout.gather(circuit_final(runs, tokens, index, keep, abl, incremental))
    values, lp = readout.with_log_probs(read)
    clean_read = _once(runs, readout, "clean-read", lambda: readout.gather(runs.clean.final))
    clean_values, lp_c = _once(runs, readout, "clean", lambda: readout.with_log_probs(clean_read))
    if empty_is_corrupted and runs.corrupted is not None:
        k_final = runs.corrupted.final
        k_read = _once(runs, readout, "empty-read", lambda: readout.gather(k_final))

        def empty() -> tuple[Tensor, Tensor]:  # its log-probabilities are not kept
            v, lp_k = readout.with_log_probs(k_read)
            return v, _kl_of(lp_c, lp_k)

        empty_values, kl_empty = _once(runs, readout, "empty", empty)
        gap = _once(runs, readout, "gap", lambda: _gap(clean_values, empty_values))
    else:
        empty_read = readout.gather(
            circuit_final(runs, tokens, index, torch.zeros_like(keep), abl)
        )
        empty_values, lp_empty = readout.with_log_probs(empty_read)
        kl_empty = _kl_of(lp_c, lp_empty)
        gap = _gap(clean_values, empty_values)
    kl = _kl_of(lp_c, lp)
    return CircuitValues(values, empty_values, clean_values, kl, kl_empty, gap)


def _gap(clean: Tensor, empty: Tensor) -> tuple[float, float]:
    """The clean and fully ablated means; an error where they are equal."""
    c, e = torch.stack([clean, empty]).double().mean(-1).tolist()
    if c == e:
        raise ApexlensError("clean and fully ablated metrics are equal: recovery is undefined")
    return c, e
