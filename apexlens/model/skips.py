"""Projections a pass does not need: q/k/v values that a hook replaces without reading them.

A circuit pass (:mod:`apexlens.engines.circuits.plan`) recomputes every q/k/v slot of a
receiver channel from its own inputs and replaces the model's value at ``hook_q/k/v``
without reading it (:func:`apexlens.model.edits.overwrite`). The model would compute that
value first -- on a toy model, six of the few dozen operations a layer dispatches. Where a
``HookedTransformer``'s attention computes q/k/v by TransformerLens' plain path (no split
q/k/v input, no 4-bit weights, ``Attention``'s own ``calculate_qkv_matrices``) and nothing
else watches the hook point (no hook of the user's, no global module hook),
:func:`hooked_pass` makes the attention take the hook's value directly, for the duration of
one pass, and does not attach that hook: the numbers are the same (the hook never reads the
model's value), neither the product nor the hook point runs. Anything else -- another hook
at the point (the user's), a grouped-query or split-input attention, a bridge -- runs the
model's own path unchanged, with the hook attached.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from apexlens.model.hooks import Hooks, attached, global_hooks, model_lock

_QKV = re.compile(r"blocks\.(\d+)\.attn\.hook_([qkv])$")
_ATTR = "calculate_qkv_matrices"


def _plain_qkv(attn: Any) -> Any:
    """TransformerLens' ``simple_attn_linear`` where ``attn`` computes q/k/v by the plain
    path of ``AbstractAttention.calculate_qkv_matrices``; else ``None``."""
    try:
        from transformer_lens.components.abstract_attention import AbstractAttention
        from transformer_lens.utilities.attention import simple_attn_linear
    except ImportError:  # pragma: no cover - TransformerLens 4.x has no HookedTransformer
        return None
    cfg = attn.cfg
    if (
        getattr(type(attn), _ATTR, None) is not getattr(AbstractAttention, _ATTR, None)
        or _ATTR in attn.__dict__
        or getattr(cfg, "use_split_qkv_input", False)
        or getattr(cfg, "use_attn_in", False)
        or getattr(cfg, "load_in_4bit", False)
    ):
        return None
    return simple_attn_linear


def _skipping(attn: Any, skip: dict[str, Callable[[], Tensor]], linear: Any) -> Any:
    """``attn.calculate_qkv_matrices`` with the channels ``skip`` not projected: each is its
    one hook's value (``skip[ch]()``, what the hook would return; the hook point, which holds
    nothing else, is not called)."""

    def calculate_qkv_matrices(q_in: Tensor, k_in: Tensor, v_in: Tensor) -> Any:
        out = []
        for ch, x in (("q", q_in), ("k", k_in), ("v", v_in)):
            value = skip.get(ch)
            if value is not None:
                out.append(value().to(x.dtype))
                continue
            W, b = getattr(attn, f"W_{ch.upper()}"), getattr(attn, f"b_{ch.upper()}")
            out.append(getattr(attn, f"hook_{ch}")(linear(x, W, b)))
        q, k, v = out
        if getattr(attn.cfg, "use_qk_norm", False):  # as TransformerLens: after the hooks
            q = attn._apply_qk_norm(q, attn.q_norm)
            k = attn._apply_qk_norm(k, attn.k_norm)
        return q, k, v

    return calculate_qkv_matrices


def _empty(hp: Any) -> bool:
    """Whether nothing would see a call of the hook point: no hook of any kind on it,
    registered through TransformerLens or directly on the module, and no global module
    hooks."""
    return (
        not hp.fwd_hooks
        and not hp._forward_hooks
        and not hp.bwd_hooks
        and not hp._backward_hooks
        and not hp._forward_pre_hooks
        and not global_hooks()
    )


@contextmanager
def hooked_pass(model: Any, hooks: Hooks) -> Iterator[None]:
    """For the with-block: ``hooks`` attached (:func:`~apexlens.model.hooks.attached`, under
    the model's lock), except the q/k/v values that one
    :func:`~apexlens.model.edits.overwrite` hook replaces at a point nothing else watches:
    the attention takes those values directly, its projection and the hook point are not
    run, and the hook is not attached (module docstring). The attention modules are
    restored on exit, also after an exception."""
    hooks = list(hooks)
    hook_dict = getattr(model, "hook_dict", {})
    marked: dict[tuple[int, str], list[int]] = {}
    for i, (name, _) in enumerate(hooks):
        m = _QKV.match(name)
        if m is not None and name in hook_dict:
            marked.setdefault((int(m.group(1)), m.group(2)), []).append(i)
    with model_lock(model):
        by_layer: dict[int, dict[str, Callable[[], Tensor]]] = {}
        linear: dict[int, Any] = {}  # per layer: the plain path's product, None where none
        taken: set[int] = set()
        for (layer, ch), at in marked.items():
            value = getattr(hooks[at[0]][1], "overwrites", None)
            if len(at) != 1 or value is None or not _empty(hook_dict[hooks[at[0]][0]]):
                continue
            if layer not in linear:
                linear[layer] = _plain_qkv(model.blocks[layer].attn)
            if linear[layer] is not None:  # else the model's own path runs, the hook attached
                by_layer.setdefault(layer, {})[ch] = value
                taken.add(at[0])
        patched: list[Any] = []
        try:
            for layer, skip in by_layer.items():
                attn = model.blocks[layer].attn
                setattr(attn, _ATTR, _skipping(attn, skip, linear[layer]))
                patched.append(attn)
            with attached(model, [h for i, h in enumerate(hooks) if i not in taken]):
                yield
        finally:
            for attn in patched:
                attn.__dict__.pop(_ATTR, None)
