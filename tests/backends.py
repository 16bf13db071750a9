"""Running tests against both TransformerLens model classes.

``HookedTransformer`` exists up to TL 3.9; ``TransformerBridge`` exists in TL 3.9 and 4.x.
Models here are described the HookedTransformer way -- a config dict of
``HookedTransformerConfig`` fields plus a HookedTransformer-format state dict -- which needs
no ``HookedTransformer`` class, so the same model can be built as either class
(:func:`build`) and checked against a plain-torch forward pass (:func:`reference_forward`).

* :data:`HAS_HOOKED` / :func:`model_backends`: ``["hooked", "bridge"]`` on TL 3.9,
  ``["bridge"]`` on TL 4.x.
* :func:`default_backend`: the class the rest of the suite builds its models as:
  ``$APEXLENS_TEST_BACKEND`` if set (``hooked`` or ``bridge``), else ``hooked`` where it
  exists, else ``bridge``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformer_lens import HookedTransformer as _HookedTransformer  # noqa: F401

    HAS_HOOKED = True
except ImportError:  # TransformerLens 4.x
    HAS_HOOKED = False

BACKENDS = ("hooked", "bridge")


def model_backends() -> list[str]:
    """The model classes this TransformerLens has."""
    return ["hooked", "bridge"] if HAS_HOOKED else ["bridge"]


def default_backend() -> str:
    choice = os.environ.get("APEXLENS_TEST_BACKEND", "").strip().lower()
    if choice:
        if choice not in BACKENDS:
            raise ValueError(f"APEXLENS_TEST_BACKEND must be one of {BACKENDS}, got {choice!r}")
        if choice == "hooked" and not HAS_HOOKED:
            raise ValueError(
                "APEXLENS_TEST_BACKEND=hooked, but this TransformerLens has no HookedTransformer"
            )
        return choice
    return "hooked" if HAS_HOOKED else "bridge"


def hooked_param_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """``HookedTransformer.named_parameters()`` names and shapes, in the same order."""
    d_model, d_head, n_heads = cfg["d_model"], cfg["d_head"], cfg["n_heads"]
    d_vocab, n_ctx = cfg["d_vocab"], cfg["n_ctx"]
    d_vocab_out = cfg.get("d_vocab_out", -1)
    d_vocab_out = d_vocab if d_vocab_out in (None, -1) else d_vocab_out
    attn_only = cfg.get("attn_only", False)
    d_mlp = cfg.get("d_mlp") or 4 * d_model
    norm = cfg.get("normalization_type", "LN")

    def norm_params(prefix: str, size: int = d_model) -> list[tuple[str, tuple[int, ...]]]:
        if norm == "LN":
            return [(f"{prefix}.w", (size,)), (f"{prefix}.b", (size,))]
        if norm == "RMS":
            return [(f"{prefix}.w", (size,))]
        return []

    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embed.W_E", (d_vocab, d_model)),
        ("pos_embed.W_pos", (n_ctx, d_model)),
    ]
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}"
        shapes += norm_params(f"{p}.ln1")
        if not attn_only:
            shapes += norm_params(f"{p}.ln2")
        shapes += [
            (f"{p}.attn.W_Q", (n_heads, d_model, d_head)),
            (f"{p}.attn.W_O", (n_heads, d_head, d_model)),
            (f"{p}.attn.b_Q", (n_heads, d_head)),
            (f"{p}.attn.b_O", (d_model,)),
            (f"{p}.attn.W_K", (n_heads, d_model, d_head)),
            (f"{p}.attn.W_V", (n_heads, d_model, d_head)),
            (f"{p}.attn.b_K", (n_heads, d_head)),
            (f"{p}.attn.b_V", (n_heads, d_head)),
        ]
        if not attn_only:
            shapes += [
                (f"{p}.mlp.W_in", (d_model, d_mlp)),
                (f"{p}.mlp.b_in", (d_mlp,)),
                (f"{p}.mlp.W_out", (d_mlp, d_model)),
                (f"{p}.mlp.b_out", (d_model,)),
            ]
    shapes += norm_params("ln_final")
    shapes += [("unembed.W_U", (d_model, d_vocab_out)), ("unembed.b_U", (d_vocab_out,))]
    return shapes


def random_state_dict(
    cfg: dict[str, Any], seed: int, dtype: torch.dtype = torch.float64
) -> dict[str, Tensor]:
    """Weights far from initialisation: norm gains ``1 + 0.2 N(0,1)``, the rest ``0.4 N(0,1)``.

    Drawn from one seeded generator in ``named_parameters`` order, so the same seed gives
    the same weights as filling a ``HookedTransformer``'s parameters in place.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for name, shape in hooked_param_shapes(cfg):
        if name.endswith(".w"):
            sd[name] = 1 + 0.2 * torch.randn(shape, generator=g, dtype=dtype)
        else:
            sd[name] = 0.4 * torch.randn(shape, generator=g, dtype=dtype)
    return sd


def build(cfg: dict[str, Any], state_dict: dict[str, Tensor], backend: str) -> Any:
    """The model ``cfg`` + ``state_dict`` as a ``HookedTransformer`` or a ``TransformerBridge``,
    in eval mode, in the state dict's dtype."""
    dtype = next(iter(state_dict.values())).dtype
    if backend == "bridge":
        from apexlens.model.convert import to_bridge

        return to_bridge(cfg, state_dict, dtype=dtype)
    if backend != "hooked":
        raise ValueError(f"unknown backend {backend!r}")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**{**cfg, "dtype": dtype, "device": "cpu"}))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith((".mask", ".IGNORE")) for k in missing), (
        missing,
        unexpected,
    )
    model.eval()
    return model


# ------------------------------------------------------------------ plain-torch reference
def _norm(x: Tensor, sd: dict[str, Tensor], prefix: str, kind: str | None, eps: float) -> Tensor:
    if kind is None:
        return x
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if kind in ("LN", "RMS"):
        x = x * sd[f"{prefix}.w"]
    if kind == "LN":
        x = x + sd[f"{prefix}.b"]
    return x


_ACT = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def reference_forward(cfg: dict[str, Any], sd: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """Logits of the HookedTransformer-format model, written out from the equations:
    pre-norm blocks, causal softmax attention scaled by ``1/sqrt(d_head)``, MLP ``act``."""
    kind, eps = cfg.get("normalization_type", "LN"), cfg.get("eps", 1e-5)
    n_pos = tokens.shape[1]
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:n_pos]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}"
        h = _norm(x, sd, f"{p}.ln1", kind, eps)
        q = torch.einsum("bpm,hmd->bphd", h, sd[f"{p}.attn.W_Q"]) + sd[f"{p}.attn.b_Q"]
        k = torch.einsum("bpm,hmd->bphd", h, sd[f"{p}.attn.W_K"]) + sd[f"{p}.attn.b_K"]
        v = torch.einsum("bpm,hmd->bphd", h, sd[f"{p}.attn.W_V"]) + sd[f"{p}.attn.b_V"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg["d_head"])
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        x = x + torch.einsum("bqhd,hdm->bqm", z, sd[f"{p}.attn.W_O"]) + sd[f"{p}.attn.b_O"]
        if not cfg.get("attn_only", False):
            h = _norm(x, sd, f"{p}.ln2", kind, eps)
            pre = h @ sd[f"{p}.mlp.W_in"] + sd[f"{p}.mlp.b_in"]
            x = x + _ACT[cfg["act_fn"]](pre) @ sd[f"{p}.mlp.W_out"] + sd[f"{p}.mlp.b_out"]
    x = _norm(x, sd, "ln_final", kind, eps)
    return x @ sd["unembed.W_U"] + sd["unembed.b_U"]
