"""Noisy forward passes as rows: one row = one example under one (draw, sigma).

A resolved :class:`NoisePlan` says where the noise goes (sites), how it is scaled, whose it
is (the examples' ids and the seed) and which predictions are read. :func:`clean_pass` runs
the batch once without noise; :func:`noisy_logits` runs any set of rows -- each its own
example, draw and sigma -- stacked along the batch axis; :func:`sweep` runs every
(sigma, draw, example) of a :class:`SweepPlan` in chunks that fit the memory budget
(:func:`apexlens.runs.rows.row_chunks`).

* Noise at a site for row ``(i, d, sigma)``: ``sigma * xi`` (``sigma * RMS * xi`` with
  ``relative``), ``xi = plan.noise.draw(NoiseKey(seed, example_ids[i], d, site))`` -- a pure
  function of those coordinates (:mod:`~apexlens.engines.noise.rng`). So any split of the
  rows into chunks, batches or processes gives the same numbers, and draw ``d`` uses the same
  ``xi`` at every sigma (common random numbers: each draw is a ray ``sigma -> sigma * xi``).
* ``RMS``: of the site's activation in the *clean* run, over the last axis, per example and
  position (one head's value where the noise is shared over heads).
* Nothing before the first noised block changes, so rows start from the clean residual
  stream entering it; logits are computed only at the scored positions, and each scored
  position gets a degeneracy code (:mod:`~apexlens.engines.noise.degenerate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.noise.degenerate import classify, overflowed
from apexlens.engines.noise.rng import Gaussian, Noise, NoiseKey
from apexlens.errors import ApexlensError
from apexlens.model import Backend, edits
from apexlens.model.hooks import HookFn
from apexlens.runs.rows import row_chunks, rows_per_chunk
from apexlens.runs.shard import Share
from apexlens.vocab.sites import Site


@dataclass(frozen=True, kw_only=True)
class NoisePlan:
    """Where noise goes and whose it is, every argument checked at the boundary."""

    sites: tuple[Site, ...]
    relative: bool
    seed: int
    n_draws: int
    example_ids: Int[Tensor, " batch"]
    """The examples' own ids: an example's noise depends on its id, not on its row."""
    positions: Int[Tensor, "batch k"]
    """The scored positions of every example."""
    noise_positions: Int[Tensor, " p"] | None = None
    max_batch: int | None = None
    memory_budget: int = 1 << 30
    noise: Noise = field(default_factory=Gaussian)

    @property
    def names(self) -> list[str]:
        return [s.hook for s in self.sites]

    @property
    def start(self) -> int | None:
        """The first block to run (``None``: a site outside the blocks, every row runs all)."""
        entries = [entry_layer(name) for name in self.names]
        return None if None in entries else min(e for e in entries if e is not None)


@dataclass(frozen=True, kw_only=True)
class SweepPlan(NoisePlan):
    """A resolved APEX sweep: every (sigma, draw, example) is a row."""

    sigmas: Float[Tensor, " n_sigma"]


def entry_layer(name: str) -> int | None:
    """The first block that must be run for noise at ``name`` to matter (``None``: a hook
    outside the blocks, so the whole model runs). ``blocks.{l}.hook_resid_post`` is the
    residual entering block ``l + 1``; any other hook of block ``l`` fires inside it."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    layer = int(parts[1])
    return layer + 1 if name.endswith(".hook_resid_post") else layer


def clean_rms(act: Tensor, site: Site, positions: Tensor | None) -> Tensor:
    """The RMS relative noise is scaled by: over the last axis of the clean activation, per
    example and position (at ``positions``), one head's value along shared axes."""
    a = act if positions is None else act[:, positions.to(act.device)]
    r = a.pow(2).mean(dim=-1, keepdim=True).sqrt()
    for ax in site.shared_axes:
        r = r.narrow(ax + 1, 0, 1)
    return r


@dataclass
class CleanPass:
    """What the noisy rows need from the clean run."""

    logits_at: Float[Tensor, "batch k vocab"]
    """Clean logits at the scored positions (float64)."""
    entry: Tensor | None
    """The residual stream entering the first noised block."""
    like: dict[str, Tensor]
    """An empty tensor per site hook, for dtype and device."""
    shapes: dict[str, tuple[int, ...]]
    """Each site's per-example activation shape (position axis first)."""
    rms: dict[str, Tensor]
    """Each site's clean RMS (``relative``), ``[batch, p, ..., 1]``."""


def clean_pass(bk: Backend, tokens: Int[Tensor, "batch pos"], plan: NoisePlan) -> CleanPass:
    """The clean run: scored logits, the residual entering ``plan.start``, site shapes and
    clean RMS. Call it with the sites' hooks firing (:func:`apexlens.model.hooks.firing`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    like: dict[str, Tensor] = {}
    names, start = plan.names, plan.start

    def recorder(name: str) -> HookFn:  # by closure: a bridge's hook.name is an alias
        def record(act: Tensor, hook: Any) -> None:
            if name not in shapes:
                shapes[name], like[name] = tuple(act.shape[1:]), act.new_empty(0)

        return record

    n_layers = bk.dims.n_layers
    entry_name = None
    if start is not None:
        entry_name = bk.resid_pre(start) if start < n_layers else bk.resid_post(n_layers - 1)
    cache_names = ([entry_name] if entry_name else []) + (names if plan.relative else [])
    try:
        logits, cache = bk.run_with_cache(
            tokens, cache_names, fwd_hooks=[(n, recorder(n)) for n in names]
        )
    except (ValueError, NotImplementedError) as err:  # e.g. a bridge's disabled hook point
        if isinstance(err, ApexlensError):
            raise
        raise ApexlensError(f"cannot put noise at sites {names}: {err}") from err
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ApexlensError(
            f"sites {missing} never fire in a forward pass of this model (a hook point that "
            "needs a TransformerLens flag apexlens does not set, or one a bridge never calls); "
            "use a preset such as 'block_in' or 'resid_pre'"
        )
    for name in names:
        if len(shapes[name]) < 1 or shapes[name][0] != tokens.shape[1]:
            raise ApexlensError(
                f"site {name!r} has no position axis (shape {shapes[name]} per example); APEX "
                "keys each noise value by its position"
            )
    rms = {}
    if plan.relative:
        rms = {s.hook: clean_rms(cache[s.hook], s, plan.noise_positions) for s in plan.sites}
    at = logits[torch.arange(len(tokens), device=logits.device)[:, None], plan.positions.to(logits.device)]
    return CleanPass(at.double(), cache.get(entry_name) if entry_name else None, like, shapes, rms)


def site_noise(
    plan: NoisePlan,
    clean: CleanPass,
    site: Site,
    rows: Int[Tensor, " rows"],
    draws: Int[Tensor, " rows"],
    sigma: Float[Tensor, " rows"],
) -> Tensor:
    """The noise rows ``(example rows[r], draw draws[r], sigma[r])`` get at ``site``:
    ``[rows, p, ...]`` (size 1 along shared axes)."""
    like = clean.like[site.hook]
    shape = clean.shapes[site.hook]
    pos = plan.noise_positions
    positions = torch.arange(shape[0]) if pos is None else pos
    rest = [1 if i + 1 in site.shared_axes else s for i, s in enumerate(shape[1:])]
    key = NoiseKey(plan.seed, plan.example_ids[rows.cpu()], draws, site.stream)
    xi = plan.noise.draw(key, positions, rest, like)
    scale = sigma.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (xi.dim() - 1)))
    if plan.relative:
        scale = scale * clean.rms[site.hook][rows.to(like.device)]
    return scale * xi


def noisy_logits(
    bk: Backend,
    tokens: Int[Tensor, "batch pos"],
    plan: NoisePlan,
    clean: CleanPass,
    rows: Int[Tensor, " rows"],
    draws: Int[Tensor, " rows"],
    sigma: Float[Tensor, " rows"],
) -> tuple[Float[Tensor, "rows k vocab"], Int[Tensor, "rows k"]]:
    """Logits (float64) at the scored positions of rows ``(example rows[r], draw draws[r],
    noise level sigma[r])`` and their degeneracy codes."""
    start = plan.start
    pos = None if plan.noise_positions is None else plan.noise_positions.to(bk.device)
    noise = {s.hook: site_noise(plan, clean, s, rows, draws, sigma) for s in plan.sites}
    skip = bk.resid_post(start - 1) if start is not None and start >= 1 else None
    skip = skip if skip in noise else None
    hooks: list[tuple[str, HookFn]] = [(n, edits.add(v, pos)) for n, v in noise.items() if n != skip]
    bad = torch.zeros(len(rows), dtype=torch.bool, device=bk.device)

    def scale_check(act: Tensor, hook: Any) -> None:  # q/k norms fold heads into axis 0
        flat = act.detach().reshape(len(rows), -1)
        bad.logical_or_(~torch.isfinite(flat).all(dim=-1) | (flat == 0).any(dim=-1))

    hooks += [(name, scale_check) for name in bk.norm_scale_hooks()]
    dev_rows = rows.to(bk.device)
    if start is None or clean.entry is None:
        final, _ = bk.run_with_cache(tokens[dev_rows], [], fwd_hooks=hooks, logits=False)
    else:
        resid = clean.entry[dev_rows]
        if skip is not None:  # noise on the residual entering `start` goes straight in
            resid = edits.add(noise[skip], pos)(resid, None)
        final = bk.run_layers(resid, start, None, hooks)
    at = final[torch.arange(len(rows), device=bk.device)[:, None], plan.positions.to(bk.device)[dev_rows]]
    logits = bk.unembed(at).double()
    codes = classify(logits, bad[:, None] | overflowed(at))
    return logits, codes


def rows_per_pass(bk: Backend, plan: NoisePlan, clean: CleanPass, seq_len: int, n_rows: int) -> int:
    """Rows per batched pass within ``plan.memory_budget`` (or ``plan.max_batch``)."""
    if plan.max_batch is not None:
        return max(1, min(plan.max_batch, n_rows))
    site_numel = sum(math.prod(shape) for shape in clean.shapes.values())
    k, vocab = clean.logits_at.shape[1:]
    # the noise, its int64/float64 hash temporaries, the edited activations; float64 logits
    extra = site_numel * (56 + 3 * bk.dtype.itemsize) + 8 * 4 * k * vocab
    return rows_per_chunk(bk, plan.memory_budget, n_rows, 1, seq_len, seq_len, True, extra)


@dataclass
class SweepOut:
    """Every (sigma, draw, sample) of a sweep."""

    predictions: Int[Tensor, "n_sigma n_draws n_samples"]
    """Argmax of the noisy logits; ``-1`` where the pass was degenerate."""
    codes: Tensor
    """Degeneracy codes, ``uint8``, same shape."""
    prob_sum: Float[Tensor, "n_sigma vocab"]
    """Softmax of the usable passes' logits, summed per sigma."""


def sweep(
    bk: Backend,
    tokens: Int[Tensor, "batch pos"],
    plan: SweepPlan,
    clean: CleanPass,
    progress: bool = False,
) -> SweepOut:
    """Every (sigma, draw, example) of ``plan`` as rows, in chunks; samples are
    (example, scored position) pairs, example-major. Under a shard, each rank runs a
    contiguous block of the rows (their noise depends on the row's coordinates alone, so the
    split changes no draw) and the summed probabilities add up across ranks."""
    n, seq_len = tokens.shape
    n_sigma, n_draws, k = len(plan.sigmas), plan.n_draws, plan.positions.shape[1]
    total = n_sigma * n_draws * n
    vocab = clean.logits_at.shape[-1]
    preds = torch.empty(n_sigma, n_draws, n, k, dtype=torch.long)
    codes = torch.empty(n_sigma, n_draws, n, k, dtype=torch.uint8)
    prob_sum = torch.zeros(n_sigma, vocab, dtype=torch.float64, device=bk.device)
    per_pass = rows_per_pass(bk, plan, clean, seq_len, total)
    with Share("apex", total) as share:
        for chunk in row_chunks(share.block(total), per_pass, desc="apex", progress=progress):
            r = torch.arange(chunk[0], chunk[-1] + 1)
            s, d, i = r // (n_draws * n), (r // n) % n_draws, r % n
            logits, code = noisy_logits(bk, tokens, plan, clean, i, d, plan.sigmas[s])
            ok = code == 0
            pred = torch.where(ok, logits.argmax(dim=-1), torch.full_like(code, -1, dtype=torch.long))
            share.put(r, pred.cpu(), "preds")
            share.put(r, code.cpu(), "codes")
            probs = torch.where(ok[..., None], logits.softmax(dim=-1), torch.zeros_like(logits))
            prob_sum.index_add_(0, s.to(bk.device), probs.sum(dim=1))
        share.add(prob_sum, "probs")
    flat = (total, k)
    preds = share.fill(preds.view(flat), "preds").view(n_sigma, n_draws, n, k)
    codes = share.fill(codes.view(flat), "codes").view(n_sigma, n_draws, n, k)
    shape = (n_sigma, n_draws, n * k)
    return SweepOut(preds.reshape(shape), codes.reshape(shape), share.sum("probs").cpu())
