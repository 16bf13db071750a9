"""The noise engine: Gaussian noise in hidden activations, every (sigma, draw) a row.

*Where* noise goes is a list of hook names (:mod:`apexlens.vocab.sites`); *what* it is, a
noise distribution (:class:`Noise`; :class:`Gaussian` by default, the only one APEX uses): a
draw ``xi`` of a site's shape, scaled by ``sigma`` (and, with ``relative``, by the clean
activation's RMS over the last axis) -- composed in one place, :func:`scaled`.

:func:`sweep` runs a resolved :class:`SweepPlan`: every (sigma, draw) pair is a copy of the
batch; the copies are stacked along the batch axis and run together, chunked to a memory
budget. Nothing before the first noised site changes, so the run starts from the cached
clean residual stream entering the first noised block, and logits are computed only at the
scored positions.

**Common random numbers.** Draw ``d`` uses the *same* standard-normal ``xi_d`` at every
``sigma`` (scaled by that ``sigma``). The generator is consumed in a fixed order -- draw by
draw, and within a draw site by site in the order the hooks fire, one
``randn(batch, *activation.shape[1:])`` each -- so a sweep gives the same numbers as a plain
loop of forward passes under :func:`noise_fwd_hooks` with the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import Backend, edits
from apexlens.model.hooks import HookFn
from apexlens.runs.rows import row_chunks, rows_per_chunk, run_rows
from apexlens.runs.shard import Share
from apexlens.vocab.positions import shared_positions


class Noise(Protocol):
    """A noise distribution: standard draws of a given shape (then scaled by ``sigma``)."""

    name: str

    def draw(self, generator: torch.Generator | None, shape: Sequence[int], like: Tensor) -> Tensor:
        """A standard draw of ``shape`` in ``like``'s dtype, on ``like``'s device."""
        ...


class Gaussian:
    """``xi ~ N(0, I)``: APEX's noise (Ren, Luo & Li 2026)."""

    name = "gaussian"

    def draw(self, generator: torch.Generator | None, shape: Sequence[int], like: Tensor) -> Tensor:
        """Drawn on the generator's device (so a seed means the same numbers wherever the
        model is), then moved to ``like``'s."""
        device = generator.device if generator is not None else like.device
        xi = torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype)
        return xi.to(like.device)


def rms(act: Tensor) -> Tensor:
    """Root mean square over the last axis, kept as a length-1 axis."""
    return act.pow(2).mean(dim=-1, keepdim=True).sqrt()


def scaled(xi: Tensor, sigma: Tensor | float, scale: Tensor | None) -> Tensor:
    """The noise added at a site: ``sigma * xi``, or ``sigma * RMS * xi`` (``scale``: the RMS
    of the activation it is scaled by)."""
    return (sigma * scale if scale is not None else sigma) * xi


def entry_layer(name: str) -> int | None:
    """The first block that must be run for noise at ``name`` to matter (``None``: a hook
    outside the blocks, so the whole model runs). ``blocks.{l}.hook_resid_post`` is the
    residual entering block ``l + 1``; any other hook of block ``l`` fires inside it."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    layer = int(parts[1])
    return layer + 1 if name.endswith(".hook_resid_post") else layer


def noise_fwd_hooks(
    names: Sequence[str],
    sigma: float,
    *,
    relative: bool = False,
    positions: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, fn)`` pairs that add ``sigma``-scaled noise at the hooks ``names``
    (arguments checked by the caller). Each time a hook fires it draws ``xi`` from
    ``generator`` (the global RNG if ``None``) -- shaped like the activation, or like its
    ``positions`` slice -- and adds :func:`scaled` noise, with ``relative`` the RMS of the
    activation reaching the hook."""
    dist = noise or Gaussian()

    def hook(act: Tensor, hook: Any) -> Tensor:
        pos = None if positions is None else shared_positions(positions, act.shape[1], "positions")
        ref = act.detach() if pos is None else act.detach()[:, pos.to(act.device)]
        xi = dist.draw(generator, ref.shape, act)
        delta = scaled(xi, sigma, rms(ref) if relative else None)
        return edits.add(delta, None if pos is None else pos.to(act.device))(act, hook)

    return [(name, hook) for name in names]


@dataclass
class CleanPass:
    """What the sweep needs from the clean run."""

    logits_at: Float[Tensor, "n_samples d_vocab"]
    entry: Tensor | None  # the residual entering the first noised block
    like: dict[str, Tensor]  # an empty tensor per site, in firing order, for dtype/device
    shapes: dict[str, tuple[int, ...]]
    rms: dict[str, Tensor]


@dataclass(frozen=True)
class SweepPlan:
    """A resolved APEX sweep: sites (hook names), noise levels and draws, where the noise
    goes and which predictions are read -- every argument checked at the boundary."""

    names: list[str]
    sigmas: Float[Tensor, " n_sigma"]
    n_draws: int
    relative: bool
    noise_positions: Int[Tensor, " k"] | None
    sample_example: Int[Tensor, " n_samples"]
    sample_position: Int[Tensor, " n_samples"]
    max_batch: int | None = None
    memory_budget: int = 1 << 30
    noise: Noise = Gaussian()

    @property
    def start(self) -> int | None:
        """The first block to run (``None``: a site outside the blocks, every draw runs all)."""
        entries = [entry_layer(name) for name in self.names]
        return None if None in entries else min(e for e in entries if e is not None)


def clean_pass(bk: Backend, tokens: Tensor, plan: SweepPlan) -> CleanPass:
    """The clean run: predictions, the residual entering ``plan.start``, site shapes and
    firing order, and the sites' RMS (``relative``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    like: dict[str, Tensor] = {}
    names, start = plan.names, plan.start

    def recorder(name: str) -> HookFn:  # by closure: a bridge's hook.name is an alias
        def record(act: Tensor, hook: Any) -> None:
            if name not in shapes:
                shapes[name], like[name] = tuple(act.shape), act.new_empty(0)

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
            f"sites {missing} never fire in a forward pass of this model "
            "(is the TransformerLens flag that enables them off?)"
        )
    pos = plan.noise_positions
    if pos is not None:
        for name in names:
            if len(shapes[name]) < 2 or shapes[name][1] != tokens.shape[1]:
                raise ApexlensError(
                    f"noise_positions needs positions on axis 1, but {name!r} has shape "
                    f"{shapes[name]}"
                )
    site_rms: dict[str, Tensor] = {}
    if plan.relative:
        for name in names:
            act = cache[name]
            site_rms[name] = rms(act if pos is None else act[:, pos.to(act.device)])
    ex, sp = plan.sample_example.to(logits.device), plan.sample_position.to(logits.device)
    logits_at = logits[ex, sp].double()
    return CleanPass(logits_at, cache.get(entry_name) if entry_name else None, like, shapes, site_rms)


def _rows_per_pass(bk: Backend, plan: SweepPlan, clean: CleanPass, n: int, seq_len: int) -> int:
    """(sigma, draw) combinations per batched pass, within the memory budget."""
    if plan.max_batch is not None:
        return max(1, min(plan.max_batch // n, plan.n_draws * len(plan.sigmas)))
    shapes = _noise_shapes(plan, clean, n)
    site_numel = sum(math.prod(shapes[name][1:]) for name in clean.like)
    samples = len(plan.sample_example)
    extra = 3 * site_numel * bk.dtype.itemsize + 8 * 3 * (samples // n + 1) * bk.dims.d_vocab
    rows = rows_per_chunk(bk, plan.memory_budget, 10**9, 1, seq_len, seq_len, True, extra)
    return max(1, min(plan.n_draws * len(plan.sigmas), rows // n))


def _noise_shapes(plan: SweepPlan, clean: CleanPass, n: int) -> dict[str, tuple[int, ...]]:
    pos = plan.noise_positions
    return {
        name: (n, *clean.shapes[name][1:])
        if pos is None
        else (n, len(pos), *clean.shapes[name][2:])
        for name in clean.like
    }


def sweep(
    bk: Backend,
    tokens: Tensor,
    plan: SweepPlan,
    clean: CleanPass,
    generator: torch.Generator,
    progress: bool = False,
    advance: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every (draw, sigma) as rows of one batched run; returns predictions
    ``[n_sigma, n_draws, n_samples]`` (``-1``: the logits were not finite), the summed
    softmax per sigma and the count of finite draws per sigma.

    Under a shard each rank runs a contiguous block of the (draw, sigma) rows, draw-major. It
    still consumes the generator from the first draw (drawing and discarding the draws before
    its block: the same numbers whatever the split); ``advance``: also draw the ones after
    its block, so the caller's generator ends where one process would leave it."""
    n, seq_len = tokens.shape
    sig = plan.sigmas
    n_combo = plan.n_draws * len(sig)
    per_chunk = _rows_per_pass(bk, plan, clean, n, seq_len)
    samples = len(plan.sample_example)
    d_vocab = clean.logits_at.shape[-1]
    xi = _Draws(plan, clean, n, generator)
    with Share("apex", n_combo) as share:
        mine = list(share.block(n_combo))
        prob_sum = torch.zeros(len(sig), d_vocab, dtype=torch.float64, device=bk.device)
        n_finite = torch.zeros(len(sig), dtype=torch.long)
        for combos in row_chunks(mine, per_chunk, desc="apex", progress=progress):
            combo = torch.tensor(list(combos))
            draws, sidx = combo // len(sig), combo % len(sig)
            noise = xi.scaled(draws, sidx, int(mine[0]) // len(sig), bk.device)
            logits = _noisy_logits(bk, tokens, plan, clean, noise)
            finite = torch.isfinite(logits).all(dim=-1)
            pred = torch.where(
                finite, logits.argmax(dim=-1), torch.full_like(finite, -1, dtype=torch.long)
            )
            share.put(combo, pred.cpu())
            probs = torch.where(finite[..., None], logits.softmax(dim=-1), torch.zeros_like(logits))
            prob_sum.index_add_(0, sidx.to(bk.device), probs.sum(dim=1))
            n_finite.index_add_(0, sidx, finite.sum(dim=1).cpu())
        if mine:
            share.add(prob_sum, "probs")
            share.add(n_finite, "finite")
        if advance:
            xi.through(plan.n_draws - 1)
    by_combo = share.fill(torch.empty(n_combo, samples, dtype=torch.long))
    preds = by_combo.view(plan.n_draws, len(sig), samples).transpose(0, 1).contiguous()
    return preds, share.sum("probs", bk.device), share.sum("finite")


class _Draws:
    """The standard draws ``xi_d`` of every site, made in the one fixed order (draw by draw,
    site by site) from the generator, kept while rows still need them."""

    def __init__(self, plan: SweepPlan, clean: CleanPass, n: int, generator: torch.Generator):
        self.plan, self.clean, self.generator = plan, clean, generator
        self.order = list(clean.like)
        self.shapes = _noise_shapes(plan, clean, n)
        self.kept: dict[int, dict[str, Tensor]] = {}
        self.next = 0

    def through(self, last: int, first_kept: int = 0) -> None:
        """Draw up to draw ``last``, keeping those from ``first_kept`` on."""
        while self.next <= last:
            d = {
                name: self.plan.noise.draw(self.generator, self.shapes[name], self.clean.like[name])
                for name in self.order
            }
            if self.next >= first_kept:
                self.kept[self.next] = d
            self.next += 1

    def scaled(
        self, draws: Tensor, sidx: Tensor, first_kept: int, device: torch.device
    ) -> dict[str, Tensor]:
        """The noise of every row ``(draws[i], sigmas[sidx[i]])``, per site."""
        self.through(int(draws[-1]), first_kept)
        for d in [d for d in self.kept if d < int(draws[0])]:
            del self.kept[d]
        sig_dev = self.plan.sigmas.to(device)
        noise: dict[str, Tensor] = {}
        for name in self.order:
            stack = torch.stack([self.kept[int(d)][name] for d in draws])  # [chunk, n, ...]
            s = sig_dev[sidx].to(stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
            site_rms = self.clean.rms[name].unsqueeze(0) if self.plan.relative else None
            noise[name] = scaled(stack, s, site_rms)
        return noise


def _noisy_logits(
    bk: Backend, tokens: Tensor, plan: SweepPlan, clean: CleanPass, noise: dict[str, Tensor]
) -> Float[Tensor, "chunk n_samples vocab"]:
    """Logits at the scored samples of every row (a copy of the batch with its own noise)."""
    start = plan.start
    pos = None if plan.noise_positions is None else plan.noise_positions.to(bk.device)
    ex, sp = plan.sample_example.to(bk.device), plan.sample_position.to(bk.device)
    n_chunk = next(iter(noise.values())).shape[0]
    flat = {name: v.reshape(-1, *v.shape[2:]) for name, v in noise.items()}
    direct = start is not None and start >= 1 and bk.resid_post(start - 1) in noise
    skip = bk.resid_post(start - 1) if direct and start is not None else None
    hooks = [(name, edits.add(flat[name], pos)) for name in flat if name != skip]
    if start is None or clean.entry is None:
        full, _ = bk.run_with_cache(tokens.repeat(n_chunk, 1), [], fwd_hooks=hooks)
        return full.view(n_chunk, tokens.shape[0], *full.shape[1:])[:, ex, sp].double()
    resid = clean.entry.expand(n_chunk, *clean.entry.shape).clone()
    if skip is not None:  # noise on the residual entering `start` goes straight in
        if pos is None:
            resid += noise[skip]
        else:
            resid[:, :, pos] += noise[skip]
    final = run_rows(bk, resid, start, hooks)
    return bk.unembed(final[:, ex, sp]).double()
