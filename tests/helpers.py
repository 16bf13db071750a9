"""Small random models for exactness tests (float64, MLPs and LayerNorm, weights far from init)."""

from __future__ import annotations

import torch


def random_model(
    seed: int = 0,
    *,
    n_layers: int = 3,
    attn_only: bool = False,
    normalization_type: str = "LN",
    dtype: torch.dtype = torch.float64,
    d_vocab: int = 41,
    n_ctx: int = 12,
):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
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
        seed=seed,
        dtype=dtype,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # LayerNorm gains
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    return model


def random_tokens(
    model, batch: int = 3, n_pos: int = 8, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=g)
    corrupted[:, 0] = clean[:, 0]
    return clean, corrupted


def hook_count(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
