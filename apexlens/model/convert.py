"""HookedTransformer-format models as ``TransformerBridge``: :func:`to_bridge`.

TransformerLens 4 removed ``HookedTransformer``; ``TransformerBridge`` is its only model class
(TL 3.9 ships it too). :func:`to_bridge` builds a bridge with the *same function* as a
HookedTransformer-format model: a HookedTransformer config (a dict of
``HookedTransformerConfig`` fields) plus its state dict (``"blocks.0.attn.W_Q"`` ...), or a
live ``HookedTransformer`` under TL 3.9. It boots an empty TL-native bridge
(``TransformerBridge.boot_native``), loads the weights through an explicit key-and-shape map
(per-head ``W_Q[head, d_model, d_head]`` becomes the ``nn.Linear`` weight
``q.weight[(head d_head), d_model]``, and so on), and turns on the bridge's compatibility
mode *without* weight processing, so the HookedTransformer hook names exist and every
activation has the HookedTransformer meaning and shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from apexlens.errors import ApexlensError

__all__ = ["bridge_config", "convert_hooked_state_dict", "is_bridge", "to_bridge"]

# ---------------------------------------------------------------------------------------------
# HookedTransformer config -> TransformerBridgeConfig
# ---------------------------------------------------------------------------------------------

_NATIVE_ACT_FNS = ("gelu", "gelu_new", "relu", "silu", "swish")  # native in TL 3.9 and 4.x
_NORMALIZATIONS = (None, "LN", "LNPre", "RMS", "RMSPre")

# HookedTransformer features the TL-native bridge model does not implement, with the value
# that means "feature off". A config that turns one on is refused rather than silently
# converted into a different function.
_FEATURES_OFF: dict[str, Any] = {
    "positional_embedding_type": "standard",
    "parallel_attn_mlp": False,
    "use_local_attn": False,
    "attn_types": None,
    "scale_attn_by_inverse_layer_idx": False,
    "post_embedding_ln": False,
    "use_qk_norm": False,
    "use_normalization_before_and_after": False,
    "n_key_value_heads": None,
    "num_experts": None,
    "relative_attention_max_distance": None,
    "relative_attention_num_buckets": None,
    "use_attention_sinks": False,
    "use_logn_attn": False,
    "clip_qkv": None,
    "attention_dir": "causal",
    "use_attn_scale": True,
}


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise ApexlensError(
        "expected a HookedTransformer config as a dict or HookedTransformerConfig, got "
        f"{type(config).__name__}"
    )


def bridge_config(config: Mapping[str, Any] | Any, dtype: torch.dtype | None = None) -> Any:
    """The ``TransformerBridgeConfig`` of a TL-native bridge computing the same function.

    ``config`` holds ``HookedTransformerConfig`` fields (a dict, e.g. a saved ``config.json``,
    or the config object itself under TL 3.9). Features the native bridge model lacks
    (rotary embeddings, parallel attention/MLP, grouped-query attention, ...) raise
    :class:`~apexlens.model.backend.ApexlensError` naming the field.
    """
    from transformer_lens.config import TransformerBridgeConfig

    cfg = _config_dict(config)
    for key in ("d_model", "d_head", "n_layers", "n_ctx", "d_vocab"):
        if cfg.get(key) is None:
            raise ApexlensError(f"HookedTransformer config is missing {key!r}")
    for key, off in _FEATURES_OFF.items():
        value = cfg.get(key, off)
        if value != off and not (off is None and value in (None, 0)):
            raise ApexlensError(
                f"cannot build a TransformerBridge for this model: {key}={value!r} is not"
                f" implemented by TransformerLens' native bridge model (supported: {off!r})"
            )
    attn_only = bool(cfg.get("attn_only", False))
    act_fn = cfg.get("act_fn")
    if not attn_only and act_fn not in _native_act_fns():
        raise ApexlensError(
            f"act_fn={act_fn!r} is not implemented by this TransformerLens' native bridge model;"
            f" supported: {', '.join(_native_act_fns())}"
        )
    normalization = cfg.get("normalization_type", "LN")
    if normalization not in _NORMALIZATIONS:
        raise ApexlensError(
            f"normalization_type={normalization!r} is not supported; use one of {_NORMALIZATIONS}"
        )
    if cfg.get("gated_mlp", False) and act_fn == "solu_ln":
        raise ApexlensError("gated MLPs with act_fn='solu_ln' are not supported")
    for key in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if float(cfg.get(key, -1.0) or -1.0) > 0:
            raise ApexlensError(f"{key} is not supported by apexlens' bridge conversion")

    d_model, d_head = int(cfg["d_model"]), int(cfg["d_head"])
    n_heads = int(cfg.get("n_heads", -1) or -1)
    if n_heads <= 0:
        n_heads = d_model // d_head
    d_mlp = cfg.get("d_mlp")
    if d_mlp is None and not attn_only:
        d_mlp = 4 * d_model
    attn_scale = float(cfg.get("attn_scale", -1.0) or -1.0)
    if attn_scale > 0 and math.isclose(attn_scale, math.sqrt(d_head)):
        attn_scale = -1.0  # the bridge's sentinel for sqrt(d_head)
    d_vocab_out = int(cfg.get("d_vocab_out", -1) or -1)
    if dtype is None:
        dtype = _as_dtype(cfg.get("dtype")) or torch.float32
    return TransformerBridgeConfig(
        d_model=d_model,
        d_head=d_head,
        n_layers=int(cfg["n_layers"]),
        n_ctx=int(cfg["n_ctx"]),
        n_heads=n_heads,
        d_vocab=int(cfg["d_vocab"]),
        d_vocab_out=d_vocab_out,
        d_mlp=int(d_mlp) if d_mlp is not None else None,
        act_fn=act_fn if act_fn is not None else "relu",
        eps=float(cfg.get("eps", 1e-5)),
        normalization_type=normalization,
        attn_only=attn_only,
        gated_mlp=bool(cfg.get("gated_mlp", False)),
        final_rms=bool(cfg.get("final_rms", False)),
        use_attn_scale=True,
        attn_scale=attn_scale,
        positional_embedding_type="standard",
        tokenizer_name=cfg.get("tokenizer_name"),
        model_name=str(cfg.get("model_name", "custom")),
        architecture="TransformerLensNative",
        init_weights=False,  # every weight is overwritten by the state dict
        dtype=dtype,
    )


def _native_act_fns() -> tuple[str, ...]:
    """Activation functions the installed TL's native bridge MLP implements (4.x adds SoLU)."""
    try:
        from transformer_lens.model_bridge.sources.native import model as native
    except ImportError:  # pragma: no cover - layout of a future TL
        return _NATIVE_ACT_FNS
    table = getattr(native, "_ACTIVATIONS", None)
    return tuple(table) if isinstance(table, dict) else _NATIVE_ACT_FNS


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


# ---------------------------------------------------------------------------------------------
# HookedTransformer state dict -> bridge state dict
# ---------------------------------------------------------------------------------------------

_Convert = Callable[[Tensor, int, int], Tensor]  # (tensor, n_heads, d_head) -> tensor


def _heads_in(w: Tensor, n_heads: int, d_head: int) -> Tensor:
    """``W_Q[head, d_model, d_head]`` -> ``nn.Linear`` weight ``[(head d_head), d_model]``."""
    if w.ndim != 3 or w.shape[0] != n_heads or w.shape[2] != d_head:
        raise ApexlensError(
            f"expected [n_heads={n_heads}, d_model, d_head={d_head}], got {tuple(w.shape)}"
        )
    return w.permute(0, 2, 1).reshape(n_heads * d_head, w.shape[1])


def _heads_out(w: Tensor, n_heads: int, d_head: int) -> Tensor:
    """``W_O[head, d_head, d_model]`` -> ``nn.Linear`` weight ``[d_model, (head d_head)]``."""
    if w.ndim != 3 or w.shape[0] != n_heads or w.shape[1] != d_head:
        raise ApexlensError(
            f"expected [n_heads={n_heads}, d_head={d_head}, d_model], got {tuple(w.shape)}"
        )
    return w.reshape(n_heads * d_head, w.shape[2]).T


def _heads_bias(b: Tensor, n_heads: int, d_head: int) -> Tensor:
    if tuple(b.shape) != (n_heads, d_head):
        raise ApexlensError(f"expected [n_heads={n_heads}, d_head={d_head}], got {tuple(b.shape)}")
    return b.reshape(n_heads * d_head)


def _transpose(w: Tensor, n_heads: int, d_head: int) -> Tensor:
    return w.T


def _same(t: Tensor, n_heads: int, d_head: int) -> Tensor:
    return t


# HookedTransformer parameter-name suffix -> (bridge suffix, conversion). Most specific first.
_SUFFIX_MAP: tuple[tuple[str, str, _Convert], ...] = (
    (".attn.W_Q", ".attn.q.weight", _heads_in),
    (".attn.W_K", ".attn.k.weight", _heads_in),
    (".attn.W_V", ".attn.v.weight", _heads_in),
    (".attn.W_O", ".attn.o.weight", _heads_out),
    (".attn.b_Q", ".attn.q.bias", _heads_bias),
    (".attn.b_K", ".attn.k.bias", _heads_bias),
    (".attn.b_V", ".attn.v.bias", _heads_bias),
    (".attn.b_O", ".attn.o.bias", _same),
    (".mlp.W_in", ".mlp.in.weight", _transpose),
    (".mlp.b_in", ".mlp.in.bias", _same),
    (".mlp.W_gate", ".mlp.gate.weight", _transpose),
    (".mlp.W_out", ".mlp.out.weight", _transpose),
    (".mlp.b_out", ".mlp.out.bias", _same),
    ("unembed.W_U", "unembed.weight", _transpose),
    ("unembed.b_U", "unembed.bias", _same),
    ("embed.W_E", "embed.weight", _same),
    ("pos_embed.W_pos", "pos_embed.weight", _same),
    (".w", ".weight", _same),
    (".b", ".bias", _same),
)
_GATED_BIASES = (".mlp.in.bias", ".mlp.out.bias")
# Buffers a HookedTransformer carries that are not weights (causal mask, -inf sentinel).
_DROPPED_SUFFIXES = (".attn.mask", ".attn.IGNORE")


def convert_hooked_state_dict(
    state_dict: Mapping[str, Tensor], n_heads: int, d_head: int
) -> dict[str, Tensor]:
    """Map a HookedTransformer state dict onto the keys and shapes of a TL-native bridge.

    Attention weights are per head in a HookedTransformer (``W_Q[head, d_model, d_head]``,
    ``W_O[head, d_head, d_model]``) and flat ``nn.Linear`` weights in the bridge
    (``q.weight[(head d_head), d_model]``, ``o.weight[d_model, (head d_head)]``); MLP and
    unembedding matrices are stored transposed; norms use ``weight``/``bias`` for ``w``/``b``.
    Unknown keys raise :class:`~apexlens.model.backend.ApexlensError` (they would otherwise be a
    silently missing weight).
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        for old, new, convert in _SUFFIX_MAP:
            if key.endswith(old) and (old[0] == "." or key == old):
                try:
                    out[key[: len(key) - len(old)] + new] = convert(tensor, n_heads, d_head)
                except ApexlensError as err:
                    raise ApexlensError(f"state dict entry {key!r}: {err}") from None
                break
        else:
            raise ApexlensError(
                f"state dict entry {key!r} has no counterpart in a TL-native TransformerBridge"
            )
    return out


def to_bridge(
    source: Any,
    state_dict: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
) -> Any:
    """A ``TransformerBridge`` computing exactly what a HookedTransformer-format model computes.

    Call it as ``to_bridge(hooked_model)`` (TL 3.9) or ``to_bridge(config, state_dict)`` where
    ``config`` holds ``HookedTransformerConfig`` fields and ``state_dict`` is in
    HookedTransformer format (works without ``HookedTransformer``, e.g. under TL 4).

    The bridge is built empty with ``TransformerBridge.boot_native``, loaded strictly (every
    parameter must be set by the state dict; a missing unembedding bias is zero, as in a
    HookedTransformer), switched to compatibility mode *without* weight processing (so the
    HookedTransformer hook names exist and activations keep their meaning), and returned in
    eval mode. ``dtype`` defaults to the state dict's dtype.
    """
    if state_dict is None:
        if not (hasattr(source, "cfg") and hasattr(source, "state_dict")):
            raise ApexlensError(
                "to_bridge expects a HookedTransformer, or a config plus a state dict; got "
                f"{type(source).__name__} without a state dict"
            )
        if is_bridge(source):
            raise ApexlensError("to_bridge was given a model that is already a TransformerBridge")
        config: Any = source.cfg
        state_dict = source.state_dict()
    else:
        config = source
    sd = dict(state_dict)
    if dtype is None:
        floats = [t.dtype for t in sd.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    bcfg = bridge_config(config, dtype=dtype)
    from transformer_lens.model_bridge import TransformerBridge

    boot_native: Any = TransformerBridge.boot_native  # type: ignore[attr-defined]  # set by TL 4
    try:
        bridge = boot_native(bcfg, tokenizer=tokenizer, device=device, dtype=dtype)
    except (ValueError, NotImplementedError) as err:
        raise ApexlensError(
            f"TransformerLens cannot build a bridge for this config: {err}"
        ) from err
    converted = convert_hooked_state_dict(sd, bcfg.n_heads, bcfg.d_head)
    expected = bridge.state_dict()
    if bcfg.gated_mlp:  # the native gated MLP has no biases: only all-zero ones can go
        for key in [k for k in converted if k not in expected and k.endswith(_GATED_BIASES)]:
            if bool(converted[key].any()):
                raise ApexlensError(
                    f"gated_mlp=True with a nonzero MLP bias ({key}) is not implemented by "
                    "TransformerLens' native bridge model (its gated MLP has no biases); build the "
                    "bridge over the Hugging Face model instead"
                )
            del converted[key]
    if "unembed.bias" in expected and "unembed.bias" not in converted:
        converted["unembed.bias"] = torch.zeros_like(expected["unembed.bias"])
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ApexlensError(
            "the state dict does not match the config: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {unexpected}" if unexpected else "")
        )
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ApexlensError(
                f"state dict entry for {key!r} has shape {tuple(tensor.shape)}, the config"
                f" implies {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        bridge.load_state_dict(converted, strict=True)
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    bridge.eval()
    return bridge


def random_bridge(
    config: Mapping[str, Any], seed: int, *, dtype: torch.dtype | None = None, tokenizer: Any = None
) -> Any:
    """A TL-native ``TransformerBridge`` of ``config`` (``HookedTransformerConfig`` fields)
    with TransformerLens' own seeded random initialisation, in compatibility mode and eval
    mode: what :func:`apexlens.random_gpt2_small` returns where ``HookedTransformer`` is gone
    (TransformerLens 4). The global random state is left as it was."""
    from dataclasses import replace

    from transformer_lens.model_bridge import TransformerBridge

    bcfg = replace(bridge_config(config, dtype=dtype), init_weights=True, seed=seed)
    boot_native: Any = TransformerBridge.boot_native  # type: ignore[attr-defined]  # set by TL 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bridge = boot_native(bcfg, tokenizer=tokenizer, dtype=dtype)
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return bridge.eval()


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (any TL version)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - TL without the bridge
        return False
    return isinstance(model, TransformerBridge)


# ---------------------------------------------------------------------------------------------
# The Backend of a bridge
# ---------------------------------------------------------------------------------------------

