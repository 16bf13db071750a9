"""Peers of a feature for :func:`apexlens.fv_check`'s within-model null, and a per-model cache
of their statistics.

The null is only as good as the exchangeability of the checked feature with its peers: the
same kind of feature, in the same layer, visualized by the same procedure. The default rule
(:func:`choose_peers`) draws, with a fixed seed, from

* a neuron (``mL.nI``): the other *live* neurons of MLP ``L`` -- those whose natural maximum is
  at least 0.3x the layer's 90th percentile of natural maxima (dead neurons have no natural
  examples to compare with);
* a hook index (``<hook>[..., i]``) or a logit (``logit:t``): the other indices of the last
  axis, live by the same rule;
* a head output or residual direction (``L.H``, ``rL``): the same component read along random
  directions of the same norm (seeded). A random direction is a weaker peer of a meaningful
  one (an unembedding row, a probe): pass ``peers=[...]`` built the way yours was
  (:func:`apexlens.parse_feature` with their directions) when you have such a family.

The draw does not depend on which feature is checked (it is one pool per layer, the checked
feature left out), so checking many features of one layer reuses the peers' statistics
(:class:`PeerCache`).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from apexlens.engines.features import feature_grid, hook_shape
from apexlens.errors import ApexlensError
from apexlens.model import Backend
from apexlens.model.hooks import inference_mode
from apexlens.vocab.features import Feature, parse_feature

LIVE = 0.3
"""A neuron is live when its natural maximum is at least this share of the layer's 90th
percentile of natural maxima."""


def _siblings(model: Any, bk: Backend, f: Feature) -> list[Feature] | None:
    """Every feature of the same kind and layer as ``f`` that differs only by its index
    (``None``: ``f`` is read along a direction)."""
    if f.kind == "neuron":
        n = bk.dims.d_mlp
        return [replace(f, spec=f"m{f.layer}.n{i}", index=(i,)) for i in range(n)]
    if f.kind == "logit":
        return [replace(f, spec=f"logit:{t}", index=(t,)) for t in range(bk.dims.d_vocab)]
    if f.kind == "attn":
        head, key = f.index
        return [
            replace(f, spec=f"{f.layer}.{h}.attn:{key}", index=(h, key))
            for h in range(bk.dims.n_heads)
        ]
    if f.kind == "hook":
        with inference_mode(model):
            size = hook_shape(model, f.hook, bk.device)[-1]
        return [
            replace(
                f, spec=f"{f.hook}[{','.join(map(str, (*f.index[:-1], i)))}]",
                index=(*f.index[:-1], i),
            )
            for i in range(size)
        ]
    return None


def _live(
    model: Any, features: list[Feature], tokens: Int[Tensor, "batch pos"], batch_size: int
) -> list[Feature]:
    with inference_mode(model):
        grid = feature_grid(model, features, tokens, batch_size)
    top = grid.flatten(1).float().cpu().nan_to_num(nan=-torch.inf).max(1).values
    bar = LIVE * float(top.quantile(0.9))
    return [f for f, m in zip(features, top.tolist(), strict=True) if m >= bar and m > 0]


def choose_peers(
    model: Any,
    bk: Backend,
    f: Feature,
    n: int,
    natural_tokens: Int[Tensor, "batch pos"],
    seed: int,
    batch_size: int = 256,
) -> tuple[Feature, ...]:
    """``n`` peers of ``f`` by the module's rule (seeded by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    sib = _siblings(model, bk, f)
    if sib is None:
        assert f.direction is not None
        d = f.direction.detach().float().cpu()
        dirs = torch.randn(n, d.numel(), generator=g)
        dirs = dirs / dirs.norm(dim=1, keepdim=True) * d.norm()
        return tuple(
            replace(f, direction=dirs[i].to(f.direction), spec=f.spec) for i in range(n)
        )
    pool = _live(model, sib, natural_tokens, batch_size)
    order = torch.randperm(len(pool), generator=g).tolist()
    chosen = [pool[i] for i in order[: n + 1]]
    keep = [p for p in chosen if p.index != f.index][:n]
    if len(keep) < n:
        raise ApexlensError(
            f"{f.label}: only {len(keep)} live peers of the same kind and layer for peers={n} "
            "(a live feature reaches 0.3x the layer's 90th percentile of natural maxima); pass "
            "a smaller peers= (with a larger alpha) or a list of peer features"
        )
    return tuple(replace(p, position=f.position) for p in keep)


def check_peers(model: Any, f: Feature, peers: Sequence[Any]) -> tuple[Feature, ...]:
    """Peer features given by the user, parsed and checked against ``f``."""
    out = []
    for p in peers:
        q = parse_feature(model, p)
        if (q.kind, q.layer, q.hook) != (f.kind, f.layer, f.hook):
            raise ApexlensError(
                f"peer {q.label!r} is not a feature of the same kind and layer as {f.label!r} "
                "(a peer must be exchangeable with the checked feature)"
            )
        out.append(replace(q, position=f.position))
    if any(_key(q) == _key(f) for q in out):
        raise ApexlensError(f"peers must not include the checked feature {f.label!r}")
    return tuple(out)


def _key(f: Feature) -> tuple[Any, ...]:
    d = b"" if f.direction is None else f.direction.detach().double().cpu().numpy().tobytes()
    return (f.spec, f.position, hashlib.sha1(d).hexdigest())


def _fingerprint(t: Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class PeerCache:
    """Statistics of peer features, per model, reused while the model's weights are unchanged
    (every parameter's in-place version counter is part of the key) and the settings agree."""

    def __init__(self) -> None:
        self._models: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()

    @staticmethod
    def settings_key(model: Any, settings: tuple[Any, ...], natural: Tensor) -> tuple[Any, ...]:
        versions = tuple(p._version for p in model.parameters())
        return (versions, settings, tuple(natural.shape), _fingerprint(natural))

    def get(self, model: Any, settings: tuple[Any, ...], f: Feature) -> Any:
        return self._models.get(model, {}).get((settings, _key(f)))

    def put(self, model: Any, settings: tuple[Any, ...], f: Feature, value: Any) -> None:
        self._models.setdefault(model, {})[(settings, _key(f))] = value

    def clear(self) -> None:
        self._models.clear()


CACHE = PeerCache()
