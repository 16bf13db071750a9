"""Grouped-query attention: a query head reading a key or value input of its own.

Under grouped-query attention ``hook_k``/``hook_v`` hold one slot per key/value head, shared
by a group of query heads. A receiver ``"L.H.k"`` changes only query head H's key input, so
it cannot be a slot edit: head H's new ``z`` is computed by the block's own attention with
its key/value slot holding H's input (:meth:`~apexlens.model.Backend.attn_z`), exactly an
ungrouped copy of the layer with only head H's slice changed. The plan (which heads share a
slot and take turns) is made once, when the hooks are built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from apexlens.model import edits
from apexlens.model.backend import Backend


def grouped_kv_hooks(
    bk: Backend,
    layer: int,
    items: Sequence[tuple[int, str]],
    values: Callable[[Mapping[str, Tensor]], Mapping[tuple[int, str], Tensor]],
) -> list[tuple[str, Any]]:
    """Hook edits giving query heads of a grouped-query layer key/value inputs of their own.

    ``items`` are ``(query head, "k" | "v")``; ``values(store)`` returns, when ``hook_z``
    fires, each item's new ``hook_k``/``hook_v`` slot value ``[n, pos, d_head]`` (``store``
    holds this run's ``"resid"``, ``"q"``, ``"k"``, ``"v"`` of the layer, after every
    earlier edit). Only those heads' ``hook_z`` change: head ``h``'s new ``z`` is the one
    :meth:`~apexlens.model.backend.Backend.attn_z` computes with its key/value slot holding its own
    input (query heads sharing a slot take turns, one call each) -- exactly an ungrouped
    copy of the layer with only head ``h``'s slice of ``hook_k``/``hook_v`` changed.
    Attach these after every other edit of the layer's ``hook_q/k/v``.
    """
    store: dict[str, Tensor] = {}
    heads = sorted({h for h, _ in items})
    rounds: list[list[int]] = []
    used: dict[int, int] = {}
    for h in heads:
        r = used.get(bk.slot(h, "k"), 0)
        used[bk.slot(h, "k")] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(h)

    def z_value(z: Tensor) -> Tensor:
        new = values(store)
        out: dict[int, Tensor] = {}
        for heads_now in rounds:
            kv = {"k": store["k"].clone(), "v": store["v"].clone()}
            for h in heads_now:
                for ch in ("k", "v"):
                    if (h, ch) in new:
                        kv[ch][:, :, bk.slot(h, ch)] = new[(h, ch)].to(kv[ch].dtype)
            z_new = bk.attn_z(layer, store["resid"], store["q"], kv["k"], kv["v"])
            for h in heads_now:
                out[h] = z_new[:, :, h]
        return torch.stack([out[h] for h in heads], dim=2)

    return [
        (bk.resid_pre(layer), edits.save(store, "resid", clone=False)),
        *((bk.qkv(layer, ch), edits.save(store, ch, clone=False)) for ch in "qkv"),
        (bk.z(layer), edits.set_heads(heads, z_value)),
    ]
