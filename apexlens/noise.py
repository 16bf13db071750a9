"""APEX: probing a network by adding Gaussian noise to its hidden activations.

APEX (Ren, Luo & Li 2026, "Probing Neural Networks via Activation Perturbation",
arXiv 2602.03586) keeps the input and the weights fixed and adds noise ``sigma * xi``,
``xi ~ N(0, I)``, to hidden activations at inference. For every input and every noise
level ``sigma``, ``K`` Monte-Carlo forward passes give an empirical distribution over the
predicted token. Two regimes show up:

* **small sigma -- sample regularity.** How much noise a sample's prediction withstands:
  its *escape noise* is the smallest ``sigma`` at which the clean prediction is no longer
  predicted by a majority of the draws. Confident, "regular" samples escape late.
* **large sigma -- model bias.** The behaviour stops depending on the sample: predictions
  concentrate on the tokens the model itself is biased toward. In a backdoored model they
  concentrate sharply on the backdoor target, from clean inputs alone.

Input perturbation is the special case of noise on the embeddings only (preset ``"embed"``).

Where the noise goes (``sites``)
--------------------------------
Sites are spelled in apexlens' one vocabulary (:func:`apexlens.graph.parse_sites`): any
TransformerLens hook point by name (``"blocks.3.attn.hook_z"``), a node (``"embed"``,
``"r5"`` = the residual stream entering block 5, ``"m3"`` = MLP 3's output), or a preset:

=================  ======================================================================
``"resid_post"``   every block's output ``blocks.{l}.hook_resid_post`` (the paper; default)
``"embed"``        the input to block 0, ``blocks.0.hook_resid_pre`` (input perturbation)
``"resid_pre"``    every block's input ``blocks.{l}.hook_resid_pre``
``"resid_mid"``    ``blocks.{l}.hook_resid_mid``
``"attn_out"``     ``blocks.{l}.hook_attn_out``
``"mlp_out"``      ``blocks.{l}.hook_mlp_out``
``"z"``            head outputs ``blocks.{l}.attn.hook_z`` (every head of the layer)
=================  ======================================================================

A preset may be restricted to layers: ``"resid_pre:6"``, ``"z:0,1"``, ``"mlp_out:-1"``.
Raw ``hook_embed`` / ``hook_pos_embed`` also work (then every draw runs the whole model).
On a ``TransformerBridge``, ``blocks.{l}.hook_resid_mid`` is the MLP's input hook, so noise
there reaches the MLP only, not the residual stream that skips past it.

How big the noise is (``relative``)
-----------------------------------
* ``relative=False``: ``sigma`` is the absolute standard deviation, as in the paper.
* ``relative=True``: residual norms grow with depth, so the same ``sigma`` means very
  different things at different sites. Here the standard deviation at a site is
  ``sigma * RMS(a)``, where ``a`` is the activation at that site *of the clean run*, and
  the RMS is taken over the **last axis only**, separately for every example and position
  (and head, for ``hook_z``): ``RMS(a)[b, p] = sqrt(mean_i a[b, p, i]**2)``.
  ``sigma = 1`` thus adds noise as large as the activation itself.
  (:func:`noise_hooks` has no clean run to look at: there ``RMS`` is taken of the
  activation as it reaches the hook, which equals the clean one at the first noised site.)

Common random numbers
---------------------
Draw ``d`` uses the *same* standard-normal ``xi_d`` at every ``sigma`` (scaled by that
``sigma``). Every row of the sweep has exactly the right marginal distribution, and the
differences between rows are not Monte-Carlo noise, so curves over ``sigma`` are smooth and
each draw has its own escape point. The generator is consumed in a fixed order -- draw by
draw, and within a draw site by site in the order the hooks fire, one
``randn(batch, *activation.shape[1:])`` each -- so :func:`apex` gives the same numbers as
a plain loop of forward passes under :func:`noise_hooks` with the same generator, whatever
its batch size.

Non-finite logits
-----------------
Noise large enough to overflow the dtype (``sigma = 1e38`` in float32) makes logits NaN or
inf. Such a forward pass predicts nothing: its prediction is recorded as ``-1``, it is left
out of every statistic (shares are over the finite draws), ``ApexResult.nonfinite`` counts
them per sigma and a warning says so. A sigma with no finite draw reports NaN.

Speed
-----
Every (sigma, draw) pair is a copy of the batch; the copies are stacked along the batch
dimension and run together (:func:`apexlens.runs.run_rows`), chunked to a memory budget.
Nothing before the first noised site changes, so the run starts from the cached clean
residual stream entering the first noised block, and logits are computed only at the
scored positions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens import edits
from apexlens.backend import Backend, backend_for
from apexlens.errors import ApexlensError
from apexlens.graph import SITE_PRESETS, parse_sites, position_index, shared_positions
from apexlens.hooks import HookFn, attached, inference_mode
from apexlens.results import ApexResult, TokenLabels, compare
from apexlens.runs import check_tokens, describe, row_chunks, rows_per_chunk, run_rows

__all__ = [
    "ApexResult",
    "apex",
    "compare",
    "noise_fwd_hooks",
    "noise_hooks",
    "resolve_sites",
    "SITE_PRESETS",
]

Sites = str | Sequence[str]
DEFAULT_SITES = "resid_post"
"""The paper's default: noise on every block's output (absolute ``sigma``)."""


# ---------------------------------------------------------------------------- sites
def resolve_sites(model: Any, sites: Sites) -> list[str]:
    """Hook names for a site spec (module docstring); unknown hook points raise."""
    backend = backend_for(model)
    names = parse_sites(sites, backend.dims.n_layers)
    hook_dict = getattr(backend.model, "hook_dict", None)
    if hook_dict is not None:
        for name in names:
            if name not in hook_dict:
                raise ApexlensError(
                    f"unknown hook point {name!r}: sites are hook names such as "
                    f"'blocks.0.hook_resid_post', nodes ('embed', 'r3', 'm1') or presets "
                    f"{list(SITE_PRESETS)} (optionally restricted to layers, e.g. 'resid_pre:6')"
                )
    return names


def _entry_layer(name: str) -> int | None:
    """The first block that must be run for noise at ``name`` to matter (``None``: a hook
    outside the blocks, so the whole model runs). ``blocks.{l}.hook_resid_post`` is the
    residual entering block ``l + 1``; any other hook of block ``l`` fires inside it."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    layer = int(parts[1])
    return layer + 1 if name.endswith(".hook_resid_post") else layer


# ---------------------------------------------------------------------------- checks
def _check_sigma(sigma: float) -> float:
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ApexlensError(f"sigma must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ApexlensError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return value


def _check_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
    values = [_check_sigma(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not values:
        raise ApexlensError("sigmas is empty: give at least one noise level")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ApexlensError(f"sigmas must be strictly increasing, got {values}")
    return torch.tensor(values, dtype=torch.float64)


def _scored_positions(positions: Any, n: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """(example, position) of every scored sample, example-major."""
    if isinstance(positions, Tensor) and (
        positions.is_floating_point() or positions.dim() not in (1, 2)
    ):
        raise ApexlensError(
            "positions as a tensor must hold integers, shape (batch,) or (batch, k); got "
            f"{positions.dtype} {tuple(positions.shape)}"
        )
    if isinstance(positions, Tensor) and positions.shape[0] != n:
        raise ApexlensError(f"positions has {positions.shape[0]} rows but tokens has {n} examples")
    if not isinstance(positions, Tensor):
        raw = [positions] if isinstance(positions, int) else list(positions)
        if not raw or not all(isinstance(p, int) and not isinstance(p, bool) for p in raw):
            raise ApexlensError(
                f"positions must be an int, a list of ints or an integer tensor, got {positions!r}"
            )
        positions = raw
    pos = position_index(
        positions.cpu() if isinstance(positions, Tensor) else positions, n, seq_len, "positions"
    )
    examples = torch.arange(n).unsqueeze(1).expand_as(pos)
    return examples.reshape(-1).clone(), pos.reshape(-1).clone()


# ---------------------------------------------------------------------------- noise
def _sample(generator: torch.Generator | None, shape: Sequence[int], like: Tensor) -> Tensor:
    """``randn(shape)`` drawn on the generator's device in ``like``'s dtype, moved to ``like``."""
    device = generator.device if generator is not None else like.device
    xi = torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return xi.to(like.device)


def _rms(act: Tensor) -> Tensor:
    """Root mean square over the last axis, kept as a length-1 axis."""
    return act.pow(2).mean(dim=-1, keepdim=True).sqrt()


def noise_fwd_hooks(
    model: Any,
    sigma: float,
    *,
    sites: Sites = DEFAULT_SITES,
    relative: bool = False,
    positions: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, fn)`` pairs that add ``sigma``-scaled Gaussian noise at ``sites``.

    For ``model.run_with_hooks(tokens, fwd_hooks=...)`` or :func:`apexlens.hooks.attached`.
    Each time a hook fires it draws ``xi ~ N(0, I)`` from ``generator`` (the global RNG if
    ``None``) -- shaped like the activation, or like its ``positions`` slice -- and adds
    ``sigma * xi`` (``sigma * RMS(act) * xi`` with ``relative=True``, the RMS over the last
    axis of the activation reaching the hook). ``positions`` (ints, negative allowed) picks
    the sequence positions (axis 1) that get noise; ``None`` means all.
    """
    scale = _check_sigma(sigma)
    names = resolve_sites(model, sites)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ApexlensError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if positions is not None:
        shared_positions(positions, 2**31, "positions")  # wrong types fail here, ranges at run time

    def hook(act: Tensor, hook: Any) -> Tensor:
        pos = None if positions is None else shared_positions(positions, act.shape[1], "positions")
        ref = act.detach() if pos is None else act.detach()[:, pos.to(act.device)]
        xi = _sample(generator, ref.shape, act)
        noise = (scale * _rms(ref)) * xi if relative else scale * xi
        return edits.add(noise, None if pos is None else pos.to(act.device))(act, hook)

    return [(name, hook) for name in names]


@contextmanager
def noise_hooks(
    model: Any,
    sigma: float,
    *,
    sites: Sites = DEFAULT_SITES,
    relative: bool = False,
    positions: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Any]:
    """Context manager: every forward pass inside the block runs with activation noise.

    >>> with noise_hooks(model, 0.5, sites="resid_pre:3", generator=g):
    ...     noisy_logits = model(tokens)

    Arguments as in :func:`noise_fwd_hooks`. The hooks are removed when the block ends,
    also after an exception; the user's own hooks are left alone.
    """
    hooks = noise_fwd_hooks(
        model, sigma, sites=sites, relative=relative, positions=positions, generator=generator
    )
    with attached(backend_for(model).model, hooks):
        yield model


# ---------------------------------------------------------------------------- sweep
@dataclass
class _Clean:
    """What the sweep needs from the clean run."""

    logits_at: Float[Tensor, "n_samples d_vocab"]
    entry: Tensor | None  # the residual entering the first noised block
    like: dict[str, Tensor]  # an empty tensor per site, in firing order, for dtype/device
    shapes: dict[str, tuple[int, ...]]
    rms: dict[str, Tensor]


def apex(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Any,
    *,
    sigmas: Sequence[float] | Tensor,
    n_draws: int = 32,
    sites: Sites = DEFAULT_SITES,
    relative: bool = False,
    positions: int | Sequence[int] | Tensor | None = None,
    noise_positions: int | Sequence[int] | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    max_batch: int | None = None,
    memory_budget: int = 1 << 30,
    token_labels: TokenLabels | None = None,
    progress: bool = False,
) -> ApexResult:
    """Sweep activation noise over a ``sigma`` grid and record the predicted tokens.

    Args:
        model: a HookedTransformer or TransformerBridge.
        tokens: ``[batch, pos]`` token ids, or a :class:`~apexlens.tasks.TaskBatch` (its
            clean tokens; its ``positions`` unless ``positions`` is given).
        sigmas: strictly increasing noise levels ``>= 0``.
        n_draws: Monte-Carlo forward passes per sigma (``K`` in the paper).
        sites: where the noise goes (module docstring). Default ``"resid_post"``, every
            block's output, with absolute ``sigma``: the paper's setting. For a backdoor
            probe on a small model, ``sites="embed", relative=True`` (input perturbation on
            the scale of the embeddings) separates the models more sharply.
        relative: scale the noise at each site by the clean activation's RMS (module
            docstring); default absolute ``sigma``.
        positions: the scored positions, whose next-token prediction is recorded: an int
            or a list of ints for every example, or an integer tensor ``(batch,)`` /
            ``(batch, k)`` of per-example positions. Default: the last position.
        noise_positions: positions that get noise (ints for every example); default all.
        seed: seeds a fresh ``torch.Generator`` on the model's device.
        generator: use this generator instead of ``seed`` (it is advanced).
        max_batch: rows per forward pass (one row = one example at one (sigma, draw));
            default from ``memory_budget`` (bytes, a rough estimate).
        token_labels: token id -> label (a callable on a tensor of ids such as
            ``task.token_labels``, or a sequence indexed by id), for tables and plots.
        progress: show a progress bar on stderr.

    Returns:
        an :class:`ApexResult`.
    """
    backend = backend_for(model)
    if hasattr(tokens, "clean_tokens") and hasattr(tokens, "positions"):
        positions = tokens.positions if positions is None else positions
        tokens = tokens.clean_tokens
    if isinstance(tokens, Tensor) and tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    tokens = check_tokens(backend, tokens, "tokens")
    n, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    sig = _check_sigmas(sigmas)
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ApexlensError(f"n_draws must be a positive integer, got {n_draws!r}")
    names = resolve_sites(backend, sites)
    ex_idx, pos_idx = _scored_positions(-1 if positions is None else positions, n, seq_len)
    noise_pos = (
        None
        if noise_positions is None
        else shared_positions(noise_positions, seq_len, "noise_positions")
    )
    used_seed: int | None = None
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ApexlensError(f"seed must be an integer, got {seed!r}")
        generator = torch.Generator(device=backend.device).manual_seed(seed)
        used_seed = seed
    elif not isinstance(generator, torch.Generator):
        raise ApexlensError(f"generator must be a torch.Generator, got {describe(generator)}")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ApexlensError(f"max_batch must be a positive integer, got {max_batch!r}")
    entries = [_entry_layer(name) for name in names]
    # the first block to run; None: a site outside the blocks, so every draw runs everything
    start = None if None in entries else min(e for e in entries if e is not None)
    with inference_mode(backend.model):
        clean = _clean_pass(backend, tokens, names, start, relative, noise_pos, ex_idx, pos_idx)
        preds, prob_sum, n_finite = _sweep(
            backend,
            tokens,
            clean,
            sig,
            n_draws,
            start,
            relative,
            noise_pos,
            ex_idx,
            pos_idx,
            generator,
            max_batch,
            memory_budget,
            progress,
        )
    clean_at = clean.logits_at
    top2 = clean_at.topk(min(2, clean_at.shape[-1]), dim=-1).values
    nonfinite = n_draws * len(ex_idx) - n_finite
    if int(nonfinite.sum()):
        bad = [float(s) for s, c in zip(sig, nonfinite, strict=True) if int(c)]
        warnings.warn(
            f"apex: {int(nonfinite.sum())} noisy forward passes gave NaN/inf logits (at sigma "
            f"{bad}); they are left out of every statistic (ApexResult.nonfinite counts them)",
            RuntimeWarning,
            stacklevel=2,
        )
    return ApexResult(
        sigmas=sig,
        predictions=preds,
        clean_predictions=clean_at.argmax(dim=-1).cpu(),
        clean_margin=(top2[:, 0] - top2[:, -1]).cpu(),
        mean_probs=(prob_sum / n_finite.clamp_min(1).to(prob_sum)[:, None]).cpu(),
        clean_mean_probs=clean_at.softmax(dim=-1).mean(dim=0).cpu(),
        sample_example=ex_idx,
        sample_position=pos_idx,
        sites=tuple(clean.like),
        relative=bool(relative),
        seed=used_seed,
        token_labels=token_labels,
        nonfinite=nonfinite.cpu(),
    )


def _clean_pass(
    bk: Backend,
    tokens: Tensor,
    names: list[str],
    start: int | None,
    relative: bool,
    noise_pos: Tensor | None,
    ex_idx: Tensor,
    pos_idx: Tensor,
) -> _Clean:
    """The clean run: predictions, the residual entering ``start``, site shapes and order."""
    shapes: dict[str, tuple[int, ...]] = {}
    like: dict[str, Tensor] = {}

    def recorder(name: str) -> HookFn:  # by closure: a bridge's hook.name is an alias
        def record(act: Tensor, hook: Any) -> None:
            if name not in shapes:
                shapes[name], like[name] = tuple(act.shape), act.new_empty(0)

        return record

    n_layers = bk.dims.n_layers
    entry_name = None
    if start is not None:
        entry_name = bk.resid_pre(start) if start < n_layers else bk.resid_post(n_layers - 1)
    cache_names = ([entry_name] if entry_name else []) + (names if relative else [])
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
    seq_len = tokens.shape[1]
    if noise_pos is not None:
        for name in names:
            if len(shapes[name]) < 2 or shapes[name][1] != seq_len:
                raise ApexlensError(
                    f"noise_positions needs positions on axis 1, but {name!r} has shape {shapes[name]}"
                )
    rms: dict[str, Tensor] = {}
    if relative:
        for name in names:
            act = cache[name]
            rms[name] = _rms(act if noise_pos is None else act[:, noise_pos.to(act.device)])
    logits_at = logits[ex_idx.to(logits.device), pos_idx.to(logits.device)].double()
    return _Clean(logits_at, cache.get(entry_name) if entry_name else None, like, shapes, rms)


def _sweep(
    bk: Backend,
    tokens: Tensor,
    clean: _Clean,
    sig: Tensor,
    n_draws: int,
    start: int | None,
    relative: bool,
    noise_pos: Tensor | None,
    ex_idx: Tensor,
    pos_idx: Tensor,
    generator: torch.Generator,
    max_batch: int | None,
    memory_budget: int,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every (draw, sigma) as rows of one batched run; returns predictions (``-1``: the
    logits were not finite), the summed softmax and the count of finite draws per sigma."""
    n, seq_len = tokens.shape
    order = list(clean.like)
    noise_shape = {
        name: (n, *clean.shapes[name][1:])
        if noise_pos is None
        else (n, len(noise_pos), *clean.shapes[name][2:])
        for name in order
    }
    n_combo = n_draws * len(sig)
    if max_batch is None:
        site_numel = sum(math.prod(noise_shape[name][1:]) for name in order)
        extra = (
            3 * site_numel * bk.dtype.itemsize + 8 * 3 * (len(ex_idx) // n + 1) * bk.dims.d_vocab
        )
        rows = rows_per_chunk(bk, memory_budget, 10**9, 1, seq_len, seq_len, True, extra)
    else:
        rows = max_batch
    per_chunk = max(1, min(n_combo, rows // n))
    d_vocab = clean.logits_at.shape[-1]
    preds = torch.empty(len(sig), n_draws, len(ex_idx), dtype=torch.long)
    prob_sum = torch.zeros(len(sig), d_vocab, dtype=torch.float64, device=bk.device)
    n_finite = torch.zeros(len(sig), dtype=torch.long)
    xi: dict[int, dict[str, Tensor]] = {}
    next_draw = 0
    sig_dev = sig.to(bk.device)
    dev_ex, dev_pos = ex_idx.to(bk.device), pos_idx.to(bk.device)
    pos_dev = None if noise_pos is None else noise_pos.to(bk.device)
    direct = start is not None and start >= 1 and bk.resid_post(start - 1) in order
    for combos in row_chunks(list(range(n_combo)), per_chunk, desc="apex", progress=progress):
        combo = torch.tensor(list(combos))
        draws, sidx = combo // len(sig), combo % len(sig)
        while next_draw <= int(draws[-1]):  # fixed order: draw by draw, site by site
            xi[next_draw] = {
                name: _sample(generator, noise_shape[name], clean.like[name]) for name in order
            }
            next_draw += 1
        for d in [d for d in xi if d < int(draws[0])]:
            del xi[d]
        noise: dict[str, Tensor] = {}
        for name in order:
            stack = torch.stack([xi[int(d)][name] for d in draws])  # [chunk, n, ...]
            s = sig_dev[sidx].to(stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
            noise[name] = (s * clean.rms[name].unsqueeze(0) if relative else s) * stack
        logits = _noisy_logits(bk, tokens, clean, noise, start, direct, pos_dev, dev_ex, dev_pos)
        finite = torch.isfinite(logits).all(dim=-1)
        pred = torch.where(
            finite, logits.argmax(dim=-1), torch.full_like(finite, -1, dtype=torch.long)
        )
        preds[sidx, draws] = pred.cpu()
        probs = torch.where(finite[..., None], logits.softmax(dim=-1), torch.zeros_like(logits))
        prob_sum.index_add_(0, sidx.to(bk.device), probs.sum(dim=1))
        n_finite.index_add_(0, sidx, finite.sum(dim=1).cpu())
    return preds, prob_sum, n_finite


def _noisy_logits(
    bk: Backend,
    tokens: Tensor,
    clean: _Clean,
    noise: dict[str, Tensor],
    start: int | None,
    direct: bool,
    pos: Tensor | None,
    ex_idx: Tensor,
    pos_idx: Tensor,
) -> Float[Tensor, "chunk n_samples vocab"]:
    """Logits at the scored samples of every row (a copy of the batch with its own noise)."""
    n_chunk = next(iter(noise.values())).shape[0]
    flat = {name: v.reshape(-1, *v.shape[2:]) for name, v in noise.items()}
    skip = bk.resid_post(start - 1) if direct and start is not None else None
    hooks = [(name, edits.add(flat[name], pos)) for name in flat if name != skip]
    if start is None or clean.entry is None:
        full, _ = bk.run_with_cache(tokens.repeat(n_chunk, 1), [], fwd_hooks=hooks)
        return full.view(n_chunk, tokens.shape[0], *full.shape[1:])[:, ex_idx, pos_idx].double()
    resid = clean.entry.expand(n_chunk, *clean.entry.shape).clone()
    if skip is not None:  # noise on the residual entering `start` goes straight in
        if pos is None:
            resid += noise[skip]
        else:
            resid[:, :, pos] += noise[skip]
    final = run_rows(bk, resid, start, hooks)
    return bk.unembed(final[:, ex_idx, pos_idx]).double()
