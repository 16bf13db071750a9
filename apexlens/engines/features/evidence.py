"""The evidence behind :func:`apexlens.fv_check`, for a feature and its peers at once.

For every feature of a set (the checked one and its *peers*, features of the same kind and
layer) and its visualization (FV), :func:`collect` gathers

* the natural distribution (one forward pass over the natural tokens for every feature) and
  the top-``k`` natural examples, duplicate contexts dropped (:func:`top_contexts`: the same
  prefix at several rows is one example; repeated, it makes the natural examples look like
  they agree perfectly);
* the attribution profile (gradient x activation per upstream component) and the residual
  stream the feature reads, of the FV and of every natural top example
  (:func:`~apexlens.engines.features.attribution.attribution_rows`: every (feature,
  example) pair of one length in one forward and backward pass);
* the *natural-start* climb: the visualization's discrete swap phase
  (:func:`~apexlens.engines.features.optimise.climb`) started from the feature's top natural
  contexts instead of the optimiser's random start region, and how high it gets.

:mod:`~apexlens.engines.features.measures` turns this into the check's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.features.attribution import attribution_rows
from apexlens.engines.features.optimise import Plan, climb
from apexlens.engines.features.run import feature_grid
from apexlens.model import Backend
from apexlens.vocab.features import Feature


def top_contexts(
    values: Float[Tensor, "batch pos"], tokens: Int[Tensor, "batch pos"], k: int
) -> tuple[Int[Tensor, " k"], Int[Tensor, " k"]]:
    """``(rows, cols)`` of the ``k`` largest finite values, largest first, each context
    (``tokens[row, :col + 1]``) once: a repeated context keeps its first (largest) place;
    ties in value keep the flat order."""
    n_pos = values.shape[1]
    flat = values.flatten()
    finite = ~flat.isnan()
    order = torch.sort(flat.masked_fill(~finite, -torch.inf), descending=True, stable=True).indices
    order = order[: int(finite.sum())]
    seen: set[tuple[int, ...]] = set()
    rows: list[int] = []
    cols: list[int] = []
    toks = tokens.tolist()
    for i in order.tolist():
        r, c = divmod(i, n_pos)
        ctx = tuple(toks[r][: c + 1])
        if ctx in seen:
            continue
        seen.add(ctx)
        rows.append(r)
        cols.append(c)
        if len(rows) == k:
            break
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


@dataclass
class Evidence:
    """What :func:`collect` measured for one feature."""

    components: list[str]
    fv_activation: float
    natural_max: float
    natural_median: float
    start_activation: float
    """the best activation the swap phase reaches from the natural top contexts"""
    fv_attribution: Float[Tensor, " component"]
    fv_resid: Float[Tensor, " d_model"]
    natural_attribution: Float[Tensor, "k component"]
    natural_resid: Float[Tensor, "k d_model"]
    natural_activations: Float[Tensor, " k"]


def natural_values(
    model: Any, features: tuple[Feature, ...], tokens: Int[Tensor, "batch pos"], batch_size: int
) -> Float[Tensor, "feature batch pos"]:
    """Every feature at every position of the natural tokens (call it without gradients)."""
    return feature_grid(model, features, tokens, batch_size).float().cpu()


def _profiles(
    model: Any, features: tuple[Feature, ...], owner: Tensor, contexts: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Attribution profiles and residuals of ``(features[owner[i]], contexts[i])``, every
    context length in one pass; rows in the order given."""
    n = len(contexts)
    lengths = torch.tensor([c.numel() for c in contexts])
    A: list[Tensor | None] = [None] * n
    H: list[Tensor | None] = [None] * n
    for length in lengths.unique().tolist():
        idx = (lengths == length).nonzero().flatten()
        toks = torch.stack([contexts[i] for i in idx.tolist()])
        at = attribution_rows(model, features, owner[idx], toks, length - 1)
        for j, i in enumerate(idx.tolist()):
            A[i], H[i] = at.scores[j], at.resid[j]
    return (
        torch.stack([a for a in A if a is not None]).double().cpu(),
        torch.stack([h for h in H if h is not None]).double().cpu(),
    )


def _starts(contexts: list[Tensor], n_pos: int, n_start: int) -> list[Tensor]:
    """The first ``n_start`` contexts as inputs of ``n_pos`` tokens: the last ``n_pos``
    tokens, left-padded with the context's first token; repeated when there are fewer."""
    out = []
    for i in range(n_start):
        c = contexts[i % len(contexts)][-n_pos:]
        out.append(torch.cat([c[:1].expand(n_pos - c.numel()), c]))
    return out


def collect(
    bk: Backend,
    plan: Plan,
    peers: tuple[Feature, ...],
    fv_tokens: Int[Tensor, "feature pos"],
    natural_tokens: Int[Tensor, "batch pos"],
    *,
    k: int,
    n_start: int,
    bar: Any,
    batch_size: int = 256,
) -> list[Evidence]:
    """:class:`Evidence` of the plan's feature and of every peer (in that order);
    ``fv_tokens``: each one's best FV input (call it with gradients enabled, the model in
    eval mode)."""
    model = bk.model
    feats = (plan.feature, *peers)
    with torch.no_grad():
        values = natural_values(model, feats, natural_tokens, batch_size)
    tops = [top_contexts(values[j], natural_tokens.cpu(), k) for j in range(len(feats))]
    contexts = [
        [natural_tokens[r, : c + 1].cpu() for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
        for rows, cols in tops
    ]
    # natural top examples, every feature's read at its own context's last position
    owner = torch.cat([torch.full((len(c),), j) for j, c in enumerate(contexts)])
    flat = [c for cs in contexts for c in cs]
    last = tuple(replace(f, position=-1) for f in feats)
    A, H = _profiles(model, last, owner, flat)
    fv_at = attribution_rows(
        model, feats, torch.arange(len(feats)), fv_tokens.to(bk.device), plan.read
    )
    bar.update(1)
    # each context ends at the read position; what follows it cannot change the feature
    starts = torch.stack([s for cs in contexts for s in _starts(cs, plan.read + 1, n_start)])
    tail = fv_tokens[:, plan.read + 1 :].cpu().repeat_interleave(n_start, 0)
    starts = torch.cat([starts, tail], 1)
    if plan.prefix.numel():
        starts[:, : plan.prefix.numel()] = plan.prefix
    found = climb(bk, plan, starts, bar, peers)
    reached = found.activation.reshape(len(feats), n_start).max(1).values
    out, at = [], 0
    for j in range(len(feats)):
        n = len(contexts[j])
        nat = values[j]
        out.append(
            Evidence(
                components=list(fv_at.labels),
                fv_activation=float(fv_at.value[j]),
                natural_max=float(nat[~nat.isnan()].max()),
                natural_median=float(nat[~nat.isnan()].median()),
                start_activation=float(reached[j]),
                fv_attribution=fv_at.scores[j].double().cpu(),
                fv_resid=fv_at.resid[j].double().cpu(),
                natural_attribution=A[at : at + n],
                natural_resid=H[at : at + n],
                natural_activations=nat[tops[j][0], tops[j][1]].double(),
            )
        )
        at += n
    return out
