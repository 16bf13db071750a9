"""Hook edits: *what* an intervention does to an activation, given *where* (a hook name).

Every feature of apexlens changes or reads a forward pass through these few edits, each a
TransformerLens hook ``fn(activation, hook)``. Values may be tensors or callables of the
activation (evaluated when the hook fires, for edits whose value depends on the same run).
Edits never modify the activation they are handed in place, so a hook of the user's that
kept a reference sees its tensor unchanged.

=====================  =================================================================
``save(store, key)``   record the activation (a detached clone) under ``key``
``replace(value)``     the activation becomes ``value``
``overwrite(value)``   ``replace`` by a value that never reads the activation (the model
                       may skip computing it: :mod:`apexlens.model.skips`)
``replace_where(m, v)`` ``torch.where(m, v, activation)``: only where ``m`` is true
``add(delta, pos)``    ``activation + delta`` (only at sequence positions ``pos``)
``set_heads(h, v, m)`` heads ``h`` (axis 2) become ``v`` (only where ``m`` is true)
``scatter_heads(...)`` per stacked row, one head becomes a value (exact edge scores)
=====================  =================================================================

An edit is marked ``positionwise`` when what it does at a sequence position depends on that
position's activation and value only (a tensor value always; a callable one where the
caller says so): such hooks may be shown a slice of the positions, laid into a full-width
activation (:func:`apexlens.runs.suffix.run_suffix_rows`). Unmarked hooks -- ``save``, a
value computed from other hooks' records -- keep every run whole.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from apexlens.model.hooks import HookFn

Value = Tensor | Callable[[Tensor], Tensor]


def _value(value: Value, act: Tensor) -> Tensor:
    return value(act) if callable(value) else value


def _marked(hook: HookFn, value: Any, positionwise: bool | None) -> HookFn:
    """``hook`` marked ``positionwise`` (see the module docstring): as told, else whether its
    value is a tensor (a callable may read anything when the hook fires)."""
    hook.positionwise = not callable(value) if positionwise is None else positionwise  # type: ignore[attr-defined]
    return hook


def save(store: MutableMapping[str, Tensor], key: str, clone: bool = True) -> HookFn:
    """Record the activation under ``key`` (keyed by the caller's name, never ``hook.name``:
    a bridge reports aliases)."""

    def hook(act: Tensor, hook: Any) -> None:
        store[key] = act.detach().clone() if clone else act

    return hook


def replace(value: Value, positionwise: bool | None = None) -> HookFn:
    """The activation becomes ``value`` (cast to the activation's dtype)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        return _value(value, act).to(act.dtype)

    return _marked(hook, value, positionwise)


def overwrite(value: Callable[[], Tensor]) -> HookFn:
    """The activation becomes ``value()``, which does not read it: the hook is marked
    (``overwrites``: ``value``) so that a pass may take ``value()`` without computing the
    activation (:func:`apexlens.model.skips.hooked_pass`)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        return value().to(act.dtype)

    hook.overwrites = value  # type: ignore[attr-defined]
    return hook


def replace_where(
    where: Bool[Tensor, "..."] | None, value: Value, positionwise: bool | None = None
) -> HookFn:
    """``value`` where ``where`` is true (broadcast), the activation elsewhere; ``None``: all."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        v = _value(value, act).to(act.dtype)
        return v.expand_as(act).clone() if where is None else torch.where(where, v, act)

    return _marked(hook, value, positionwise)


def add(delta: Value, positions: Int[Tensor, " k"] | None = None) -> HookFn:
    """``activation + delta``; with ``positions``, only at those indices of axis 1."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        d = _value(delta, act)
        if positions is None:
            return act + d
        out = act.clone()
        out[:, positions] = out[:, positions] + d
        return out

    return _marked(hook, delta, None)


def set_heads(
    heads: Int[Tensor, " h"] | list[int],
    value: Value,
    where: Bool[Tensor, "n pos h"] | None = None,
    positionwise: bool | None = None,
) -> HookFn:
    """Heads ``heads`` of a ``[n, pos, head, d]`` activation become ``value[n, pos, h, d]``
    (only where ``where[n, pos, h]`` is true, if given)."""

    on: dict[torch.device, Tensor] = {}  # the index per device, made once

    def hook(act: Tensor, hook: Any) -> Tensor:
        v = _value(value, act).to(act.dtype)
        idx = on.get(act.device)
        if idx is None:
            idx = heads if isinstance(heads, Tensor) else torch.tensor(list(heads))
            idx = on[act.device] = idx.to(device=act.device, dtype=torch.long)
        if where is not None:
            v = torch.where(where[..., None], v, act.index_select(2, idx))
        return act.index_copy(2, idx, v)  # one copy of the activation, the heads set

    return _marked(hook, value, positionwise)


def scatter_heads(
    rows: Int[Tensor, " k"],
    heads: Int[Tensor, " k"],
    values: Tensor,
    n_rows: int,
) -> HookFn:
    """For rows stacked along the batch (``n_rows`` copies), head ``heads[i]`` of row
    ``rows[i]`` becomes ``values[i]`` (``[batch, pos, d_head]``); every other head and row
    keeps its activation. Pairs must be distinct."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        view = out.view(n_rows, act.shape[0] // n_rows, *act.shape[1:])
        view[rows, :, :, heads] = values.to(act.dtype)
        return out

    return _marked(hook, values, True)
