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

from apexlens.api.peers import CACHE, check_peers, choose_peers
from apexlens.engines.features import (
    MEASURES,
    Found,
    Plan,
    collect,
    feature_rows,
    optimise,
    peer_test,
    statistics,
    top_contexts,
)
from apexlens.errors import ApexlensError
from apexlens.model import Backend, backend_for
from apexlens.model.hooks import inference_mode
from apexlens.results import FeatureVisualization, FVCheck, NaturalExamples
from apexlens.results.features import EVIDENCE
from apexlens.runs import check_tokens, progress_bar
from apexlens.runs.shard import guarded
from apexlens.vocab.features import Feature, parse_feature, read_position

DEFAULT_PEERS = 31
"""Peers drawn by default: the p-value can reach 1/32 < 0.05."""


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
    return _visualization(plan, found, 0)


def _visualization(
    plan: Plan, found: Found, block: int, feature: Feature | None = None
) -> FeatureVisualization:
    """Block ``block`` of an :func:`optimise` run (its ``restarts`` rows, the visualization
    of ``feature``, default the plan's), best first."""
    rows = torch.arange(block * plan.restarts, (block + 1) * plan.restarts)
    order = rows[torch.argsort(found.activation[rows], descending=True, stable=True)]
    return FeatureVisualization(
        feature=feature or plan.feature,
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
    """The ``k`` (example, position) pairs of ``tokens`` where ``feature`` is largest, each
    context once.

    The feature is read at every position (``positions="all"``; or only at the listed
    ones), each with its causal context (the tokens up to it). A context that occurs at
    several rows (the same prefix) is one example, kept at its first place: repeated, it
    would make the natural examples look like they agree perfectly. The whole distribution comes
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
    rows, cols = top_contexts(values, tokens.cpu(), k)
    return NaturalExamples(feature=f, tokens=tokens.cpu(), values=values, rows=rows, cols=cols)


_VISUALIZE_DEFAULTS: dict[str, Any] = dict(
    n_pos=8, steps=200, seed=0, restarts=8, prefix=(), vocab=None, lr=0.1, init_scale=1.0,
    temperature=(1.0, 0.05), entropy=0.1, refine_steps=20, top_k=32,
)


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
    k: int = 50,
    direction: Any = None,
    peers: int | Sequence[str | Feature] = DEFAULT_PEERS,
    alpha: float = 0.05,
    n_start: int = 8,
    peer_seed: int = 0,
    progress: bool = True,
    **visualize_kwargs: Any,
) -> FVCheck:
    """Is the visualization of ``feature`` an honest picture of it? A calibrated test.

    The FV is compared with the feature's natural top-``k`` examples (duplicate contexts
    dropped) on four measures (:mod:`apexlens.engines.features.measures`): its activation
    over the natural maximum, how far above the natural inputs the optimiser's own swap phase
    gets from (``n_start`` of them), and how unlike them it is reached (attribution shares) and
    represented (the residual the feature reads). The same is computed for ``peers`` --
    features of the same kind and layer, visualized with the same settings
    (:mod:`apexlens.api.peers`); the FV is flagged when it is more unusual than all but an
    ``alpha`` share of them (``p_value <= alpha``; the false-alarm rate is at most ``alpha``
    when the feature is exchangeable with its peers).

    Args:
        fv: a :func:`visualize` result of this feature made with ``visualize_kwargs``
            (computed here, in one batch with the peers, when not given). The settings it
            records (``n_pos``, ``restarts``, ``steps``, ``seed``) are the defaults; pass any
            other non-default setting it was made with.
        peers: how many peers to draw (default 31, so that ``p_value`` can reach 1/32) or the
            peer features themselves. Peer statistics are cached per model while its
            weights and the settings are unchanged, so checking several features of a layer
            pays for the peers once.
        alpha: the false-alarm rate to flag at; needs ``(peers + 1) * alpha >= 1``.
        n_start: natural top contexts the natural-start climb starts from.
        peer_seed: seeds the draw of peers (and of random directions for direction features).
        visualize_kwargs: :func:`visualize`'s settings (``n_pos``, ``steps``, ``seed``, ...),
            used for the FV and for every peer.
        progress: progress bars, named by step (visualizations, evidence); default on.
    """
    f = parse_feature(model, feature, direction=direction)
    bk = backend_for(model)
    natural_tokens = check_tokens(bk, natural_tokens, "natural_tokens")
    _positive_int(k, "k", 3)
    _positive_int(n_start, "n_start")
    alpha = _number(alpha, "alpha")
    if alpha >= 1:
        raise ApexlensError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(peer_seed, bool) or not isinstance(peer_seed, int):
        raise ApexlensError(f"peer_seed must be an integer, got {peer_seed!r}")
    unknown = set(visualize_kwargs) - set(_VISUALIZE_DEFAULTS)
    if unknown:
        raise ApexlensError(f"fv_check got unknown arguments {sorted(unknown)}")
    settings = {**_VISUALIZE_DEFAULTS, **_recorded(fv), **visualize_kwargs}
    plan = _plan(bk, model, f, direction=None, **settings)
    if fv is not None:
        _check_fv(fv, f, plan)
    peer_feats = _peers(model, bk, f, peers, natural_tokens, peer_seed)
    if (len(peer_feats) + 1) * alpha < 1:
        raise ApexlensError(
            f"with {len(peer_feats)} peers the smallest p-value is 1/{len(peer_feats) + 1} > "
            f"alpha={alpha:g}: the check could never flag; use peers >= {math.ceil(1 / alpha) - 1}"
        )
    return _run_check(model, bk, plan, f, fv, peer_feats, natural_tokens, k, n_start, alpha,
                      progress)


def _recorded(fv: Any) -> dict[str, Any]:
    """The settings a given FV records (``n_pos``, ``restarts``, ``steps``, ``seed``): the
    defaults of its check, so that its peers are visualized the same way."""
    if not isinstance(fv, FeatureVisualization):
        return {}
    return dict(n_pos=int(fv.tokens.shape[1]), restarts=int(fv.tokens.shape[0]),
                steps=fv.soft_steps, seed=fv.seed)


def _check_fv(fv: FeatureVisualization, f: Feature, plan: Plan) -> None:
    """A given FV must be of this feature and made with these settings (what it records)."""
    if not isinstance(fv, FeatureVisualization):
        raise ApexlensError(
            f"fv must be a FeatureVisualization (from visualize) or None, got {type(fv).__name__}"
        )
    if fv.feature.spec != f.spec:
        raise ApexlensError(f"fv visualizes {fv.feature.spec!r}, not {f.spec!r}")
    made = dict(n_pos=fv.tokens.shape[1], restarts=fv.tokens.shape[0], steps=fv.soft_steps,
                seed=fv.seed)
    want = dict(n_pos=plan.n_pos, restarts=plan.restarts, steps=plan.steps, seed=plan.seed)
    if made != want:
        raise ApexlensError(
            f"fv was made with {made}, fv_check's settings are {want}: pass the visualize "
            "settings the fv was made with (its peers are visualized the same way)"
        )


def _peers(
    model: Any, bk: Backend, f: Feature, peers: Any, natural: Tensor, seed: int
) -> tuple[Feature, ...]:
    if isinstance(peers, bool) or isinstance(peers, str):
        raise ApexlensError(f"peers must be an int or a list of features, got {peers!r}")
    if isinstance(peers, int):
        _positive_int(peers, "peers")
        return choose_peers(model, bk, f, peers, natural, seed)
    return check_peers(model, f, list(peers))


def _settings(plan: Plan, k: int, n_start: int) -> tuple[Any, ...]:
    return (plan.n_pos, plan.read, tuple(plan.prefix.tolist()), tuple(plan.allowed.tolist()),
            plan.steps, plan.restarts, plan.seed, plan.lr, plan.init_scale, plan.temperature,
            plan.entropy, plan.refine_steps, plan.top_k, k, n_start)


def _run_check(
    model: Any, bk: Backend, plan: Plan, f: Feature, fv: FeatureVisualization | None,
    peers: tuple[Feature, ...], natural: Tensor, k: int, n_start: int, alpha: float,
    progress: bool,
) -> FVCheck:
    """Visualize every feature not known yet (the checked one unless ``fv`` is given or it
    was a peer before; uncached peers) in one batch, gather their evidence in one pass, keep
    each in the cache, and test."""
    key = CACHE.settings_key(model, _settings(plan, k, n_start), natural)
    wanted = ((f,) if fv is None else ()) + peers
    todo = tuple(x for x in wanted if CACHE.get(model, key, x) is None)
    bar = progress_bar(
        (plan.steps + plan.refine_steps if todo else 0) + 1 + plan.refine_steps,
        f"fv_check {f.label} ({len(todo)} of {len(wanted)} visualizations to make)", progress,
    )
    with inference_mode(model, grad=True):
        vis = []
        if todo:
            found = optimise(bk, replace(plan, feature=todo[0]), bar, todo[1:])
            vis = [_visualization(plan, found, i, x) for i, x in enumerate(todo)]
        feats = ((f,) if fv is not None else ()) + todo
        shown = ([fv] if fv is not None else []) + vis
        evs = []
        if feats:
            evs = collect(bk, replace(plan, feature=feats[0]), feats[1:],
                          torch.stack([v.tokens[0] for v in shown]), natural, k=k,
                          n_start=n_start, bar=bar)
    bar.close()
    entries = [(v, ev, statistics(ev)) for v, ev in zip(shown, evs, strict=True)]
    for x, entry in zip(feats, entries, strict=True):
        if x is not f or fv is None:
            CACHE.put(model, key, x, entry)
    target = entries[0] if fv is not None else CACHE.get(model, key, f)
    rows = [target[1:]] + [CACHE.get(model, key, p)[1:] for p in peers]
    return _result(model, f, target[0], natural, k, peers, rows, alpha)


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


def _result(
    model: Any, f: Feature, fv: FeatureVisualization, natural: Tensor, k: int,
    peers: tuple[Feature, ...], rows: list[Any], alpha: float,
) -> FVCheck:
    """The :class:`FVCheck` of the checked feature's evidence and statistics (``rows[0]``)
    against its peers' (``rows[1:]``)."""
    ev = rows[0][0]
    stats = torch.tensor([[st[m] for m in MEASURES] for _, st in rows], dtype=torch.float64)
    evidence = torch.tensor(
        [[float(getattr(e, c)) if hasattr(e, c) else st[c] for c in EVIDENCE] for e, st in rows],
        dtype=torch.float64,
    )
    _, p_value, rank_p = peer_test(stats)
    nat = top_examples(model, f, natural, k=k)
    mech, mech_null = _similarity(ev.fv_attribution, ev.natural_attribution)
    rep, rep_null = _similarity(ev.fv_resid, ev.natural_resid)
    contexts = [natural[r, : c + 1].cpu() for r, c in zip(nat.rows.tolist(), nat.cols.tolist(), strict=True)]
    return FVCheck(
        feature=f, fv=fv, natural=nat, fv_activation=ev.fv_activation,
        components=list(ev.components),
        fv_attribution=ev.fv_attribution, natural_attribution=ev.natural_attribution,
        mechanism_similarity=mech, mechanism_null=mech_null,
        representation_similarity=rep, representation_null=rep_null,
        token_similarity=_token_similarity(fv.tokens[0], contexts, backend_for(model).dims.d_vocab_in),
        peers=[p.label for p in peers], measures=list(MEASURES), statistics=stats,
        evidence=evidence, rank_p=rank_p, p_value=p_value, alpha=alpha,
    )
