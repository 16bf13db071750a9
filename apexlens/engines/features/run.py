"""A feature read exactly on a forward pass, from real tokens or a soft input.

:func:`run_feature` reads a :class:`~apexlens.vocab.features.Feature` at every position, with
autograd where enabled; ``soft`` (per position a distribution over the vocabulary whose
embedding ``probs @ E`` replaces the token embedding) is how feature visualization optimises
an input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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


def _forward(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    soft: Tensor | None,
    embed_matrix: Tensor | None,
    keep: Sequence[str],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the activations at ``keep`` (not detached), ``soft @ E`` as the token
    embedding when ``soft`` is given."""
    store: dict[str, Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    if soft is not None:
        assert embed_matrix is not None
        emb = soft.to(embed_matrix.dtype) @ embed_matrix
        hooks.append(("hook_embed", edits.replace(emb)))
    for name in dict.fromkeys(keep):
        hooks.append((name, _keep(store, name)))
    with attached(model, hooks):
        logits = model(tokens)
    return logits, store


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
    logits, store = _forward(
        model, tokens, soft, embed_matrix, [*keep, *([feature.hook] if feature.hook else [])]
    )
    act = logits if feature.kind == "logit" else store[feature.hook]
    return feature.values(act, model), store


class Rows(NamedTuple):
    """:func:`read_rows`: each row's own feature at the read position, and the activations
    kept (not detached)."""

    values: Float[Tensor, " batch"]
    store: dict[str, Tensor]


def read_rows(
    model: Any,
    features: Sequence[Feature],
    owner: Int[Tensor, " batch"],
    tokens: Int[Tensor, "batch pos"],
    read: int,
    *,
    soft: Float[Tensor, "batch pos d_vocab"] | None = None,
    embed_matrix: Tensor | None = None,
    keep: Sequence[str] = (),
) -> Rows:
    """Row ``i``'s feature ``features[owner[i]]`` at position ``read``, every row in one
    forward pass (with autograd where enabled). One feature: :func:`run_feature`'s value."""
    if len(features) == 1:
        vals, store = run_feature(
            model, features[0], tokens, soft=soft, embed_matrix=embed_matrix, keep=keep
        )
        return Rows(vals[:, read], store)
    logits, store = _forward(
        model, tokens, soft, embed_matrix, [*keep, *(f.hook for f in features if f.hook)]
    )
    owner = owner.to(tokens.device)
    parts, where = [], []
    for j, f in enumerate(features):
        rows = (owner == j).nonzero().flatten()
        if rows.numel():
            act = logits if f.kind == "logit" else store[f.hook]
            parts.append(f.values(act[rows], model)[:, read])
            where.append(rows)
    order = torch.argsort(torch.cat(where))
    return Rows(torch.cat(parts)[order], store)


def feature_grid(
    model: Any,
    features: Sequence[Feature],
    tokens: Int[Tensor, "batch pos"],
    batch_size: int = 256,
) -> Float[Tensor, "feature batch pos"]:
    """Every feature at every position of every row (one forward pass per ``batch_size``
    rows for all features together; call it without gradients)."""
    keep = [f.hook for f in features if f.hook]
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        logits, store = _forward(model, tokens[i : i + batch_size], None, None, keep)
        out.append(
            torch.stack(
                [f.values(logits if f.kind == "logit" else store[f.hook], model) for f in features]
            ).detach()
        )
    return torch.cat(out, 1)


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


def hook_shape(model: Any, hook: str, device: Any) -> tuple[int, ...]:
    """The shape of ``hook``'s activation on one token (call it without gradients)."""
    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    _, store = _forward(model, tokens, None, None, [hook])
    return tuple(store[hook].shape)
