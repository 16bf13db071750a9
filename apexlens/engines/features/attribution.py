"""A feature split into what each upstream component wrote: gradient x activation.

:func:`attribution` gives, for the token and position embeddings, every attention head
(``z @ W_O``) and every MLP, gradient x activation summed over positions -- exact for a
feature that is linear in the residual stream (a logit, a residual direction), the
first-order share otherwise -- with the residual stream the feature reads. It is how
:func:`apexlens.fv_check` asks whether a visualization reaches its activation *through the
same components* as the natural examples that excite the feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.features.run import read_rows
from apexlens.errors import ApexlensError
from apexlens.model import Backend, backend_for
from apexlens.vocab.features import Feature, read_position


def components(bk: Backend, feature: Feature) -> list[tuple[str, str, int | None]]:
    """``(label, hook, head)`` of every component upstream of ``feature``: the embeddings,
    the heads and MLPs whose output reaches it (a neuron of MLP L also reads layer L's heads,
    unless attention and MLP run in parallel)."""
    out: list[tuple[str, str, int | None]] = [("tok_embed", "hook_embed", None)]
    if "hook_pos_embed" in bk.split_embed_hooks():
        out.append(("pos_embed", "hook_pos_embed", None))
    n_layers = min(feature.layer, bk.dims.n_layers)
    head_layers = n_layers
    if feature.kind == "neuron" and not bk.mlp_reads_resid_pre:
        head_layers = n_layers + 1
    for layer in range(head_layers):
        out += [(f"{layer}.{h}", bk.z(layer), h) for h in range(bk.dims.n_heads)]
        if layer < n_layers and bk.dims.has_mlps:
            out.append((f"m{layer}", bk.mlp_out(layer), None))
    return out


class Attribution(NamedTuple):
    """One pass of :func:`attribution`."""

    labels: list[str]
    """the upstream components, in order (:func:`components`)"""
    scores: Float[Tensor, "batch component"]
    """gradient x activation per component, summed over positions"""
    value: Float[Tensor, " batch"]
    """the feature at its read position"""
    resid: Float[Tensor, "batch d_model"]
    """the residual stream the feature's layer reads, at the read position"""


def resid_hook(bk: Backend, feature: Feature) -> str:
    """Where the residual stream the feature's layer reads lives (MLP neurons: after
    attention, unless attention and MLP run in parallel)."""
    layer = min(feature.layer, bk.dims.n_layers)
    if layer >= bk.dims.n_layers:
        return bk.resid_post(layer - 1)
    if feature.kind == "neuron" and not bk.mlp_reads_resid_pre:
        return bk.resid_mid(layer)
    return bk.resid_pre(layer)


def attribution(
    model: Any,
    feature: Feature,
    tokens: Int[Tensor, "batch pos"],
    *,
    soft: Tensor | None = None,
    embed_matrix: Tensor | None = None,
) -> Attribution:
    """Gradient x activation of ``feature`` (at its read position) for every upstream
    component, summed over positions, with the residual stream the feature reads -- one
    forward and one backward pass."""
    p = read_position(feature, tokens.shape[1])
    owner = torch.zeros(tokens.shape[0], dtype=torch.long)
    return attribution_rows(model, (feature,), owner, tokens, p, soft=soft, embed_matrix=embed_matrix)


def attribution_rows(
    model: Any,
    features: Sequence[Feature],
    owner: Int[Tensor, " batch"],
    tokens: Int[Tensor, "batch pos"],
    read: int,
    *,
    soft: Tensor | None = None,
    embed_matrix: Tensor | None = None,
) -> Attribution:
    """:func:`attribution` of row ``i``'s own feature ``features[owner[i]]`` at position
    ``read``, every row in one forward and one backward pass (rows never interact, so each
    row's gradient is the one it gets alone). The features must share their upstream
    components and residual read (the same kind and layer: peers)."""
    bk = backend_for(model)
    comps = components(bk, features[0])
    resid = resid_hook(bk, features[0])
    if any(components(bk, f) != comps or resid_hook(bk, f) != resid for f in features[1:]):
        raise ApexlensError("attribution_rows: the features must share their upstream components")
    hooks = sorted({h for _, h, _ in comps})
    with torch.enable_grad():
        target = read_rows(
            model, features, owner, tokens, read, soft=soft, embed_matrix=embed_matrix,
            keep=[*hooks, resid],
        )
        store = target.store
        acts = [store[h] for h in hooks]
        grads = torch.autograd.grad(target.values.sum(), acts, allow_unused=True)
    by_hook = {h: (a.detach(), g) for h, a, g in zip(hooks, acts, grads, strict=True)}
    cols = []
    for _, hook, head in comps:
        act, grad = by_hook[hook]
        if grad is None:
            cols.append(torch.zeros(tokens.shape[0], dtype=act.dtype, device=act.device))
            continue
        ga = grad * act
        if head is not None:
            ga = ga[:, :, head]
        cols.append(ga.flatten(1).sum(1))
    return Attribution(
        [c for c, _, _ in comps],
        torch.stack(cols, 1).detach(),
        target.values.detach(),
        store[resid][:, read].detach(),
    )
