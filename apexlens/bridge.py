"""TransformerLens 4.x support: toy models as ``TransformerBridge`` and the bridge's Backend.

TransformerLens 4 removed ``HookedTransformer``; ``TransformerBridge`` is its only model class
(TL 3.9 ships it too). apexlens talks to a model only through :class:`~apexlens.backend.Backend`,
so supporting the bridge means two things, both in this module:

1. :func:`to_bridge` builds a bridge with the *same function* as a HookedTransformer-format
   model: a HookedTransformer config (a dict of ``HookedTransformerConfig`` fields) plus its
   state dict (``"blocks.0.attn.W_Q"`` ...), or a live ``HookedTransformer`` under TL 3.9.
   It boots an empty TL-native bridge (``TransformerBridge.boot_native``), loads the weights
   through an explicit key-and-shape map (per-head ``W_Q[head, d_model, d_head]`` becomes the
   ``nn.Linear`` weight ``q.weight[(head d_head), d_model]``, and so on), and turns on the
   bridge's compatibility mode *without* weight processing, so the HookedTransformer hook
   names exist and every activation has the HookedTransformer meaning and shape.

2. :class:`BridgeBackend` -- the :class:`~apexlens.backend.Backend` for a bridge. What differs
   from ``HookedTransformer`` (all measured on TL 3.9.0 and 4.3.0):

   * ``forward(start_at_layer=...)`` raises ``NotImplementedError`` on TL 3.9; on TL 4.3 it
     runs blocks ``0..start-1`` anyway (their hooks fire on meaningless values) and
     ``stop_at_layer=n_layers`` returns logits instead of the residual stream. So
     :meth:`BridgeBackend.run_layers` calls the blocks itself.
   * Hook points are *aliases*: ``blocks.L.hook_resid_pre`` is ``blocks.L.hook_in`` and a hook
     added under the alias sees ``hook.name == "blocks.L.hook_in"``. So caches are keyed by the
     name the caller asked for, never by ``hook.name``.
   * ``blocks.L.hook_mlp_out`` is the MLP module's own output hook, and the norms carry
     ``hook_in``/``hook_out``: calling a sub-module directly fires the user's hooks. The forward
     pieces here (``ln1``, ``mlp``, ``unembed`` ...) run with every hook point of the sub-module
     silenced, so they are pure functions of their input, as the engines assume.
   * ``blocks.L.hook_resid_mid`` is ``ln2.hook_in``: reading it is exact, but an *edit* there
     changes only the MLP's input, not the residual stream that skips past the MLP (in a
     HookedTransformer it changes both). Patch ``hook_attn_out`` instead.
   * a bridge comes back from ``boot_native`` in training mode; every method here runs in eval
     mode without gradients and restores the caller's training flag.

   The bridge's config flags ``use_attn_result``, ``use_split_qkv_input`` and ``use_attn_in``
   raise ``NotImplementedError`` on a ``boot_native`` bridge, so nothing here uses them: a
   head's output is ``z @ W_O`` and a receiver's input is set at ``hook_q/k/v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.backend import Backend, register_adapter
from apexlens.errors import ApexlensError
from apexlens.hooks import HookFn, attached, inference_mode, model_lock, silenced

__all__ = [
    "BridgeBackend",
    "bridge_config",
    "convert_hooked_state_dict",
    "is_bridge",
    "to_bridge",
]

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
    :class:`~apexlens.backend.ApexlensError` naming the field.
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
    Unknown keys raise :class:`~apexlens.backend.ApexlensError` (they would otherwise be a
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


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """:func:`apexlens.hooks.inference_mode`, skipped when nothing is in training mode.

    ``bridge.eval()``/``train()`` walk ~1000 module visits on a 3-layer bridge (milliseconds);
    when no module is training both are no-ops, so only gradients need switching off.
    """
    if any(m.training for m in model.modules()):
        with inference_mode(model):
            yield
    else:
        with model_lock(model), torch.no_grad():
            yield


class BridgeBackend(Backend):
    """:class:`~apexlens.backend.Backend` for a ``TransformerBridge``, with or without
    compatibility mode.

    Same method names and meanings as for a ``HookedTransformer``; see the module docstring
    (longer than most classes on purpose: every forward piece the engines use needs its
    bridge form, each a short method)
    for what it does differently underneath and why. A bridge over a Hugging Face model
    (GPT-2, GPT-NeoX, Llama, Qwen2, Gemma-2, ...) exposes the HookedTransformer hook names
    without compatibility mode, its HF weights per head (``W_K``/``W_V`` per key/value
    head), and no bias where the model has none (zeros here).
    """

    # ------------------------------------------------------------------ architecture
    @property
    def post_norms(self) -> bool:
        return hasattr(self.model.blocks[0], "ln1_post") or super().post_norms

    # ------------------------------------------------------------------ weights
    # The bridge assembles these from its modules on each access; detach so a no-grad caller
    # never holds an autograd graph over the model's parameters.
    def _weight(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        try:
            w = getattr(self.model, name)
        except (AttributeError, TypeError, RuntimeError):
            w = None
        if w is None:
            if shape is None:
                raise ApexlensError(f"this TransformerBridge exposes no {name}")
            return torch.zeros(shape, dtype=self.W_U.dtype, device=self.W_U.device)
        return w.detach()

    def _layers(self, name: str) -> list[Tensor]:
        return list(getattr(self, name).unbind(0))  # the bridge assembles its stacks

    def _bias_shape(self, slots: int) -> tuple[int, ...]:
        return (self.dims.n_layers, slots, self.dims.d_head)

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._weight("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "layer kv d_model d_head"]:
        return self._weight("W_K")

    @property
    def W_V(self) -> Float[Tensor, "layer kv d_model d_head"]:
        return self._weight("W_V")

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._weight("W_O")

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._weight("b_Q", self._bias_shape(self.dims.n_heads))

    @property
    def b_K(self) -> Float[Tensor, "layer kv d_head"]:
        return self._weight("b_K", self._bias_shape(self.dims.kv_heads))

    @property
    def b_V(self) -> Float[Tensor, "layer kv d_head"]:
        return self._weight("b_V", self._bias_shape(self.dims.kv_heads))

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._weight("b_O", (self.dims.n_layers, self.dims.d_model))

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U.detach()

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        try:
            b = self.model.b_U
        except (AttributeError, TypeError, RuntimeError):
            b = None
        W_U = self.W_U
        return torch.zeros(W_U.shape[-1], dtype=W_U.dtype, device=W_U.device) if b is None else b.detach()

    # ------------------------------------------------------------------ forward pieces
    def _call(self, module: Any, x: Tensor) -> Tensor:
        if module is None:
            return x
        with _inference(self.model), silenced(module):
            return module(x)

    def _norm(self, module: Any, x: Tensor) -> Tensor:
        return self._call(module, x)

    def _norm_(self, module: Any, x: Tensor) -> Tensor:
        return self._call(module, x)

    def mlp_input_edit(self, layer: int) -> tuple[str, Callable[[Tensor], Tensor]] | None:
        return None  # the MLP's output is recomputed from its input (see Backend)

    def ln1_post(self, layer: int, x: Tensor) -> Tensor:
        return self._call(getattr(self.model.blocks[layer], "ln1_post", None), x)

    def ln2_post(self, layer: int, x: Tensor) -> Tensor:
        return self._call(getattr(self.model.blocks[layer], "ln2_post", None), x)

    def ln_final(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self._call(getattr(self.model, "ln_final", None), x)

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """MLP ``layer`` applied to an already-normalised input, position by position."""
        if not self.dims.has_mlps:
            raise ApexlensError(f"the model is attention-only: block {layer} has no MLP")
        shape = x.shape
        out = self._call(self.model.blocks[layer].mlp, x.reshape(1, -1, shape[-1]))
        return out.reshape(shape)

    def unembed(
        self, resid_final: Float[Tensor, "... d_model"], tokens: Int[Tensor, " n_tok"] | None = None
    ) -> Float[Tensor, "... n_tok"]:
        """Logits (all of the vocabulary, or only the columns ``tokens``) of a final residual."""
        x = self.ln_final(resid_final)
        if tokens is None:
            return self._cap(self._call(self.model.unembed, x))
        return self._cap(x @ self.W_U[:, tokens] + self.b_U[tokens])

    def run_layers(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int,
        stop: int | None = None,
        fwd_hooks: Iterable[tuple[str, HookFn]] = (),
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run blocks ``start..stop-1`` on the residual stream entering block ``start``.

        The blocks are called one after the other (the bridge's own ``start_at_layer`` would
        also run, and fire the hooks of, blocks ``0..start-1``), each with the extra inputs
        the model's own forward hands it (attention mask, rotary embeddings, ...; see
        :meth:`_block_inputs`). Hooks of blocks outside ``start..stop-1`` do not fire.
        """
        stop = self.dims.n_layers if stop is None else stop
        if not 0 <= start <= self.dims.n_layers or not 0 <= stop <= self.dims.n_layers:
            raise ApexlensError(
                f"run_layers(start={start}, stop={stop}) outside 0..{self.dims.n_layers}"
            )
        if start >= stop:
            return resid
        return self._run_blocks(resid, start, stop, list(fwd_hooks))

    def _run_blocks(
        self, resid: Tensor, start: int, stop: int, hooks: list[tuple[str, HookFn]]
    ) -> Tensor:
        inputs = self._block_inputs(resid.shape[1])
        n = resid.shape[0]
        with _inference(self.model), attached(self.model, _named_hooks(hooks)):
            for layer in range(start, stop):
                args, kwargs = inputs[layer]
                out = self.model.blocks[layer](
                    resid, *(_for_rows(a, n) for a in args), **{k: _for_rows(v, n) for k, v in kwargs.items()}
                )
                resid = out[0] if isinstance(out, tuple) else out
        return resid

    def _block_inputs(self, n_pos: int) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
        """What the model's own forward hands every block besides the residual stream, for
        sequences of ``n_pos`` tokens, recorded once (a silent forward pass of two identical
        rows, every hook point switched off). Key/value caches are dropped; tensors with a
        batch axis are later expanded to the rows being run (:func:`_for_rows`)."""
        memo = self.__dict__.setdefault("_inputs", {})
        if n_pos in memo:
            return memo[n_pos]
        record: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def grab(layer: int) -> Any:
            def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                record.setdefault(layer, (tuple(args[1:]), dict(kwargs)))

            return pre

        tok = getattr(getattr(self.model, "tokenizer", None), "pad_token_id", None)
        fill = 1 if tok is None else (int(tok) + 1) % int(self.model.cfg.d_vocab)
        tokens = torch.full((2, n_pos), fill, dtype=torch.long, device=self.device)
        handles = [
            block.register_forward_pre_hook(grab(i), with_kwargs=True)
            for i, block in enumerate(self.model.blocks)
        ]
        try:
            with _inference(self.model), silenced(self.model):
                self.model(tokens)
        finally:
            for h in handles:
                h.remove()
        memo[n_pos] = {la: (_strip(a), _strip(k)) for la, (a, k) in record.items()}
        return memo[n_pos]

    def _forward(
        self, tokens: Int[Tensor, "batch pos"], hooks: list[tuple[str, HookFn]], logits: bool
    ) -> Tensor:
        """One whole forward pass under ``hooks``. For the final residual stream the pass
        stops where ``ln_final`` would start (the bridge's ``stop_at_layer`` cannot do this:
        on TL 4.3 ``stop_at_layer=n_layers`` returns logits)."""
        final: list[Tensor] = []
        if not logits:

            def stop(act: Tensor, hook: Any) -> None:
                final.append(act)
                raise _ReachedFinalResidual

            hooks = [*hooks, ("ln_final.hook_in", stop)]
        with _inference(self.model), attached(self.model, _named_hooks(hooks)):
            try:
                return self.model(tokens)
            except _ReachedFinalResidual:
                return final[0]


def _strip(value: Any) -> Any:
    """A recorded block input without key/value caches (they would grow on every call)."""
    if isinstance(value, dict):
        return {k: (False if k == "use_cache" else _strip(v)) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_strip(v) for v in value)
    if "Cache" in type(value).__name__:
        return None
    return value


def _for_rows(value: Any, n: int) -> Any:
    """A recorded block input (from a batch of two identical rows) for a batch of ``n``."""
    if isinstance(value, Tensor):
        if value.ndim >= 2 and value.shape[0] == 2:
            return value[:1].expand(n, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_for_rows(v, n) for v in value)
    return value


class _ReachedFinalResidual(Exception):
    """Raised by a hook to end a forward pass once the final residual stream is known."""


class _NamedHookPoint:
    """A hook point seen under the name its hook was attached with.

    A bridge's hook-point aliases report their canonical name (a hook attached at
    ``blocks.0.hook_resid_pre`` is called with ``hook.name == "blocks.0.hook_in"``). Hooks
    attached through :class:`BridgeBackend` see the name they were attached with, as on a
    HookedTransformer; every other attribute is the hook point's own.
    """

    def __init__(self, name: str, point: Any) -> None:
        self.name = name
        self._point = point

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._point, attr)


def _named_hooks(fwd_hooks: Iterable[tuple[str, HookFn]]) -> list[tuple[str, HookFn]]:
    def named(name: str, fn: HookFn) -> HookFn:
        def hook(act: Tensor, hook: Any) -> Any:
            if getattr(hook, "name", name) != name:
                hook = _NamedHookPoint(name, hook)
            return fn(act, hook=hook)

        return hook

    return [(name, named(name, fn)) for name, fn in fwd_hooks]


register_adapter(is_bridge, BridgeBackend)
