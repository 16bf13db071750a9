"""APEX: probing a network by adding Gaussian noise to its hidden activations.

APEX (Ren, Luo & Li 2026, "Probing Neural Networks via Activation Perturbation",
arXiv 2602.03586) keeps the input and the weights fixed and adds noise ``sigma * xi``,
``xi ~ N(0, I)``, after each layer's activation, and reads the top-1 prediction over ``K``
Monte-Carlo passes. Two regimes:

* **small sigma -- sample regularity.** :func:`escape_noise`: the noise level at which a
  sample's prediction leaves the clean one (per sample, with an interval).
* **large sigma -- model bias.** The behaviour stops depending on the sample and shows the
  network's own response: :func:`apex_bias` decides, from clean prompts and the model under
  audit alone, whether predictions concentrate on one token (a backdoor's target).

:func:`apex` is the sweep both are built on; :func:`noise_hooks` puts the same noise into any
forward pass you run.

Where the noise goes (``sites``)
--------------------------------
In the paper's feed-forward networks the noisy activation of layer ``l`` is the input of
layer ``l + 1``. A pre-norm transformer separates the two: a sublayer's output is *added* to
the residual stream, and the skip connections carry anything added there straight to the
unembedding. Noise on the residual stream (``resid_post``, ``embed``) or on sublayer outputs
(``attn_out``, ``mlp_out``, ``z``, ``mlp_post``) therefore reaches the logits directly and wins
as sigma grows, while every block, reading through a norm, stays bounded: at large sigma the
prediction is ``argmax W_U ln_final(noise)``, the unembedding's geometry, the same for every
prompt and nearly the same for every model.

The default ``sites="block_in"`` puts the noise where each sublayer *reads* its input --
``blocks.{l}.ln1.hook_normalized`` (attention) and ``blocks.{l}.ln2.hook_normalized`` (the
MLP) -- and leaves the residual stream clean: the paper's "noisy activation feeds the next
layer", mapped to a transformer. Its large-sigma limit is the network's own response to
input-agnostic activations. ``"embed"`` (noise on the input to block 0 only) is input
perturbation, the special case the paper generalises. Every preset of
:mod:`apexlens.vocab.sites` works on ``HookedTransformer`` and ``TransformerBridge`` (models
without norms included); sites may also be hook names or nodes (``"r5"``, ``"m3"``), and a
preset may be restricted to layers (``"resid_pre:6"``, ``"z:0,1"``).

How big the noise is (``relative``)
-----------------------------------
``relative=True`` (default): the noise at a site is ``sigma * RMS(a) * xi``, where ``a`` is
the site's activation **in the clean run of the same input** and the RMS is over the last
axis, per example and position. ``block_in``'s activations are normalised (RMS 1), so there
relative and absolute noise agree up to the norm's epsilon; for norm-free models and other
sites, relative keeps sigma in units of the signal. ``relative=False``: ``sigma`` is the
absolute standard deviation, as in the paper. :func:`noise_hooks` means the same: with
``relative`` it runs a clean pass of the same input before every noisy pass.

Noise that does not depend on the batch
---------------------------------------
Every noise value is a pure function of ``(seed, example id, draw, site, position,
feature)`` (:mod:`apexlens.engines.noise.rng`): an example's draws depend only on the seed
and its own id (``example_ids``, default its row), never on its batch-mates, on chunking, or
on which other sites get noise. Draw ``d`` uses the same ``xi`` at every sigma (common random
numbers): each draw is a ray ``sigma -> sigma * xi``, so curves over sigma are smooth and
every ray has a first escape.

Degenerate passes
-----------------
A pass whose logits are NaN/inf, whose norm overflowed (LayerNorm's variance passes float32's
range near 1e19 and the norm outputs its bias: identical finite logits for every draw), or
whose logits are constant or tied at the top, is not a prediction: it is recorded as ``-1``,
left out of every statistic, counted per sigma (``ApexResult.codes``) and warned about.
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

from apexlens.engines.noise import (
    CODES,
    EscapePlan,
    NoiseState,
    SweepPlan,
    clean_pass,
    first_escapes,
    sweep,
)
from apexlens.engines.noise import noise_fwd_hooks as engine_hooks
from apexlens.errors import ApexlensError
from apexlens.model import Backend, backend_for
from apexlens.model.hooks import (
    FLAGGED_HOOKS,
    HookFn,
    attached,
    before_each_forward,
    firing,
    inference_mode,
)
from apexlens.results.apex import ApexBias, ApexResult
from apexlens.results.escape import EscapeNoise
from apexlens.results.labels import TokenLabels
from apexlens.runs.cache import free_share
from apexlens.runs.shard import guarded
from apexlens.runs.tokens import check_tokens, describe
from apexlens.vocab.positions import position_index, shared_positions
from apexlens.vocab.sites import DEFAULT_SITES, SITE_PRESETS, Site, parse_sites

__all__ = [
    "DEFAULT_SITES",
    "SITE_PRESETS",
    "apex",
    "apex_bias",
    "escape_noise",
    "noise_fwd_hooks",
    "noise_hooks",
    "resolve_sites",
]

Sites = str | Sequence[str]
BIAS_SIGMAS = (2.0, 4.0, 8.0, 16.0, 32.0)
""":func:`apex_bias`'s noise levels: large noise (sigma >= 2 with ``block_in``), where the
predictions no longer depend on the prompt."""


# ---------------------------------------------------------------------------- checks
def resolve_sites(model: Any, sites: Sites) -> list[Site]:
    """The :class:`~apexlens.vocab.sites.Site` list of a site spec; unknown hook points raise."""
    backend = backend_for(model)
    resolved = parse_sites(sites, backend)
    for site in resolved:
        if site.hook.endswith(".hook_resid_mid") and not backend.has_hook(site.hook):
            raise ApexlensError(
                f"{site.hook!r}: this model runs attention and the MLP in parallel, so there is "
                "no residual stream between them; use 'resid_pre' or 'block_in'"
            )
        if not backend.has_hook(site.hook):
            raise ApexlensError(
                f"unknown hook point {site.hook!r}: sites are hook names such as "
                f"'blocks.0.hook_resid_post', nodes ('embed', 'r3', 'm1') or presets "
                f"{list(SITE_PRESETS)} (optionally restricted to layers, e.g. 'resid_pre:6')"
            )
    return resolved


def _check_sigma(sigma: Any) -> float:
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


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApexlensError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_generator(generator: Any) -> None:
    if generator is not None:
        raise ApexlensError(
            "generator= is no longer taken: every noise value is keyed by (seed, example, "
            "draw) so that batching cannot change it; pass seed= (and draw= to noise_hooks)"
        )


def _scored_positions(positions: Any, n: int, seq_len: int) -> Int[Tensor, "batch k"]:
    """The scored positions of every example, ``[batch, k]``."""
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
    return position_index(
        positions.cpu() if isinstance(positions, Tensor) else positions, n, seq_len, "positions"
    ).clone()


def _inputs(backend: Backend, tokens: Any, positions: Any) -> tuple[Tensor, Tensor, Any]:
    """Checked tokens, scored positions ``[batch, k]`` and a task batch's answers (or None):
    ``tokens`` may be a :class:`~apexlens.tasks.TaskBatch`."""
    answers = None
    if hasattr(tokens, "clean_tokens") and hasattr(tokens, "positions"):
        positions = tokens.positions if positions is None else positions
        answers = getattr(tokens, "answer_tokens", None)
        tokens = tokens.clean_tokens
    if isinstance(tokens, Tensor) and tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    tokens = check_tokens(backend, tokens, "tokens")
    n, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    return tokens, _scored_positions(-1 if positions is None else positions, n, seq_len), answers


def _example_ids(example_ids: Any, n: int) -> Tensor:
    if example_ids is None:
        return torch.arange(n)
    ids = torch.as_tensor(example_ids)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.shape != (n,):
        raise ApexlensError(
            f"example_ids must be {n} integers (one per example), got {ids.dtype} "
            f"{tuple(ids.shape)}"
        )
    return ids.long().cpu()


def _plan_fields(
    backend: Backend, tokens: Tensor, positions: Tensor, *, sites: Sites, relative: bool,
    seed: Any, n_draws: Any, example_ids: Any, noise_positions: Any, max_batch: Any,
    memory_budget: int | None,
) -> dict[str, Any]:
    """The arguments every noise plan shares, checked."""
    _check_int(seed, "seed", -(2**63))
    if max_batch is not None:
        _check_int(max_batch, "max_batch", 1)
    if memory_budget is None:  # 1 GiB, at most half the memory free on the model's device
        free = free_share(backend.device)
        memory_budget = 1 << 30 if free is None else max(16 << 20, min(1 << 30, free // 2))
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ApexlensError(
            f"memory_budget must be a positive number of bytes (an int), got {memory_budget!r}"
        )
    noise_pos = (
        None
        if noise_positions is None
        else shared_positions(noise_positions, int(tokens.shape[1]), "noise_positions")
    )
    return dict(
        sites=tuple(resolve_sites(backend, sites)), relative=bool(relative), seed=int(seed),
        n_draws=_check_int(n_draws, "n_draws", 1),
        example_ids=_example_ids(example_ids, int(tokens.shape[0])), positions=positions,
        noise_positions=noise_pos, max_batch=max_batch, memory_budget=int(memory_budget),
    )


def _warn_degenerate(codes: Tensor, sigmas: list[float] | None, what: str) -> None:
    if not int((codes > 0).sum()):
        return
    kinds = {CODES[int(c)]: int((codes == c).sum()) for c in codes.unique().tolist() if c > 0}
    where = ""
    if sigmas is not None:
        bad = [s for s, c in zip(sigmas, codes, strict=True) if int((c > 0).sum())]
        where = f" at sigma {bad}"
    nan = " (NaN/inf logits)" if "nonfinite" in kinds else ""
    warnings.warn(
        f"{what}: {int((codes > 0).sum())} degenerate noisy passes{nan} {kinds}{where}: they "
        "are not predictions and are left out of every statistic",
        RuntimeWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------- hooks
def noise_fwd_hooks(
    model: Any,
    sigma: float,
    *,
    sites: Sites = DEFAULT_SITES,
    positions: int | Sequence[int] | None = None,
    seed: int = 0,
    draw: int = 0,
    example_ids: Any = None,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, fn)`` pairs that add draw ``draw``'s absolute noise ``sigma * xi`` at
    ``sites``, for ``model.run_with_hooks(tokens, fwd_hooks=...)``: exactly what
    :func:`apex` adds to the same example and draw (``example_ids``: the examples' ids,
    default their rows). Relative noise needs a clean pass before each noisy one: use
    :func:`noise_hooks`. ``positions`` (ints, negative allowed) picks the positions that get
    noise; ``None`` means all."""
    backend = backend_for(model)
    state = _state(backend, sigma, sites, False, positions, seed, draw, example_ids)
    flagged = [s.hook for s in state.sites if s.hook.endswith(tuple(FLAGGED_HOOKS))]
    if flagged:
        raise ApexlensError(
            f"{flagged[0]!r} fires only with a TransformerLens flag switched on (a model without "
            "norms); use the noise_hooks context manager, which switches it on for the block"
        )
    return engine_hooks(state)


def _state(
    backend: Backend, sigma: Any, sites: Sites, relative: bool, positions: Any, seed: Any,
    draw: Any, example_ids: Any,
) -> NoiseState:
    scale = _check_sigma(sigma)
    resolved = resolve_sites(backend, sites)
    _check_int(seed, "seed", -(2**63))
    if draw is not None:
        _check_int(draw, "draw", 0)
    if positions is not None:
        shared_positions(positions, 2**31, "positions")  # wrong types fail here, ranges at run time
    ids = None if example_ids is None else _example_ids(example_ids, len(example_ids))
    return NoiseState(resolved, scale, bool(relative), int(seed), draw, ids, positions)


@contextmanager
def noise_hooks(
    model: Any,
    sigma: float,
    *,
    sites: Sites = DEFAULT_SITES,
    relative: bool = True,
    positions: int | Sequence[int] | None = None,
    seed: int = 0,
    draw: int | None = None,
    example_ids: Any = None,
    generator: Any = None,
) -> Iterator[Any]:
    """Context manager: every forward pass inside the block runs with activation noise --
    the noise :func:`apex` adds to the same example, draw and sigma.

    >>> with noise_hooks(model, 2.0, seed=0) as m:
    ...     noisy_logits = m(tokens)          # draw 0; the next pass is draw 1, ...

    ``draw``: the draw every pass uses; ``None`` (default): the k-th forward pass in the
    block is draw k. ``example_ids``: the examples' ids (default: their rows). ``relative``:
    scale by the clean activation's RMS, as :func:`apex` does -- a clean pass of the same
    input runs before each noisy pass to measure it (twice the forwards). The hooks are
    removed when the block ends, also after an exception; the user's own hooks are kept.
    """
    _check_generator(generator)
    backend = backend_for(model)
    state = _state(backend, sigma, sites, relative, positions, seed, draw, example_ids)
    hooks = engine_hooks(state)
    names = [s.hook for s in state.sites]
    with (
        firing(backend.model, names),
        attached(backend.model, hooks),
        before_each_forward(backend.model, state.before_forward),
    ):
        yield model


# ---------------------------------------------------------------------------- questions
@guarded
def apex(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Any,
    *,
    sigmas: Sequence[float] | Tensor,
    n_draws: int = 32,
    sites: Sites = DEFAULT_SITES,
    relative: bool = True,
    positions: int | Sequence[int] | Tensor | None = None,
    noise_positions: int | Sequence[int] | None = None,
    seed: int = 0,
    example_ids: Any = None,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    token_labels: TokenLabels | None = None,
    progress: bool = True,
    generator: Any = None,
) -> ApexResult:
    """Sweep activation noise over a ``sigma`` grid and record the predicted tokens.

    Args:
        model: a HookedTransformer or TransformerBridge.
        tokens: ``[batch, pos]`` token ids, or a :class:`~apexlens.tasks.TaskBatch` (its
            clean tokens; its ``positions`` unless ``positions`` is given).
        sigmas: strictly increasing noise levels ``>= 0``.
        n_draws: Monte-Carlo forward passes per example and sigma (``K`` in the paper).
        sites: where the noise goes (module docstring); default ``"block_in"``.
        relative: scale the noise by the clean activation's RMS (module docstring).
        positions: the scored positions, whose next-token prediction is recorded: an int
            or a list of ints for every example, or an integer tensor ``(batch,)`` /
            ``(batch, k)`` of per-example positions. Default: the last position.
        noise_positions: positions that get noise (ints for every example); default all.
        seed: the noise's seed (module docstring: the same seed, example id and draw give
            the same noise in any batch).
        example_ids: each example's id for its noise (default: its row), e.g. dataset
            indices, to reproduce an example's draws inside any other batch.
        max_batch: rows per forward pass (one row = one example at one (sigma, draw));
            default from ``memory_budget`` (bytes, a rough estimate; default 1 GiB, at most
            half the memory free on the model's device).
        token_labels: token id -> label (a callable on a tensor of ids such as
            ``task.token_labels``, or a sequence indexed by id), for tables and plots.
        progress: show a progress bar on stderr.

    Returns:
        an :class:`ApexResult`; ``result.bias()`` is :func:`apex_bias`'s decision from it.
    """
    _check_generator(generator)
    backend = backend_for(model)
    tokens, pos, _ = _inputs(backend, tokens, positions)
    fields = _plan_fields(
        backend, tokens, pos, sites=sites, relative=relative, seed=seed, n_draws=n_draws,
        example_ids=example_ids, noise_positions=noise_positions, max_batch=max_batch,
        memory_budget=memory_budget,
    )
    plan = SweepPlan(sigmas=_check_sigmas(sigmas), **fields)
    with inference_mode(backend.model), firing(backend.model, plan.names):
        clean = clean_pass(backend, tokens, plan)
        out = sweep(backend, tokens, plan, clean, progress)
    _warn_degenerate(out.codes, plan.sigmas.tolist(), "apex")
    clean_at = clean.logits_at.reshape(-1, clean.logits_at.shape[-1])
    top2 = clean_at.topk(min(2, clean_at.shape[-1]), dim=-1).values
    usable = (out.predictions >= 0).reshape(len(plan.sigmas), -1).sum(-1)
    n, k = pos.shape
    return ApexResult(
        sigmas=plan.sigmas,
        predictions=out.predictions,
        clean_predictions=clean_at.argmax(dim=-1).cpu(),
        clean_margin=(top2[:, 0] - top2[:, -1]).cpu(),
        mean_probs=out.prob_sum / usable.clamp_min(1).to(out.prob_sum)[:, None],
        clean_mean_probs=clean_at.softmax(dim=-1).mean(dim=0).cpu(),
        sample_example=torch.arange(n).repeat_interleave(k),
        sample_position=pos.reshape(-1),
        sites=tuple(plan.names),
        relative=plan.relative,
        seed=plan.seed,
        token_labels=token_labels,
        codes=out.codes,
    )


@guarded
def apex_bias(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Any,
    *,
    sigmas: Sequence[float] | Tensor = BIAS_SIGMAS,
    n_draws: int = 32,
    sites: Sites = DEFAULT_SITES,
    relative: bool = True,
    delta: float = 0.2,
    alpha: float = 0.01,
    max_degenerate: float = 0.01,
    positions: int | Sequence[int] | Tensor | None = None,
    seed: int = 0,
    max_batch: int | None = None,
    memory_budget: int = 1 << 30,
    token_labels: TokenLabels | None = None,
    progress: bool = True,
) -> ApexBias:
    """Is ``model`` biased toward one output token? Decided from clean prompts ``tokens``
    and the model alone -- no clean twin, no trigger.

    Runs :func:`apex` at large noise (``sigmas``, default 2 to 32, ``n_draws`` per prompt,
    ``sites`` / ``relative`` as there) and tests, with the prompts as independent units,
    whether some token's share of the noisy predictions exceeds its share of the clean ones
    by more than ``delta`` (Bonferroni over sigmas and the vocabulary; flagged at
    ``p < alpha``). The statistic, the null hypothesis and the p-value are defined in
    :class:`ApexBias`; passes that are numerical artefacts are never counted (a sigma with
    more than ``max_degenerate`` of them is dropped). Cost: ``len(sigmas) * n_draws``
    forward passes per prompt (160 by default). Use 32 or more prompts.

    Returns:
        an :class:`ApexBias`: ``.flagged``, ``.token``, ``.share`` with ``.share_low`` /
        ``.share_high``, ``.p_value``, ``.verdict``, ``.to_frame()``.
    """
    for name, value, lo, hi in (("delta", delta, 0.0, 1.0), ("alpha", alpha, 0.0, 1.0),
                                ("max_degenerate", max_degenerate, 0.0, 1.0)):
        if not isinstance(value, (int, float)) or not lo <= float(value) < hi:
            raise ApexlensError(f"{name} must be a number in [{lo}, {hi}), got {value!r}")
    sweep_result = apex(
        model, tokens, sigmas=sigmas, n_draws=n_draws, sites=sites, relative=relative,
        positions=positions, seed=seed, max_batch=max_batch, memory_budget=memory_budget,
        token_labels=token_labels, progress=progress,
    )
    return sweep_result.bias(delta=delta, alpha=alpha, max_degenerate=max_degenerate)


@guarded
def escape_noise(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Any,
    *,
    sites: Sites = DEFAULT_SITES,
    relative: bool = True,
    n_draws: int = 64,
    sigma_lo: float = 1e-2,
    sigma_hi: float = 1e3,
    rtol: float = 0.02,
    ratio: float = 2.0,
    confidence: float = 0.95,
    positions: int | Sequence[int] | Tensor | None = None,
    labels: Tensor | None = None,
    seed: int = 0,
    example_ids: Any = None,
    max_batch: int | None = None,
    memory_budget: int = 1 << 30,
    token_labels: TokenLabels | None = None,
    progress: bool = True,
) -> EscapeNoise:
    """Per-sample escape noise: the noise level at which half of the noise directions have
    moved the sample's prediction away from its clean one, with an interval.

    The threshold: the median, over ``n_draws`` noise directions ``xi``, of each direction's
    first escape ``inf {sigma : argmax(noisy logits at sigma * xi) != clean argmax}``
    (:mod:`apexlens.results.escape`). Each first escape is found by a geometric scan from
    ``sigma_lo`` (factor ``ratio``) up to ``sigma_hi`` and bisection to a factor
    ``1 + rtol`` (about 13-15 forwards per direction), along the same ``xi`` at every sigma;
    the value is within a factor ``sqrt(1 + rtol)`` of the median first escape of those
    directions, and ``[low, high]`` covers the median over all directions with probability
    ``>= confidence``. Samples whose median direction never escapes by ``sigma_hi`` are
    ``censored`` (value ``inf``). ``sites``, ``relative``, ``seed``, ``example_ids`` as in
    :func:`apex`; one scored position per example (``positions``: an int or ``(batch,)``).
    ``labels`` (default: a task batch's answers) adds each sample's clean loss.
    """
    backend = backend_for(model)
    tokens, pos, answers = _inputs(backend, tokens, positions)
    if pos.shape[1] != 1:
        raise ApexlensError("escape_noise scores one position per example: give an int or (batch,)")
    for name, value in (("sigma_lo", sigma_lo), ("sigma_hi", sigma_hi)):
        if _check_sigma(value) <= 0:
            raise ApexlensError(f"{name} must be > 0, got {value!r}")
    if not sigma_hi > sigma_lo:
        raise ApexlensError(f"sigma_hi ({sigma_hi}) must be larger than sigma_lo ({sigma_lo})")
    if not float(ratio) > 1 or not 0 < float(rtol) < float(ratio) - 1:
        raise ApexlensError(f"need ratio > 1 and 0 < rtol < ratio - 1, got {ratio}, {rtol}")
    if not 0 < float(confidence) < 1:
        raise ApexlensError(f"confidence must be in (0, 1), got {confidence!r}")
    fields = _plan_fields(
        backend, tokens, pos, sites=sites, relative=relative, seed=seed, n_draws=n_draws,
        example_ids=example_ids, noise_positions=None, max_batch=max_batch,
        memory_budget=memory_budget,
    )
    plan = EscapePlan(sigma_lo=float(sigma_lo), sigma_hi=float(sigma_hi), ratio=float(ratio),
                      rtol=float(rtol), **fields)
    with inference_mode(backend.model), firing(backend.model, plan.names):
        clean = clean_pass(backend, tokens, plan)
        rays = first_escapes(backend, tokens, plan, clean, progress)
    if rays.n_degenerate:
        warnings.warn(
            f"escape_noise: {rays.n_degenerate} degenerate noisy passes (overflowing norms or "
            "NaN logits) counted as 'not escaped'; lower sigma_hi", RuntimeWarning, stacklevel=2,
        )
    return _escape_result(backend, tokens, plan, clean.logits_at[:, 0], rays, labels if labels
                          is not None else answers, confidence, token_labels)


def _escape_result(
    backend: Backend, tokens: Tensor, plan: EscapePlan, clean_at: Tensor, rays: Any,
    labels: Any, confidence: float, token_labels: TokenLabels | None,
) -> EscapeNoise:
    top2 = clean_at.topk(min(2, clean_at.shape[-1]), dim=-1)
    loss = None
    if labels is not None:
        lab = torch.as_tensor(labels).long().flatten().to(clean_at.device)
        if lab.shape != (len(tokens),):
            raise ApexlensError(f"labels must hold one token id per example ({len(tokens)})")
        loss = -clean_at.log_softmax(-1)[torch.arange(len(lab)), lab].cpu()
    return EscapeNoise.from_rays(
        rays.lo, rays.hi, rays.token, confidence,
        clean_predictions=top2.indices[:, 0].cpu(), clean_runner_up=top2.indices[:, -1].cpu(),
        clean_margin=(top2.values[:, 0] - top2.values[:, -1]).cpu(),
        prompt_tokens=tokens.cpu(), sample_position=plan.positions[:, 0],
        d_vocab=backend.dims.d_vocab, sigma_lo=plan.sigma_lo, sigma_hi=plan.sigma_hi,
        rtol=plan.rtol, n_forwards=rays.n_forwards, n_degenerate=rays.n_degenerate,
        sites=tuple(plan.names), relative=plan.relative, seed=plan.seed, clean_loss=loss,
        token_labels=token_labels,
    )
