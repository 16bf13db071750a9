"""Norms and MLP activations, computed as the model computes them: one home for both model
classes.

TransformerLens' ``LayerNorm`` / ``RMSNorm`` (and their ``Pre`` forms) are unfused Python
code; in float32/float64 the same function is torch's fused kernel, which is what apexlens
runs (:func:`fused_norm`), in place where it can (:func:`inplace_norm`: a fresh output of
hundreds of MB costs a CPU more in page faults than the norm). TL's plain MLP with a
pointwise activation is computed with torch's fused activation (:func:`fused_activation`;
TL's ``gelu_new`` makes five passes over the hidden layer). Any other module is called as it
is, with its hook points silenced (:func:`apply_norm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from apexlens.model.hooks import silenced

Fn = Callable[[Tensor], Tensor]


def _is_tl(module: Any) -> bool:
    return type(module).__module__.split(".")[0] == "transformer_lens"


def apply_norm(module: Any, x: Tensor) -> Tensor:
    """``module(x)`` with the module's hook points silenced (identity if there is none);
    TransformerLens' norms in float32/float64 through :func:`fused_norm`."""
    if module is None:
        return x
    fused = fused_norm(module)
    if fused is not None:
        return fused(x)
    with silenced(module):
        return module(x)


def fused_norm(module: Any) -> Fn | None:
    """TransformerLens' LayerNorm / RMSNorm (and ``Pre`` forms) in float32/float64 as one fused,
    differentiable function of the input; ``None`` for any other module."""
    kind = type(module).__name__
    if not _is_tl(module):
        return None
    cfg = getattr(module, "cfg", None)
    if getattr(cfg, "dtype", None) not in (torch.float32, torch.float64):
        return None
    eps = float(getattr(module, "eps", 1e-5))
    if kind == "LayerNorm":
        return lambda x: F.layer_norm(x, (x.shape[-1],), module.w, module.b, eps)
    if kind == "LayerNormPre":
        return lambda x: F.layer_norm(x, (x.shape[-1],), None, None, eps)
    if kind == "RMSNorm":
        return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * module.w
    if kind == "RMSNormPre":
        return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return None


def inplace_norm(module: Any) -> Fn | None:
    """The norm of :func:`fused_norm` computed in its input's memory (the input is
    overwritten and returned); ``None`` where there is no fused norm. Two passes (mean, then
    the scale of the centred values), as the fused kernel computes it."""
    if fused_norm(module) is None:
        return None
    kind = type(module).__name__
    eps = float(getattr(module, "eps", 1e-5))
    w: Any = getattr(module, "w", None)
    b: Any = getattr(module, "b", None)

    def norm(x: Tensor) -> Tensor:
        if kind.startswith("LayerNorm"):
            x.sub_(x.mean(-1, keepdim=True))
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        x.mul_(ms.add_(eps).rsqrt_())
        if kind in ("LayerNorm", "RMSNorm"):
            x.mul_(w)
        if kind == "LayerNorm":
            x.add_(b)
        return x

    return norm


def normalizer(module: Any) -> Fn | None:
    """The norm *before* its own weight and bias (``hook_normalized``'s value as a function
    of the input), for TransformerLens' norms in float32/float64; ``None`` otherwise."""
    if module is None or fused_norm(module) is None or not hasattr(module, "hook_normalized"):
        return None
    kind = type(module).__name__
    eps = float(getattr(module, "eps", 1e-5))
    if kind in ("LayerNorm", "LayerNormPre"):
        return lambda x: F.layer_norm(x, (x.shape[-1],), None, None, eps)
    if kind in ("RMSNorm", "RMSNormPre"):
        return lambda x: x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return None


_FUSED = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def fused_activation(module: Any, cfg: Any) -> Fn | None:
    """The fused activation of a plain TransformerLens ``MLP`` (None for anything else)."""
    if type(module).__name__ != "MLP" or not _is_tl(module):
        return None
    if getattr(cfg, "gated_mlp", False) or not hasattr(module, "W_in"):
        return None
    return _FUSED.get(str(getattr(cfg, "act_fn", "")))
