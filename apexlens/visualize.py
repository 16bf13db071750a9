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
  through (:func:`apexlens.features.attribution`), FV vs natural top-k, against the natural
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

from apexlens.backend import backend_for
from apexlens.errors import ApexlensError
from apexlens.features import (
    Feature,
    attribution,
    embedding_matrix,
    feature_values,
    parse_feature,
    read_position,
    run_feature,
)
from apexlens.hooks import inference_mode
from apexlens.results import FeatureVisualization, FVCheck, NaturalExamples
from apexlens.runs import check_tokens, progress_bar


def _allowed(model: Any, vocab: Sequence[int] | Tensor | None) -> Int[Tensor, " allowed"]:
    d_vocab = int(model.cfg.d_vocab)
    if vocab is None:
        return torch.arange(d_vocab)
    ids = torch.as_tensor(vocab, dtype=torch.long).flatten()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= d_vocab:
        raise ApexlensError(f"vocab must list token ids in 0..{d_vocab - 1}, got {vocab!r}")
    return torch.unique(ids)


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
    progress: bool = False,
) -> FeatureVisualization:
    """Maximise ``feature`` over inputs of ``n_pos`` tokens (``prefix`` tokens first, fixed).

    Args:
        feature: a feature spelling (:mod:`apexlens.features`), e.g. ``"m1.n37"``.
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
    """
    f = parse_feature(model, feature, direction=direction)
    bk = backend_for(model)
    if not isinstance(n_pos, int) or n_pos < 1 or n_pos > bk.dims.n_ctx:
        raise ApexlensError(f"n_pos must be an int in 1..{bk.dims.n_ctx} (n_ctx), got {n_pos!r}")
    for name, v, lo in (
        ("steps", steps, 0),
        ("restarts", restarts, 1),
        ("refine_steps", refine_steps, 0),
        ("top_k", top_k, 1),
    ):
        if not isinstance(v, int) or v < lo:
            raise ApexlensError(f"{name} must be an int >= {lo}, got {v!r}")
    if steps == 0 and refine_steps == 0:
        raise ApexlensError("steps and refine_steps are both 0: nothing would be optimised")
    fixed = torch.as_tensor(
        list(prefix) if not isinstance(prefix, Tensor) else prefix, dtype=torch.long
    ).flatten()
    if fixed.numel() >= n_pos:
        raise ApexlensError(
            f"prefix has {fixed.numel()} tokens; n_pos={n_pos} leaves none to optimise"
        )
    allowed = _allowed(model, vocab)
    p_read = read_position(f, n_pos)
    if p_read < fixed.numel():
        raise ApexlensError(
            f"feature {f.label!r} is read at position {p_read}, inside the fixed prefix: "
            "nothing optimised can change it"
        )
    device = bk.device
    n_free = n_pos - fixed.numel()
    if fixed.numel():
        check_tokens(bk, fixed[None].to(device), "prefix")
    g = torch.Generator().manual_seed(seed)
    theta0 = init_scale * torch.randn(restarts, n_free, allowed.numel(), generator=g)
    trajectory: list[Float[Tensor, " restarts"]] = []
    soft_traj: list[Float[Tensor, " restarts"]] = []
    total = steps + refine_steps
    with inference_mode(model, grad=True):
        E = embedding_matrix(model)
        E_allowed = E[allowed.to(device)]
        fixed_d = fixed.to(device)

        def full_tokens(free: Int[Tensor, "r free"]) -> Int[Tensor, "r pos"]:
            return torch.cat([fixed_d.expand(free.shape[0], -1), free], 1)

        def full_soft(probs: Tensor) -> Tensor:
            """``[r, n_pos, allowed]`` distributions, the prefix as one-hot rows."""
            if not fixed.numel():
                return probs
            onehot = torch.zeros(
                probs.shape[0], fixed.numel(), E.shape[0], dtype=probs.dtype, device=device
            )
            onehot[:, torch.arange(fixed.numel()), fixed_d] = 1
            rest = torch.zeros(probs.shape[0], n_free, E.shape[0], dtype=probs.dtype, device=device)
            rest[..., allowed.to(device)] = probs
            return torch.cat([onehot, rest], 1)

        def exact(free_ids: Int[Tensor, "r free"]) -> Float[Tensor, " r"]:
            toks = full_tokens(allowed.to(device)[free_ids])
            with torch.no_grad():
                return run_feature(model, f, toks)[0][:, p_read].detach().float().cpu()

        soft_E = E if fixed.numel() else E_allowed
        theta = theta0.to(device=device, dtype=E.dtype).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        t0, t1 = temperature
        bar = progress_bar(total, f"visualize {f.label}", progress)
        for i in range(steps):
            frac = i / max(steps - 1, 1)
            temp = t0 * (t1 / t0) ** frac
            probs = torch.softmax(theta / temp, -1)
            soft = full_soft(probs)
            ids = probs.argmax(-1)
            vals, _ = run_feature(
                model, f, full_tokens(allowed.to(device)[ids]), soft=soft, embed_matrix=soft_E
            )
            act = vals[:, p_read]
            ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(-1)
            loss = -(act - entropy * frac * ent).sum()
            opt.zero_grad()
            (grad,) = torch.autograd.grad(loss, [theta])
            theta.grad = grad
            opt.step()
            soft_traj.append(act.detach().float().cpu())
            trajectory.append(exact(ids.detach()))
            bar.update(1)
        ids = (
            theta.detach().argmax(-1)
            if steps
            else torch.randint(0, allowed.numel(), (restarts, n_free), generator=g).to(device)
        )
        current = exact(ids)
        if not steps:
            trajectory.append(current)
        k = min(top_k, allowed.numel())
        for _ in range(refine_steps):
            ids, current, improved = _swap_round(
                model,
                f,
                p_read,
                ids,
                current,
                allowed.to(device),
                full_tokens,
                full_soft,
                soft_E,
                k,
                exact,
            )
            trajectory.append(current.clone())
            bar.update(1)
            if not improved:
                bar.update(total - bar.n)
                break
        bar.close()
    order = torch.argsort(current, descending=True, stable=True)
    tokens = full_tokens(allowed.to(device)[ids]).cpu()[order]
    return FeatureVisualization(
        feature=f,
        tokens=tokens,
        activation=current[order],
        trajectory=torch.stack(trajectory)[:, order],
        soft_trajectory=torch.stack(soft_traj)[:, order] if soft_traj else torch.empty(0, restarts),
        soft_steps=steps,
        seed=seed,
    )


def _swap_round(
    model: Any,
    f: Feature,
    p_read: int,
    ids: Int[Tensor, "r free"],
    current: Float[Tensor, " r"],
    allowed: Int[Tensor, " allowed"],
    full_tokens: Any,
    full_soft: Any,
    soft_E: Tensor,
    k: int,
    exact: Any,
) -> tuple[Tensor, Tensor, bool]:
    """One GCG round: the one-hot gradient proposes ``k`` tokens per free position; every
    single swap is evaluated exactly; each restart keeps its best swap if it improves."""
    r, n_free = ids.shape
    onehot = torch.zeros(r, n_free, allowed.numel(), dtype=soft_E.dtype, device=ids.device)
    onehot.scatter_(2, ids[..., None], 1.0)
    onehot.requires_grad_(True)
    vals, _ = run_feature(
        model, f, full_tokens(allowed[ids]), soft=full_soft(onehot), embed_matrix=soft_E
    )
    (grad,) = torch.autograd.grad(vals[:, p_read].sum(), [onehot])
    grad = grad.masked_fill(onehot.detach() > 0, -math.inf)  # a swap changes the token
    cand = grad.topk(k, -1).indices  # [r, free, k]
    # every single swap: [r, free * k] candidate sequences
    cands = ids[:, None, :].repeat(1, n_free * k, 1)
    pos = torch.arange(n_free, device=ids.device).repeat_interleave(k)
    cands[:, torch.arange(n_free * k), pos] = cand.reshape(r, n_free * k)
    flat = cands.reshape(-1, n_free)
    scores = torch.cat([exact(flat[i : i + 512]) for i in range(0, flat.shape[0], 512)])
    scores = scores.reshape(r, n_free * k)
    best, where = scores.max(1)
    better = best > current
    new_ids = ids.clone()
    new_ids[better] = cands[better, where[better]]
    new_current = torch.where(better, best, current)
    return new_ids, new_current, bool(better.any())


def top_examples(
    model: Any,
    feature: str | Feature,
    tokens: Int[Tensor, "batch pos"],
    *,
    k: int = 20,
    direction: Any = None,
    positions: str | Sequence[int] = "all",
    batch_size: int = 256,
) -> NaturalExamples:
    """The ``k`` (example, position) pairs of ``tokens`` where ``feature`` is largest.

    The feature is read at every position (``positions="all"``; or only at the listed
    ones), each with its causal context (the tokens up to it). The whole distribution comes
    back as :attr:`NaturalExamples.values` ``[batch, pos]`` (``NaN`` where not read).
    """
    f = parse_feature(model, feature, direction=direction)
    values = feature_values(model, f, tokens, batch_size=batch_size).float().cpu()
    n_pos = values.shape[1]
    if positions != "all":
        if isinstance(positions, str):
            raise ApexlensError(f"positions must be 'all' or a list of ints, got {positions!r}")
        keep = torch.zeros(n_pos, dtype=torch.bool)
        for p in positions:
            if not -n_pos <= int(p) < n_pos:
                raise ApexlensError(f"position {p} is outside sequences of {n_pos} positions")
            keep[int(p)] = True
        values = values.masked_fill(~keep, math.nan)
    if not isinstance(k, int) or k < 1:
        raise ApexlensError(f"k must be a positive int, got {k!r}")
    flat = values.flatten()
    finite = ~flat.isnan()
    k = min(k, int(finite.sum()))
    top = torch.topk(flat.masked_fill(~finite, -math.inf), k)
    rows, cols = top.indices // n_pos, top.indices % n_pos
    return NaturalExamples(feature=f, tokens=tokens.cpu(), values=values, rows=rows, cols=cols)


def fv_check(
    model: Any,
    feature: str | Feature,
    natural_tokens: Int[Tensor, "batch pos"],
    *,
    fv: FeatureVisualization | None = None,
    k: int = 20,
    direction: Any = None,
    **visualize_kwargs: Any,
) -> FVCheck:
    """Compare a feature visualization with the feature's natural top-``k`` examples.

    ``fv``: a :func:`visualize` result of this feature (computed here with
    ``visualize_kwargs`` when not given). Returns an :class:`~apexlens.FVCheck`: the numbers
    (percentile, ratio to the natural maximum, token / representation / mechanism
    similarity with their natural null ranges), the attribution profiles and the verdict.
    """
    f = parse_feature(model, feature, direction=direction)
    bk = backend_for(model)
    natural_tokens = check_tokens(bk, natural_tokens, "natural_tokens")
    if fv is None:
        fv = visualize(model, f, **visualize_kwargs)
    elif fv.feature.spec != f.spec:
        raise ApexlensError(f"fv visualizes {fv.feature.spec!r}, not {f.spec!r}")
    nat = top_examples(model, f, natural_tokens, k=k)
    if nat.rows.numel() < 3:
        raise ApexlensError("fv_check needs at least 3 natural examples to compare against")
    fv_tokens = fv.tokens[:1].to(bk.device)
    with inference_mode(model, grad=True):
        at_fv = attribution(
            model, replace(f, position=read_position(f, fv_tokens.shape[1])), fv_tokens
        )
        a_nat, h_nat = [], []
        for row, col in zip(nat.rows.tolist(), nat.cols.tolist(), strict=True):
            ctx = natural_tokens[row : row + 1, : col + 1]
            at = attribution(model, replace(f, position=col), ctx)
            a_nat.append(at.scores)
            h_nat.append(at.resid)
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
        int(model.cfg.d_vocab),
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
