"""One small adapter between apexlens and the model class it is handed.

apexlens works on TransformerLens' ``HookedTransformer`` (TL <= 3.9) and on
``TransformerBridge`` (TL >= 3.9, the only class in TL 4). Everything model-specific that
the engines need lives here, behind :class:`Backend`:

* **hook names** (``resid_pre(3)`` -> ``"blocks.3.hook_resid_pre"``),
* **weights** as layer-stacked tensors (``W_Q[layer, head, d_model, d_head]``, ...),
* **pieces of the forward pass** as functions of a residual stream: ``ln1``, ``ln2``,
  ``mlp``, ``ln_final``, ``unembed``, and ``run_layers`` (run blocks ``start..stop-1``
  from a given residual stream).

The engines never read a config flag such as ``use_attn_result`` or
``use_split_qkv_input``: a head's output is ``z[:, :, h] @ W_O[h]`` and a receiver's changed
input enters at ``hook_q``/``hook_k``/``hook_v`` after its projection is recomputed here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from apexlens import edits
from apexlens.errors import ApexlensError
from apexlens.hooks import HookFn, attached, silenced

__all__ = ["ApexlensError", "Backend", "Dims", "backend_for"]


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    has_mlps: bool


class Backend:
    """The model-class adapter. Build one with :func:`backend_for`.

    Longer than most classes on purpose: it is the one place that knows the model class, so
    every hook name, weight and forward piece the engines use is a short method here."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.cfg
        self.dims = Dims(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
            d_vocab=int(cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
            has_mlps=not bool(getattr(cfg, "attn_only", False)),
        )
        if getattr(cfg, "parallel_attn_mlp", False):
            raise ApexlensError(
                "models with parallel attention and MLP (parallel_attn_mlp=True) are not supported:"
                " their MLPs read resid_pre, so 'heads before the MLP of the same layer' is undefined"
            )

    # ------------------------------------------------------------------ hook names
    @staticmethod
    def resid_pre(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def resid_mid(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_mid"

    @staticmethod
    def resid_post(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    @staticmethod
    def attn_out(layer: int) -> str:
        return f"blocks.{layer}.hook_attn_out"

    @staticmethod
    def mlp_out(layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def z(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    @staticmethod
    def qkv(layer: int, channel: str) -> str:
        """``channel`` is ``"q"``, ``"k"`` or ``"v"``."""
        return f"blocks.{layer}.attn.hook_{channel}"

    @staticmethod
    def pattern(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    # ------------------------------------------------------------------ weights
    @property
    def dtype(self) -> torch.dtype:
        return self.W_U.dtype

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.model.W_Q

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.model.W_K

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.model.W_V

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self.model.W_O

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self.model.b_Q

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self.model.b_K

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self.model.b_V

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.model.b_U

    def W_in(self, channel: str) -> Float[Tensor, "layer head d_model d_head"]:
        """``W_Q``, ``W_K`` or ``W_V``, read once per Backend (stacking layers is not free)."""
        return self._memo(("W", channel), lambda: getattr(self, f"W_{channel.upper()}"))

    def b_in(self, channel: str) -> Float[Tensor, "layer head d_head"]:
        return self._memo(("b", channel), lambda: getattr(self, f"b_{channel.upper()}"))

    @property
    def W_O_stacked(self) -> Float[Tensor, "layer head d_head d_model"]:
        """``W_O``, read once per Backend."""
        return self._memo(("W", "O"), lambda: self.W_O)

    def _memo(self, key: tuple[str, str], make: Any) -> Tensor:
        memo = self.__dict__.setdefault("_weights", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    # ------------------------------------------------------------------ forward pieces
    def ln1(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation in front of attention in block ``layer`` (identity if none)."""
        return _apply_norm(self.model.blocks[layer].ln1, x)

    def ln2(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation in front of the MLP in block ``layer`` (identity if none)."""
        return _apply_norm(self.model.blocks[layer].ln2, x)

    def ln_final(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return _apply_norm(getattr(self.model, "ln_final", None), x)

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """MLP ``layer`` applied to an already-normalised input, position by position.

        TransformerLens' plain MLP with a pointwise activation is computed here with torch's
        fused activation (the same function; TL's ``gelu_new`` makes five passes over the
        hidden layer); any other MLP module is called with its hook points silenced."""
        module = self.model.blocks[layer].mlp
        act = _fused_activation(module, self.model.cfg)
        if act is not None:
            return act(x @ module.W_in + module.b_in) @ module.W_out + module.b_out
        shape = x.shape
        out = _apply_norm(module, x.reshape(1, -1, shape[-1]))
        return out.reshape(shape)

    def mlp_from_resid(
        self, layer: int, resid_mid: Float[Tensor, "... d_model"]
    ) -> Float[Tensor, "... d_model"]:
        """MLP ``layer``'s output when its residual input is ``resid_mid``."""
        return self.mlp(layer, self.ln2(layer, resid_mid))

    def head_input(
        self,
        layer: int,
        channel: str,
        resid: Float[Tensor, "... d_model"],
        heads: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... head d_head"]:
        """``hook_q/k/v`` values of ``heads`` in ``layer`` when the block's input is ``resid``."""
        W = self.W_in(channel)[layer]
        b = self.b_in(channel)[layer]
        if heads is not None:
            W, b = W[heads], b[heads]
        x = self.ln1(layer, resid)
        return torch.einsum("...m,hmd->...hd", x, W) + b

    def heads_input(
        self,
        layer: int,
        channel: str,
        resid: Float[Tensor, "... head d_model"],
        heads: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... head d_head"]:
        """``hook_q/k/v`` values when every head (of ``heads``, in that order) reads its own
        residual stream ``resid[..., h, :]``."""
        return self.project_heads(layer, channel, self.ln1(layer, resid), heads)

    def project_heads(
        self,
        layer: int,
        channel: str,
        normed: Float[Tensor, "... head d_model"],
        heads: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... head d_head"]:
        """``hook_q/k/v`` values of ``heads`` from inputs already through ``ln1``, one per head."""
        W = self.W_in(channel)[layer]
        b = self.b_in(channel)[layer]
        if heads is not None:
            W, b = W[heads], b[heads]
        return torch.einsum("...hm,hmd->...hd", normed, W) + b

    def head_outputs(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        heads: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "head ... d_model"]:
        """What each head of ``layer`` writes to the residual stream given its ``hook_z``
        values: ``z[..., h, :] @ W_O[h]``, heads first. With ``heads``, ``z`` holds only
        those heads (in that order)."""
        W_O = self.W_O_stacked[layer]
        if heads is not None:
            W_O = W_O[heads]
        return torch.einsum("...hk,hkd->h...d", z, W_O)

    def unembed(
        self, resid_final: Float[Tensor, "... d_model"], tokens: Int[Tensor, " n_tok"] | None = None
    ) -> Float[Tensor, "... n_tok"]:
        """Logits (all of the vocabulary, or only the columns ``tokens``) of a final residual."""
        x = self.ln_final(resid_final)
        if tokens is None:
            return x @ self.W_U + self.b_U
        return x @ self.W_U[:, tokens] + self.b_U[tokens]

    def run_layers(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int,
        stop: int | None = None,
        fwd_hooks: Iterable[tuple[str, HookFn]] = (),
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run blocks ``start..stop-1`` on the residual stream entering block ``start``.

        Returns the residual stream leaving block ``stop-1`` (before ``ln_final``).
        """
        stop = self.dims.n_layers if stop is None else stop
        if start >= stop:
            return resid
        with attached(self.model, list(fwd_hooks)):
            return self.model(resid, start_at_layer=start, stop_at_layer=stop)

    def run_with_cache(
        self,
        tokens: Int[Tensor, "batch pos"],
        names: Iterable[str],
        fwd_hooks: Iterable[tuple[str, HookFn]] = (),
        logits: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the activations at ``names`` (detached clones), with optional hooks.

        With ``logits=False`` the run stops before ``ln_final`` and returns the final residual
        stream ``[batch, pos, d_model]`` instead of logits (the unembedding is skipped).
        Hooks in ``fwd_hooks`` run before the caching hooks of the same name, so the cache
        holds what the rest of the network saw.
        """
        cache: dict[str, Tensor] = {}
        hooks = [*fwd_hooks, *((n, edits.save(cache, n)) for n in dict.fromkeys(names))]
        return self._forward(tokens, hooks, logits), cache

    def _forward(
        self, tokens: Int[Tensor, "batch pos"], hooks: list[tuple[str, HookFn]], logits: bool
    ) -> Tensor:
        """One whole forward pass under ``hooks``: logits, or the final residual stream."""
        with attached(self.model, hooks):
            if logits:
                return self.model(tokens)
            return self.model(tokens, stop_at_layer=self.dims.n_layers)


def _apply_norm(module: Any, x: Tensor) -> Tensor:
    """``module(x)`` with the module's hook points silenced (identity if there is none);
    TransformerLens' LayerNorm / RMSNorm (and their ``Pre`` forms) in float32/float64 are
    computed with torch's fused kernels (the same function)."""
    if module is None:
        return x
    fused = _fused_norm(module)
    if fused is not None:
        return fused(x)
    with silenced(module):
        return module(x)


def _fused_norm(module: Any) -> Any:
    kind = type(module).__name__
    if type(module).__module__.split(".")[0] != "transformer_lens":
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


_FUSED = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def _fused_activation(module: Any, cfg: Any) -> Any:
    """The fused activation of a plain TransformerLens ``MLP`` (None for anything else)."""
    if (
        type(module).__name__ != "MLP"
        or type(module).__module__.split(".")[0] != "transformer_lens"
    ):
        return None
    if getattr(cfg, "gated_mlp", False) or not hasattr(module, "W_in"):
        return None
    return _FUSED.get(str(getattr(cfg, "act_fn", "")))


def backend_for(model: Any) -> Backend:
    """The :class:`Backend` for ``model``."""
    if isinstance(model, Backend):
        return model
    if not hasattr(model, "cfg") or not hasattr(model, "hooks"):
        raise ApexlensError(
            f"expected a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}"
        )
    for matches, backend_class in _ADAPTERS:
        if matches(model):
            return backend_class(model)
    return Backend(model)


_ADAPTERS: list[tuple[Any, type[Backend]]] = []
"""``(predicate, Backend subclass)`` pairs for other model classes; ``apexlens.bridge``
registers the ``TransformerBridge`` adapter when the package is imported."""


def register_adapter(matches: Any, backend_class: type[Backend]) -> None:
    """Use ``backend_class`` for every model for which ``matches(model)`` is true."""
    _ADAPTERS.append((matches, backend_class))
