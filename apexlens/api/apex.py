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
Sites are spelled in apexlens' one vocabulary (:func:`apexlens.vocab.sites.parse_sites`): any
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
dimension and run together (:mod:`apexlens.engines.noise`), chunked to a memory budget.
Nothing before the first noised site changes, so the run starts from the cached clean
residual stream entering the first noised block, and logits are computed only at the
scored positions.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from apexlens.engines.noise import SweepPlan, clean_pass, sweep
from apexlens.engines.noise import noise_fwd_hooks as engine_hooks
from apexlens.errors import ApexlensError
from apexlens.model import backend_for
from apexlens.model.hooks import HookFn, attached, inference_mode
from apexlens.results.apex import ApexResult
from apexlens.results.labels import TokenLabels
from apexlens.runs.tokens import check_tokens, describe
from apexlens.vocab.positions import position_index, shared_positions
from apexlens.vocab.sites import SITE_PRESETS, parse_sites

__all__ = ["apex", "noise_fwd_hooks", "noise_hooks", "resolve_sites", "SITE_PRESETS"]

Sites = str | Sequence[str]
DEFAULT_SITES = "resid_post"
"""The paper's default: noise on every block's output (absolute ``sigma``)."""


# ---------------------------------------------------------------------------- sites
def resolve_sites(model: Any, sites: Sites) -> list[str]:
    """Hook names for a site spec (module docstring); unknown hook points raise."""
    backend = backend_for(model)
    names = parse_sites(sites, backend.dims.n_layers)
    for name in names:
        if not backend.has_hook(name):
                raise ApexlensError(
                    f"unknown hook point {name!r}: sites are hook names such as "
                    f"'blocks.0.hook_resid_post', nodes ('embed', 'r3', 'm1') or presets "
                    f"{list(SITE_PRESETS)} (optionally restricted to layers, e.g. 'resid_pre:6')"
                )
    return names



def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, Tensor) and sigma.numel() == 1 and not sigma.dtype == torch.bool:
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ApexlensError(f"sigma must be a number, got {sigma!r}")
    value = float(sigma)
    if not math.isfinite(value) or value < 0:
        raise ApexlensError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return value


def _check_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1 or sigmas.dtype == torch.bool:
            raise ApexlensError(f"sigmas must be a 1-D list of numbers, got {describe(sigmas)}")
        sigmas = sigmas.tolist()
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence):
        raise ApexlensError(f"sigmas must be a list of numbers, got {sigmas!r}")
    values = [_check_sigma(s) for s in sigmas]
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
        if not isinstance(positions, (int, Sequence)) or isinstance(positions, (str, bytes)):
            raise ApexlensError(
                f"positions must be an int, a list of ints or an integer tensor, got {positions!r}"
            )
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

    return engine_hooks(names, scale, relative=relative, positions=positions, generator=generator)


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
    progress: bool = True,
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
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise ApexlensError(f"max_batch must be a positive integer, got {max_batch!r}")
    if memory_budget is None:
        memory_budget = 1 << 30
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ApexlensError(
            f"memory_budget must be a positive number of bytes (an int), got {memory_budget!r}"
        )
    plan = SweepPlan(
        names, sig, n_draws, bool(relative), noise_pos, ex_idx, pos_idx, max_batch, memory_budget
    )
    with inference_mode(backend.model):
        clean = clean_pass(backend, tokens, plan)
        preds, prob_sum, n_finite = sweep(backend, tokens, plan, clean, generator, progress)
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
