"""Models from a config and weights, from TransformerLens' hub loaders, or random: the one
place that constructs model classes.

* :func:`hooked_from_state` -- a ``HookedTransformer`` of a config dict and a state dict (the
  shipped toy models; :func:`apexlens.model.convert.to_bridge` builds their bridges);
* :func:`pretrained` -- TransformerLens' own loaders (``from_pretrained`` /
  ``boot_transformers``), errors turned into one line;
* :func:`official_model_name` -- TransformerLens' name for a pretrained model or alias;
* :func:`random_gpt2_small` -- GPT-2 small's shape with seeded random weights;
* :func:`ungrouped_copy` -- a grouped-query model with one key/value head per query head.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from apexlens.errors import ApexlensError

NO_HOOKED = "this TransformerLens has no HookedTransformer (removed in 4.0): use backend='bridge'"


def has_hooked() -> bool:
    """Whether TransformerLens has ``HookedTransformer`` (<= 3.9)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def hooked_from_state(cfg: dict[str, Any], state: dict[str, Tensor]) -> Any:
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:  # TransformerLens 4.x
        raise ApexlensError(NO_HOOKED) from None
    dtype = next(iter(state.values())).dtype
    model = HookedTransformer(HookedTransformerConfig(**cfg, dtype=dtype, device="cpu"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith((".mask", ".IGNORE")) for k in missing):
        raise ApexlensError(
            f"weights do not fit the config: missing {missing}, unexpected {unexpected}"
        )
    return model


def pretrained(
    name: str,
    backend: str,
    device: Any,
    dtype: torch.dtype | None,
    toys: list[str],
    **kwargs: Any,
) -> Any:
    """A pretrained model by TransformerLens' loaders (``toys``: named in the error)."""
    model: Any
    try:
        if backend == "bridge":
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(name, **kwargs)
        else:
            try:
                from transformer_lens import HookedTransformer
            except ImportError:
                raise ApexlensError(NO_HOOKED) from None
            extra: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
            model = HookedTransformer.from_pretrained(name, device=device, **extra, **kwargs)
    except ApexlensError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, AttributeError) as e:
        # hub unreachable, unknown name, a missing file: one line naming it
        raise ApexlensError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}). If the hub is unreachable, "
            f"use a shipped toy model: {', '.join(toys)}"
        ) from e
    model.eval()
    return model


def random_gpt2_small(
    seed: int = 0,
    *,
    n_ctx: int = 1024,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A random-init model of GPT-2 small's shape (12 layers, d_model 768, 12 heads, d_mlp
    3072, vocab 50257, LayerNorm, gelu_new), seeded: for cost and shape checks. A
    ``HookedTransformer`` where TransformerLens has it (<= 3.9), else a TL-native
    ``TransformerBridge`` (its own seeded initialisation: other random weights)."""
    shape: dict[str, Any] = dict(
        n_layers=12, d_model=768, n_ctx=n_ctx, d_head=64, n_heads=12, d_mlp=3072,
        d_vocab=50257, act_fn="gelu_new", normalization_type="LN",
    )
    if not has_hooked():  # TransformerLens 4.x
        from apexlens.model.convert import random_bridge

        return random_bridge(shape, seed, dtype=dtype or torch.float32, tokenizer=tokenizer)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **shape, seed=seed, dtype=dtype or torch.float32, device="cpu"
    )
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def official_model_name(name: str) -> str | None:
    """TransformerLens' official name for ``name`` (a name or an alias from its list of
    supported pretrained models), or ``None`` when it is not in the list."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:  # TransformerLens 4.x
        from transformer_lens.supported_models import (  # type: ignore[attr-defined,no-redef]
            get_official_model_name,
        )
    try:
        return str(get_official_model_name(name))
    except (ValueError, KeyError):
        return None


def new_hooked(cfg: dict[str, Any], seed: int) -> Any:
    """A freshly initialised ``HookedTransformer`` (seeded), for training a toy model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    return HookedTransformer(HookedTransformerConfig(**cfg, seed=seed, device="cpu"))


def ungrouped_copy(model: Any) -> Any:
    """A deep copy of a grouped-query ``HookedTransformer`` with one key/value slot per query
    head (TransformerLens' own ``ungroup_grouped_query_attention``): the same function, and
    ``hook_k``/``hook_v`` indexed by query head. The model handed in is not touched."""
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise ApexlensError(
            "the reference loop needs an ungrouped copy of a grouped-query TransformerBridge: "
            "pass ungrouped=<the same model with one key/value head per query head>"
        )
    cfg = copy.deepcopy(model.cfg)
    cfg.ungroup_grouped_query_attention = True
    twin = HookedTransformer(cfg, tokenizer=model.tokenizer)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.to(model.W_U.device).eval()
