"""Feature visualization for transformer features, and a check that it is not manipulated.

:func:`visualize` answers "which input excites this feature most?" by gradient ascent on the
input (feature visualization, FV). Tokens are discrete, so it optimises a *soft* input: per
position a distribution over the vocabulary, ``softmax(theta / T)``, whose embedding
``probs @ E`` replaces the token embedding (``E``: what ``hook_embed`` holds per token). The
temperature ``T`` is annealed from ``temperature[0]`` to ``temperature[1]`` and an entropy
penalty grows to ``entropy``, so the distributions harden towards tokens. Each restart is
then projected to its most likely tokens and refined with discrete swaps (GCG-style, Zou et
al. 2023): the gradient with respect to the one-hot input proposes ``top_k`` tokens per
position, every proposed single swap is evaluated *exactly*, and the best is kept while it
raises the activation. Every reported activation is that of a discrete input, measured by a
plain forward pass.

:func:`top_examples` ranks natural inputs (a task's batches or the user's tokens) by the
feature, at every position.

:func:`fv_check` asks whether the visualization is an honest picture of the feature
(Gradient Slingshots, Bareeva et al., NeurIPS 2025, showed a model can be fine-tuned so that
FV converges to a planted input while its behaviour is unchanged; Geirhos et al., ICML 2024,
that manipulated visualizations are processed differently from natural inputs). It compares
the FV with the feature's natural top examples on

* **activation**: the FV's percentile in the natural distribution and its ratio to the
  natural maximum;
* **tokens**: bag-of-token cosine between the FV and the natural top-k contexts;
* **representation**: cosine between the residual stream the feature reads, FV vs the mean of
  the natural top-k, against the same cosine of each natural top example to the others;
* **mechanism**: which upstream components (embeddings, heads, MLPs) the activation comes
  through (:func:`apexlens.engines.features.attribution`), FV vs natural top-k, against the natural
  spread.

The verdict flags the FV when its activation is not explained by the natural examples'
mechanism: the mechanism (or representation) similarity falls below every natural top
example's. The numbers behind it come with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.features import Plan, attribution, feature_rows, optimise
from apexlens.errors import ApexlensError
from apexlens.model import Backend, backend_for
from apexlens.model.hooks import inference_mode
from apexlens.results import FeatureVisualization, FVCheck, NaturalExamples
from apexlens.runs import check_tokens, progress_bar
from apexlens.runs.shard import guarded
from apexlens.vocab.features import Feature, parse_feature, read_position


@guarded
def feature_values(
    model: Any,
    feature: str | Feature,
    tokens: Int[Tensor, "batch pos"],
    *,
    direction: Any = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Float[Tensor, "batch pos"]:
    """``feature`` at every position of every row of ``tokens`` (no gradients), in chunks
    of ``batch_size`` rows (a progress bar over them unless ``progress=False``)."""
    f = parse_feature(model, feature, direction=direction)
    bk = backend_for(model)
    tokens = check_tokens(bk, tokens)
    _positive_int(batch_size, "batch_size")
    with inference_mode(model):
        return feature_rows(model, f, tokens, batch_size, progress)


def _positive_int(v: Any, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ApexlensError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _number(v: Any, name: str, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApexlensError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ApexlensError(f"{name} must be > 0, got {v!r}")
    return float(v)


def _token_ids(v: Any, name: str, d_vocab: int) -> Int[Tensor, " k"]:
    """Token ids as given: integers (a list or a 1-D integer tensor), never truncated floats."""
    if isinstance(v, Tensor):
        if v.is_floating_point() or v.dtype == torch.bool or v.ndim > 1:
            raise ApexlensError(f"{name} must be integer token ids (a list or 1-D tensor), got {v!r}")
        ids = v.long().cpu()
    else:
        if not isinstance(v, (list, tuple, range)):
            raise ApexlensError(f"{name} must be integer token ids (a list or 1-D tensor), got {v!r}")
        items = list(v)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in items):
            raise ApexlensError(f"{name} must be integer token ids, got {v!r}")
        ids = torch.tensor(items, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
        raise ApexlensError(f"{name} must list token ids in 0..{d_vocab - 1}, got {v!r}")
    return ids


@guarded
def visualize(
    model: Any,
    feature: str | Feature,
    *,
    n_pos: int = 8,
    steps: int = 200,
    seed: int = 0,
    restarts: int = 8,
    prefix: Sequence[int] | Tensor = (),
    vocab: Sequence[int] | Tensor | None = None,
    direction: Any = None,
    lr: float = 0.1,
    init_scale: float = 1.0,
    temperature: tuple[float, float] = (1.0, 0.05),
    entropy: float = 0.1,
    refine_steps: int = 20,
    top_k: int = 32,
    progress: bool = True,
) -> FeatureVisualization:
    """Maximise ``feature`` over inputs of ``n_pos`` tokens (``prefix`` tokens first, fixed).

    Args:
        feature: a feature spelling (:mod:`apexlens.vocab.features`), e.g. ``"m1.n37"``.
        n_pos: the input length, prefix included; the feature is read at its position (``@p``,
            default the last).
        steps: soft-input optimisation steps (Adam, ``lr``); ``refine_steps`` rounds of
            discrete swaps after (``0``: none), each trying the ``top_k`` tokens per position
            the gradient proposes (every token when the vocabulary is that small).
        seed: seeds the starting points (``theta ~ init_scale * N(0, 1)``); runs repeat exactly.
        restarts: independent starting points optimised together; results are sorted by the
            activation of their final discrete input.
        vocab: the token ids the input may use (default: all).
        temperature, entropy: the annealing schedule (geometric from the first temperature to
            the second; the entropy penalty grows linearly from 0 to ``entropy``).
        progress: a progress bar over the steps (default on).
    """
    bk = backend_for(model)
    plan = _plan(bk, model, feature, n_pos, steps, seed, restarts, prefix, vocab, direction,
                 lr, init_scale, temperature, entropy, refine_steps, top_k)
    total = plan.steps + plan.refine_steps
    bar = progress_bar(total, f"visualize {plan.feature.label}", progress)
    with inference_mode(model, grad=True):
        found = optimise(bk, plan, bar)
    bar.update(total - bar.n)
    bar.close()
    order = torch.argsort(found.activation, descending=True, stable=True)
    return FeatureVisualization(
        feature=plan.feature,
        tokens=found.tokens[order],
        activation=found.activation[order],
        trajectory=found.trajectory[:, order],
        soft_trajectory=found.soft_trajectory[:, order],
        soft_steps=plan.steps,
        seed=plan.seed,
    )


def _plan(
    bk: Backend, model: Any, feature: Any, n_pos: Any, steps: Any, seed: Any, restarts: Any,
    prefix: Any, vocab: Any, direction: Any, lr: Any, init_scale: Any, temperature: Any,
    entropy: Any, refine_steps: Any, top_k: Any,
) -> Plan:
    """Every argument of :func:`visualize`, checked, as an engine plan."""
    f = parse_feature(model, feature, direction=direction)
    if isinstance(n_pos, bool) or not isinstance(n_pos, int) or not 1 <= n_pos <= bk.dims.n_ctx:
        raise ApexlensError(f"n_pos must be an int in 1..{bk.dims.n_ctx} (n_ctx), got {n_pos!r}")
    for name, v, lo in (("steps", steps, 0), ("restarts", restarts, 1),
                        ("refine_steps", refine_steps, 0), ("top_k", top_k, 1)):
        _positive_int(v, name, lo)
    if steps == 0 and refine_steps == 0:
        raise ApexlensError("steps and refine_steps are both 0: nothing would be optimised")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ApexlensError(f"seed must be an integer, got {seed!r}")
    try:
        t0, t1 = (float(t) for t in temperature)
    except (TypeError, ValueError):
        raise ApexlensError(
            f"temperature must be a pair (start, end) of numbers > 0, got {temperature!r}"
        ) from None
    _number(t0, "temperature[0]"), _number(t1, "temperature[1]")
    _number(lr, "lr"), _number(init_scale, "init_scale")
    _number(entropy, "entropy", positive=False)
    d_vocab = bk.dims.d_vocab_in
    if isinstance(prefix, Tensor) and prefix.ndim > 1:
        raise ApexlensError(f"prefix must be a 1-D list of token ids, got shape {tuple(prefix.shape)}")
    fixed = _token_ids(prefix, "prefix", d_vocab)
    if fixed.numel() >= n_pos:
        raise ApexlensError(f"prefix has {fixed.numel()} tokens; n_pos={n_pos} leaves none to optimise")
    allowed = torch.arange(d_vocab) if vocab is None else torch.unique(_token_ids(vocab, "vocab", d_vocab))
    if allowed.numel() == 0:
        raise ApexlensError("vocab is empty: give the token ids the input may use")
    p_read = read_position(f, n_pos)
    if p_read < fixed.numel():
        raise ApexlensError(
            f"feature {f.label!r} is read at position {p_read}, inside the fixed prefix: "
            "nothing optimised can change it"
        )
    return Plan(f, n_pos, p_read, fixed, allowed, steps, restarts, seed, float(lr),
                float(init_scale), (t0, t1), float(entropy), refine_steps, top_k)


@guarded
def top_examples(
    model: Any,
    feature: str | Feature,
    tokens: Int[Tensor, "batch pos"],
    *,
    k: int = 20,
    direction: Any = None,
    positions: str | Sequence[int] = "all",
    batch_size: int = 256,
    progress: bool = True,
) -> NaturalExamples:
    """The ``k`` (example, position) pairs of ``tokens`` where ``feature`` is largest.

    The feature is read at every position (``positions="all"``; or only at the listed
    ones), each with its causal context (the tokens up to it). The whole distribution comes
    back as :attr:`NaturalExamples.values` ``[batch, pos]`` (``NaN`` where not read).
    """
    f = parse_feature(model, feature, direction=direction)
    _positive_int(k, "k")
    values = feature_values(model, f, tokens, batch_size=batch_size, progress=progress)
    values = values.float().cpu()
    n_pos = values.shape[1]
    if not (isinstance(positions, str) and positions == "all"):
        keep = torch.zeros(n_pos, dtype=torch.bool)
        keep[_read_positions(positions, n_pos)] = True
        values = values.masked_fill(~keep, math.nan)
    flat = values.flatten()
    finite = ~flat.isnan()
    k = min(k, int(finite.sum()))
    top = torch.topk(flat.masked_fill(~finite, -math.inf), k)
    rows, cols = top.indices // n_pos, top.indices % n_pos
    return NaturalExamples(feature=f, tokens=tokens.cpu(), values=values, rows=rows, cols=cols)


def _read_positions(positions: Any, n_pos: int) -> list[int]:
    """``top_examples``' ``positions``: a non-empty list (or 1-D integer tensor) of ints."""
    if isinstance(positions, Tensor) and positions.ndim == 1 and not (
        positions.is_floating_point() or positions.dtype == torch.bool
    ):
        positions = positions.tolist()
    if (
        not isinstance(positions, (list, tuple, range))
        or not positions
        or any(isinstance(p, bool) or not isinstance(p, int) for p in positions)
    ):
        raise ApexlensError(f"positions must be 'all' or a non-empty list of ints, got {positions!r}")
    for p in positions:
        if not -n_pos <= p < n_pos:
            raise ApexlensError(f"position {p} is outside sequences of {n_pos} positions")
    return [p % n_pos for p in positions]


@guarded
def fv_check(
    model: Any,
    feature: str | Feature,
    natural_tokens: Int[Tensor, "batch pos"],
    *,
    fv: FeatureVisualization | None = None,
    k: int = 20,
    direction: Any = None,
    progress: bool = True,
    **visualize_kwargs: Any,
) -> FVCheck:
    """Compare a feature visualization with the feature's natural top-``k`` examples.

    ``fv``: a :func:`visualize` result of this feature (computed here with
    ``visualize_kwargs`` when not given). Returns an :class:`~apexlens.FVCheck`: the numbers
    (percentile, ratio to the natural maximum, token / representation / mechanism
    similarity with their natural null ranges), the attribution profiles and the verdict.
    ``progress``: progress bars, named by step (visualization, natural examples, their
    attribution); default on.
    """
    f = parse_feature(model, feature, direction=direction)
    bk = backend_for(model)
    natural_tokens = check_tokens(bk, natural_tokens, "natural_tokens")
    if fv is None:
        fv = visualize(model, f, progress=progress, **visualize_kwargs)
    elif not isinstance(fv, FeatureVisualization):
        raise ApexlensError(
            f"fv must be a FeatureVisualization (from visualize) or None, got {type(fv).__name__}"
        )
    elif fv.feature.spec != f.spec:
        raise ApexlensError(f"fv visualizes {fv.feature.spec!r}, not {f.spec!r}")
    nat = top_examples(model, f, natural_tokens, k=k, progress=progress)
    if nat.rows.numel() < 3:
        raise ApexlensError("fv_check needs at least 3 natural examples to compare against")
    fv_tokens = fv.tokens[:1].to(bk.device)
    bar = progress_bar(
        nat.rows.numel() + 1, f"fv_check {f.label}: attribution", progress, unit="input"
    )
    with bar, inference_mode(model, grad=True):
        at_fv = attribution(
            model, replace(f, position=read_position(f, fv_tokens.shape[1])), fv_tokens
        )
        bar.update(1)
        a_nat, h_nat = [], []
        for row, col in zip(nat.rows.tolist(), nat.cols.tolist(), strict=True):
            ctx = natural_tokens[row : row + 1, : col + 1]
            at = attribution(model, replace(f, position=col), ctx)
            a_nat.append(at.scores)
            h_nat.append(at.resid)
            bar.update(1)
    A = torch.cat(a_nat).double().cpu()
    H = torch.cat(h_nat).double().cpu()
    mech, mech_null = _similarity(at_fv.scores.double().cpu()[0], A)
    rep, rep_null = _similarity(at_fv.resid.double().cpu()[0], H)
    tok = _token_similarity(
        fv.tokens[0],
        [
            natural_tokens[r, : c + 1].cpu()
            for r, c in zip(nat.rows.tolist(), nat.cols.tolist(), strict=True)
        ],
        backend_for(model).dims.d_vocab_in,
    )
    return FVCheck(
        feature=f,
        fv=fv,
        natural=nat,
        fv_activation=float(at_fv.value[0]),
        components=at_fv.labels,
        fv_attribution=at_fv.scores.double().cpu()[0],
        natural_attribution=A,
        mechanism_similarity=mech,
        mechanism_null=mech_null,
        representation_similarity=rep,
        representation_null=rep_null,
        token_similarity=tok,
    )


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


def _similarity(x: Float[Tensor, " d"], natural: Float[Tensor, "k d"]) -> tuple[float, Tensor]:
    """Cosine of ``x`` to the natural mean, and each natural row's cosine to the mean of
    the others (the null range a natural input falls in)."""
    mean = natural.mean(0)
    n = natural.shape[0]
    null = torch.tensor([_cos(natural[i], (mean * n - natural[i]) / (n - 1)) for i in range(n)])
    return _cos(x, mean), null


def _token_similarity(fv: Int[Tensor, " pos"], contexts: list[Tensor], d_vocab: int) -> float:
    """Bag-of-tokens cosine between the FV and the natural top contexts together."""
    a = torch.bincount(fv, minlength=d_vocab).double()
    b = torch.bincount(torch.cat(contexts), minlength=d_vocab).double()
    return _cos(a, b)
