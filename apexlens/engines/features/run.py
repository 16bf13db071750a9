"""A feature read exactly on a forward pass, from real tokens or a soft input.

:func:`run_feature` reads a :class:`~apexlens.vocab.features.Feature` at every position, with
autograd where enabled; ``soft`` (per position a distribution over the vocabulary whose
embedding ``probs @ E`` replaces the token embedding) is how feature visualization optimises
an input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.model import backend_for, edits
from apexlens.model.hooks import attached
from apexlens.runs.rows import row_chunks
from apexlens.runs.shard import Share
from apexlens.vocab.features import Feature


def _keep(store: dict[str, Tensor], key: str) -> Any:
    """Record the activation *and hand it back*: a bridge converts what a hook returns back
    into the tensor that flows on, so gradients taken at the recorded tensor reach the
    feature (a read-only hook on a bridge alias sees a converted copy off the graph)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        store[key] = act
        return act

    return hook


def run_feature(
    model: Any,
    feature: Feature,
    tokens: Int[Tensor, "batch pos"],
    *,
    soft: Float[Tensor, "batch pos d_vocab"] | None = None,
    embed_matrix: Tensor | None = None,
    keep: Sequence[str] = (),
) -> tuple[Float[Tensor, "batch pos"], dict[str, Tensor]]:
    """The feature at every position (with autograd where enabled), plus the activations at
    ``keep`` (not detached). ``soft``: per-position distributions over the vocabulary whose
    embedding ``soft @ E`` replaces the token embedding (``tokens`` then only fix the shape)."""
    store: dict[str, Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    if soft is not None:
        assert embed_matrix is not None
        emb = soft.to(embed_matrix.dtype) @ embed_matrix
        hooks.append(("hook_embed", edits.replace(emb)))
    for name in dict.fromkeys([*keep, *([feature.hook] if feature.hook else [])]):
        hooks.append((name, _keep(store, name)))
    with attached(model, hooks):
        logits = model(tokens)
    act = logits if feature.kind == "logit" else store[feature.hook]
    return feature.values(act, model), store


def feature_rows(
    model: Any,
    feature: Feature,
    tokens: Int[Tensor, "batch pos"],
    batch_size: int = 256,
    progress: bool = False,
) -> Float[Tensor, "batch pos"]:
    """``feature`` at every position of every row of ``tokens``, ``batch_size`` rows per pass
    (call it without gradients). Under a shard, each rank reads a contiguous block of the
    rows."""
    n = tokens.shape[0]
    with Share("feature values", n) as share:
        mine = list(share.block(n))
        for chunk in row_chunks(mine, batch_size, desc=f"{feature.label}: values", progress=progress):
            rows = range(chunk[0], chunk[-1] + 1)
            share.put(rows, run_feature(model, feature, tokens[rows.start : rows.stop])[0].detach())
    dtype = share.parts()[0][1].dtype
    return share.fill(torch.empty(n, tokens.shape[1], dtype=dtype, device=backend_for(model).device))
