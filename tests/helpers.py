"""Small random models for exactness tests (float64, MLPs and LayerNorm, weights far from init).

Built from a HookedTransformer-format config and state dict (tests/backends.py), so the same
model exists as a ``HookedTransformer`` (TL 3.9) and as a ``TransformerBridge`` (TL 3.9, 4.x).
"""

from __future__ import annotations

from typing import Any

import torch

from backends import build, default_backend, random_state_dict


def random_config(
    *,
    n_layers: int = 3,
    attn_only: bool = False,
    normalization_type: str = "LN",
    d_vocab: int = 41,
    n_ctx: int = 12,
) -> dict[str, Any]:
    return dict(
        n_layers=n_layers,
        d_model=24,
        n_ctx=n_ctx,
        d_head=6,
        n_heads=4,
        d_mlp=None if attn_only else 48,
        attn_only=attn_only,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type=normalization_type,
    )


def random_model(
    seed: int = 0, *, backend: str | None = None, dtype: torch.dtype = torch.float64, **cfg_kw: Any
) -> Any:
    cfg = random_config(**cfg_kw)
    return build(cfg, random_state_dict(cfg, seed, dtype), backend or default_backend())


def random_tokens(
    model, batch: int = 3, n_pos: int = 8, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)
    corrupted[:, 0] = clean[:, 0]
    return clean, corrupted


def hook_count(model) -> int:
    """Hooks attached anywhere (a bridge lists a hook point under several alias names)."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points)
