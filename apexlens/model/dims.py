"""The model's shape and the options apexlens cannot compute exactly (refused by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apexlens.errors import ApexlensError


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    has_mlps: bool
    n_kv_heads: int = -1
    """Key/value slots of ``hook_k``/``hook_v`` per layer (``n_heads`` unless grouped-query)."""
    parallel: bool = False
    """Parallel attention and MLP: MLP L reads the residual stream entering block L."""
    d_mlp: int = 0
    """Hidden width of an MLP (``4 d_model`` where the config gives none)."""
    d_vocab_in: int = 0
    """Token ids the model reads (``d_vocab``; :attr:`d_vocab` is the logits' width)."""

    @property
    def group(self) -> int:
        """Query heads per key/value slot (1 without grouped-query attention)."""
        return self.n_heads // self.kv_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads > 0 else self.n_heads



def dims_of(cfg: Any) -> Dims:
    """The :class:`Dims` of a TransformerLens config (HookedTransformer or bridge)."""
    refuse_unsupported(cfg)
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        n_kv = n_heads
    if n_heads % n_kv:
        raise ApexlensError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return Dims(
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        d_vocab=int(cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        has_mlps=not bool(getattr(cfg, "attn_only", False)),
        n_kv_heads=n_kv,
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        d_mlp=int(getattr(cfg, "d_mlp", None) or 4 * int(cfg.d_model)),
        d_vocab_in=int(cfg.d_vocab),
    )


def _post_norm_architectures() -> tuple[str, ...]:
    try:
        from transformer_lens.components.transformer_block import (  # type: ignore[attr-defined]
            POST_NORM_ARCHITECTURES,
        )
    except ImportError:  # TL 4.x has no HookedTransformer components
        return ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
    return tuple(POST_NORM_ARCHITECTURES)


def refuse_unsupported(cfg: Any) -> None:
    """One :class:`ApexlensError` naming a config option apexlens cannot handle exactly."""
    arch = getattr(cfg, "original_architecture", None)
    if arch is not None and str(arch) in _post_norm_architectures():
        raise ApexlensError(
            f"OLMo-2-style post-norm models ({arch}) are not supported: their norms sit after "
            "attention and the MLP, and their q/k norms mix heads, so a single head's q/k "
            "input is not defined"
        )

