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

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from apexlens import edits
from apexlens.errors import ApexlensError
from apexlens.hooks import HookFn, attached, silenced
from apexlens.indexing import index_on

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
    n_kv_heads: int = -1
    """Key/value slots of ``hook_k``/``hook_v`` per layer (``n_heads`` unless grouped-query)."""
    parallel: bool = False
    """Parallel attention and MLP: MLP L reads the residual stream entering block L."""

    @property
    def group(self) -> int:
        """Query heads per key/value slot (1 without grouped-query attention)."""
        return self.n_heads // self.kv_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads > 0 else self.n_heads


class _StopAtZ(Exception):
    """Raised by a hook to end a one-block run once the block's ``hook_z`` is known."""


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


_BATCHED_COPY = 16 * 2**20
"""Bytes up to which :meth:`Backend.project_columns` copies inputs to batch their products."""


class Backend:
    """The model-class adapter. Build one with :func:`backend_for`.

    Longer than most classes on purpose: it is the one place that knows the model class, so
    every hook name, weight and forward piece the engines use is a short method here.

    Architecture knowledge lives here (and in :class:`~apexlens.bridge.BridgeBackend`):
    grouped-query attention (:meth:`slot`, :meth:`attn_z`), shortformer positional
    embeddings (added to the q/k inputs, passed to every block), norms after attention and
    the MLP (:meth:`head_delta`, :meth:`mlp_from_resid`), parallel attention and MLP
    (:attr:`mlp_reads_resid_pre`), the output-logit soft cap (:meth:`unembed`). Everything
    else that changes a forward pass (rotary, attention soft caps, local windows, qk-norm,
    ALiBi, gated MLPs, norm types) acts after ``hook_q/k/v`` or inside modules called here,
    so the engines are exact on it without knowing about it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.cfg
        refuse_unsupported(cfg)
        n_heads = int(cfg.n_heads)
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
        if getattr(cfg, "ungroup_grouped_query_attention", False):
            n_kv = n_heads
        self.dims = Dims(
            n_layers=int(cfg.n_layers),
            n_heads=n_heads,
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
            d_vocab=int(cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
            has_mlps=not bool(getattr(cfg, "attn_only", False)),
            n_kv_heads=n_kv,
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        )
        if n_heads % n_kv:
            raise ApexlensError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}")
        self.shortformer = getattr(cfg, "positional_embedding_type", "standard") == "shortformer"
        cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
        self.logit_soft_cap = cap if cap > 0 else None

    # ------------------------------------------------------------------ architecture
    @property
    def mlp_reads_resid_pre(self) -> bool:
        """Parallel attention and MLP (GPT-J, GPT-NeoX): MLP L reads the residual stream
        entering block L, so it never sees the heads of its own layer."""
        return self.dims.parallel

    @property
    def post_norms(self) -> bool:
        """Norms after attention and after the MLP (Gemma-2): a head's output reaches the
        residual stream only through the norm of its layer's summed attention output."""
        return bool(getattr(self.model.cfg, "use_normalization_before_and_after", False))

    def slot(self, head: int, channel: str | None) -> int:
        """The index in ``hook_q``/``hook_k``/``hook_v`` that query head ``head`` reads for
        ``channel``: the head itself for q, its key/value head for k and v."""
        if channel in ("k", "v"):
            return head // self.dims.group
        return head

    def group_heads(self, kv: int) -> list[int]:
        """The query heads that read key/value head ``kv``."""
        g = self.dims.group
        return list(range(kv * g, (kv + 1) * g))

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

    def mlp_in_resid(self, layer: int) -> str:
        """The hook holding the residual stream MLP ``layer`` reads (before its norm)."""
        return self.resid_pre(layer) if self.mlp_reads_resid_pre else self.resid_mid(layer)

    # ------------------------------------------------------------------ weights
    @property
    def dtype(self) -> torch.dtype:
        return self.W_U.dtype

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    def _attn(self, layer: int) -> Any:
        return self.model.blocks[layer].attn

    def _stack(self, name: str) -> Tensor:
        """``name`` of every layer's attention, in ``hook_q/k/v`` slot layout, stacked."""
        return torch.stack([getattr(self._attn(la), name) for la in range(self.dims.n_layers)])

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.model.W_Q

    @property
    def W_K(self) -> Float[Tensor, "layer kv d_model d_head"]:
        """Per ``hook_k`` slot: ``[layer, n_kv_heads, ...]`` under grouped-query attention."""
        return self._stack("_W_K") if self.dims.group > 1 else self.model.W_K

    @property
    def W_V(self) -> Float[Tensor, "layer kv d_model d_head"]:
        return self._stack("_W_V") if self.dims.group > 1 else self.model.W_V

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self.model.W_O

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self.model.b_Q

    @property
    def b_K(self) -> Float[Tensor, "layer kv d_head"]:
        return self._stack("_b_K") if self.dims.group > 1 else self.model.b_K

    @property
    def b_V(self) -> Float[Tensor, "layer kv d_head"]:
        return self._stack("_b_V") if self.dims.group > 1 else self.model.b_V

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self.model.b_O

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.model.b_U

    def W_in(self, channel: str) -> Sequence[Float[Tensor, "slot d_model d_head"]]:
        """``W_Q``, ``W_K`` or ``W_V`` of each layer per ``hook_q/k/v`` slot (indexed by layer)."""
        return self._memo(("W", channel), lambda: self._layers(f"W_{channel.upper()}"))

    def b_in(self, channel: str) -> Sequence[Float[Tensor, "slot d_head"]]:
        return self._memo(("b", channel), lambda: self._layers(f"b_{channel.upper()}"))

    @property
    def W_O_stacked(self) -> Sequence[Float[Tensor, "head d_head d_model"]]:
        """``W_O`` of each layer (indexed by layer)."""
        return self._memo(("W", "O"), lambda: self._layers("W_O"))

    @property
    def b_O_stacked(self) -> Sequence[Float[Tensor, " d_model"]]:
        return self._memo(("b", "O"), lambda: self._layers("b_O"))

    def _layers(self, name: str) -> list[Tensor]:
        """Attention weight ``name`` (``W_Q``, ``b_O``, ...) of each layer in ``hook_q/k/v``
        slot layout: the model's own parameters (views, no copies; a stacked copy of every
        layer's would be hundreds of MB for GPT-2 medium, made by every one-shot call)."""
        kv = self.dims.group > 1 and name[-1] in "KV"  # grouped-query: one slot per kv head
        attr = "_" + name if kv else name
        return [getattr(self._attn(la), attr).detach() for la in range(self.dims.n_layers)]

    def _memo(self, key: tuple[str, str], make: Any) -> Any:
        memo = self.__dict__.setdefault("_weights", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def pos_embed_rows(self, n_pos: int) -> Float[Tensor, "pos d_model"] | None:
        """Shortformer: the positional embedding added to every block's q/k input."""
        if not self.shortformer:
            return None
        return self.model.pos_embed.W_pos[:n_pos]

    # ------------------------------------------------------------------ forward pieces
    def _module(self, layer: int, name: str) -> Any:
        return getattr(self.model.blocks[layer], name, None)

    def _norm(self, module: Any, x: Tensor) -> Tensor:
        return _apply_norm(module, x)

    def ln1(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation in front of attention in block ``layer`` (identity if none)."""
        return self._norm(self._module(layer, "ln1"), x)

    def ln1_(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """:meth:`ln1`, computed in ``x``'s memory (``x`` is overwritten) where the norm
        allows it: TransformerLens' LayerNorm / RMSNorm and their ``Pre`` forms in
        float32/float64, outside autograd. On a CPU a fresh output of hundreds of MB costs
        more in page faults than the norm itself."""
        return self._norm_(self._module(layer, "ln1"), x)

    def _norm_(self, module: Any, x: Tensor) -> Tensor:
        fn = inplace_norm(module) if not (torch.is_grad_enabled() and x.requires_grad) else None
        return fn(x) if fn is not None else self._norm(module, x)

    def ln2(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation in front of the MLP in block ``layer`` (identity if none)."""
        return self._norm(self._module(layer, "ln2"), x)

    def ln1_post(self, layer: int, x: Tensor) -> Tensor:
        """The norm after attention (identity unless :attr:`post_norms`)."""
        return self._norm(self._module(layer, "ln1_post") if self.post_norms else None, x)

    def ln2_post(self, layer: int, x: Tensor) -> Tensor:
        """The norm after the MLP (identity unless :attr:`post_norms`)."""
        return self._norm(self._module(layer, "ln2_post") if self.post_norms else None, x)

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
        self, layer: int, resid: Float[Tensor, "... d_model"]
    ) -> Float[Tensor, "... d_model"]:
        """What MLP ``layer`` adds to the residual stream when it reads ``resid``
        (:meth:`mlp_in_resid`): ``ln2_post(mlp(ln2(resid)))``."""
        return self.ln2_post(layer, self.mlp(layer, self.ln2(layer, resid)))

    def mlp_input_edit(
        self, layer: int
    ) -> tuple[str, Callable[[Tensor], Tensor]] | None:
        """Where MLP ``layer``'s input can be set without touching the residual stream:
        ``(hook name, f)`` such that the hook's value ``f(resid)`` makes the MLP read the
        residual stream ``resid`` (instead of :meth:`mlp_in_resid`'s value) and add
        ``mlp_from_resid(resid)``; ``None`` where there is no such point (then the MLP's
        output has to be recomputed).

        HookedTransformer's LayerNorm / RMSNorm (and ``Pre`` forms) in float32/float64:
        ``ln2.hook_normalized``, the input normalised before the norm's own weight and bias,
        computed here with torch's fused kernel (the same function)."""
        module = self._module(layer, "ln2")
        kind = type(module).__name__
        if (
            module is None
            or type(module).__module__.split(".")[0] != "transformer_lens"
            or not hasattr(module, "hook_normalized")
            or getattr(self.model.cfg, "dtype", None) not in (torch.float32, torch.float64)
            or self.post_norms
        ):
            return None
        eps = float(getattr(module, "eps", 1e-5))
        name = f"blocks.{layer}.ln2.hook_normalized"
        if kind in ("LayerNorm", "LayerNormPre"):
            return name, lambda x: F.layer_norm(x, (x.shape[-1],), None, None, eps)
        if kind in ("RMSNorm", "RMSNormPre"):
            return name, lambda x: x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        return None

    def _with_pos(self, channel: str, x: Tensor, pos_axis: int) -> Tensor:
        pe = self.pos_embed_rows(x.shape[pos_axis]) if channel in ("q", "k") else None
        if pe is None:
            return x
        return x + pe.view(pe.shape[0], *([1] * (-pos_axis - 2)), pe.shape[1]).to(x.dtype)

    def head_input(
        self,
        layer: int,
        channel: str,
        resid: Float[Tensor, "... pos d_model"],
        slots: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... pos slot d_head"]:
        """``hook_q/k/v`` values at ``slots`` (see :meth:`slot`; all if ``None``) of
        ``layer`` when the block's input is ``resid`` (positions on axis -2)."""
        W = self.W_in(channel)[layer]
        b = self.b_in(channel)[layer]
        if slots is not None:
            idx = index_on(slots, W.device)
            W, b = W[idx], b[idx]
        x = self._with_pos(channel, self.ln1(layer, resid), -2)
        return torch.einsum("...m,hmd->...hd", x, W) + b

    def heads_input(
        self,
        layer: int,
        channel: str,
        resid: Float[Tensor, "... pos head d_model"],
        slots: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... pos head d_head"]:
        """Like :meth:`head_input`, but entry ``i`` of axis -2 reads its own residual stream
        ``resid[..., i, :]`` through slot ``slots[i]`` (positions on axis -3)."""
        return self.project_heads(layer, channel, self.ln1(layer, resid), slots)

    def project_heads(
        self,
        layer: int,
        channel: str,
        normed: Float[Tensor, "... pos head d_model"],
        slots: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "... pos head d_head"]:
        """:meth:`heads_input` from inputs already through ``ln1`` (positions on axis -3)."""
        W = self.W_in(channel)[layer]
        b = self.b_in(channel)[layer]
        if slots is not None:
            idx = index_on(slots, W.device)
            W, b = W[idx], b[idx]
        x = self._with_pos(channel, normed, -3)
        return torch.einsum("...hm,hmd->...hd", x, W) + b

    def project_columns(
        self,
        layer: int,
        channel: str,
        normed: Float[Tensor, "column ... pos d_model"],
        groups: list[tuple[int, list[int]]],
        slots: list[int],
    ) -> Float[Tensor, "... pos slot d_head"]:
        """``hook_q/k/v`` values at ``slots`` of ``layer`` where slot ``slots[i]`` reads the
        already-normalised input ``normed[c]`` for the ``(c, members)`` of ``groups`` with
        ``i`` in ``members``: one product per column, no per-slot copy of its input."""
        W = self.W_in(channel)[layer]  # [slot, d_model, d_head]
        b = self.b_in(channel)[layer]
        dh = b.shape[-1]
        lead, dm = normed.shape[1:-1], normed.shape[-1]
        out = normed.new_empty(math.prod(lead), len(slots), dh)
        dev = W.device  # indices made once per device (no per-call host-device copies)
        singles = [(c, members[0]) for c, members in groups if len(members) == 1]
        n_rows = math.prod(lead)
        if len(singles) > 1 and len(singles) * n_rows * dm * normed.itemsize <= _BATCHED_COPY:
            # slots with a column each, in one batched product over a copy of their columns
            # (small inputs: one kernel instead of one per slot; large ones read in place)
            cols = index_on([c for c, _ in singles], dev)
            x = self._with_pos(channel, normed[cols], -2).reshape(len(singles), -1, dm)
            y = torch.bmm(x, W[index_on([slots[i] for _, i in singles], dev)])
            out[:, index_on([i for _, i in singles], dev)] = y.transpose(0, 1)
            groups = [(c, members) for c, members in groups if len(members) > 1]
        for c, members in groups:
            x = self._with_pos(channel, normed[c], -2).reshape(-1, dm)
            if len(members) == 1:
                Wc = W[slots[members[0]]]
            else:
                Wc = W[index_on([slots[i] for i in members], dev)]
                Wc = Wc.permute(1, 0, 2).reshape(dm, -1)
            y = (x @ Wc).view(-1, len(members), dh)
            out[:, index_on(members, dev)] = y
        out += b[index_on(slots, dev)]
        return out.view(*lead, len(slots), dh)

    def head_outputs(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        heads: Tensor | list[int] | None = None,
    ) -> Float[Tensor, "head ... d_model"]:
        """``z[..., h, :] @ W_O[h]`` per head, heads first (before any post-attention norm:
        additive contributions only without :attr:`post_norms`)."""
        W_O = self.W_O_stacked[layer]
        if heads is not None:
            W_O = W_O[index_on(heads, W_O.device)]
        return torch.einsum("...hk,hkd->h...d", z, W_O)

    def head_outputs_into(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        out: Float[Tensor, "... head d_model"],
        total: Float[Tensor, "... d_model"],
    ) -> None:
        """:meth:`head_outputs` of every head written into ``out`` (heads before ``d_model``;
        any strides that merge the leading axes, ``d_model`` contiguous), and their sum added
        to ``total``: one batched product (a head per batch entry) straight into place and
        one for the sum, no temporary of the whole output and no copy of it. Outside
        autograd (``out=`` products are not differentiable)."""
        W_O = self.W_O_stacked[layer]
        n_heads, d_head, dm = W_O.shape
        zf = z.reshape(-1, n_heads, d_head)
        torch.bmm(zf.transpose(0, 1), W_O, out=out.view(-1, n_heads, dm).transpose(0, 1))
        tf = total.view(-1, dm)
        tf.addmm_(zf.reshape(-1, n_heads * d_head), W_O.reshape(n_heads * d_head, dm))

    def attn_output(
        self, layer: int, z: Float[Tensor, "... head d_head"]
    ) -> Float[Tensor, "... d_model"]:
        """What attention ``layer`` adds to the residual stream given every head's ``hook_z``:
        ``ln1_post(sum_h z_h W_O[h] + b_O)``."""
        return self.ln1_post(layer, self._attn_sum(layer, z))

    def _attn_sum(self, layer: int, z: Float[Tensor, "... head d_head"]) -> Tensor:
        """``sum_h z_h W_O[h] + b_O``: attention's output before any post-attention norm."""
        return torch.einsum("...hk,hkd->...d", z, self.W_O_stacked[layer]) + self.b_O_stacked[layer]

    def head_delta(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        dz: Float[Tensor, "... k d_head"],
        heads: list[int],
    ) -> Float[Tensor, "... d_model"]:
        """The change of the residual stream when heads ``heads`` of ``layer`` change their
        ``hook_z`` by ``dz`` (together) and the others keep ``z``: ``sum dz W_O`` -- or, after
        a post-attention norm, ``ln1_post(A + sum dz W_O) - ln1_post(A)``."""
        W_O = self.W_O_stacked[layer]
        d = torch.einsum("...hk,hkd->...d", dz, W_O[index_on(heads, W_O.device)])
        return self._after_post_norm(layer, z, d)

    def each_head_delta(
        self,
        layer: int,
        z: Float[Tensor, "... head d_head"],
        dz: Float[Tensor, "... k d_head"],
        heads: list[int],
    ) -> Float[Tensor, "k ... d_model"]:
        """:meth:`head_delta` for each of ``heads`` changing *alone* (``dz[..., i, :]`` for
        head ``heads[i]``), stacked along a new first axis: one product for all of them."""
        return self._after_post_norm(layer, z, self.head_outputs(layer, dz, heads))

    def _after_post_norm(self, layer: int, z: Tensor, d: Tensor) -> Tensor:
        """A change ``d`` of the heads' summed output (any leading axes) as the change of the
        residual stream: ``d`` itself, or ``ln1_post(A + d) - ln1_post(A)`` after a
        post-attention norm, ``A`` the summed output for ``z``."""
        if not self.post_norms:
            return d
        a = self._attn_sum(layer, z)
        return self.ln1_post(layer, a + d) - self.ln1_post(layer, a)

    def attn_z(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> Float[Tensor, "batch pos head d_head"]:
        """``hook_z`` of block ``layer`` when its input is ``resid`` and its ``hook_q/k/v``
        hold ``q``, ``k``, ``v``: the block's own attention (rotary, soft caps, windows,
        qk-norm... all included), run with every hook point of the block silenced.

        This is how a query head of a grouped-query layer reads a key or value of its own:
        its shadow ``z`` is taken from a call where its key/value slot holds that input.
        """
        out: dict[str, Tensor] = {}

        def stop(act: Tensor, hook: Any) -> None:
            out["z"] = act
            raise _StopAtZ

        hooks = [
            (self.qkv(layer, "q"), edits.replace(q)),
            (self.qkv(layer, "k"), edits.replace(k)),
            (self.qkv(layer, "v"), edits.replace(v)),
            (self.z(layer), stop),
        ]
        with silenced(self.model.blocks[layer]):
            try:
                self._run_blocks(resid, layer, layer + 1, hooks)
            except _StopAtZ:
                pass
        return out["z"]

    def unembed(
        self, resid_final: Float[Tensor, "... d_model"], tokens: Int[Tensor, " n_tok"] | None = None
    ) -> Float[Tensor, "... n_tok"]:
        """Logits (all of the vocabulary, or only the columns ``tokens``) of a final residual,
        soft-capped (``cap * tanh(x / cap)``) where the model does."""
        x = self.ln_final(resid_final)
        if tokens is None:
            logits = x @ self.W_U + self.b_U
        else:
            logits = x @ self.W_U[:, tokens] + self.b_U[tokens]
        return self._cap(logits)

    def _cap(self, logits: Tensor) -> Tensor:
        cap = self.logit_soft_cap
        return logits if cap is None else cap * torch.tanh(logits / cap)

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
        return self._run_blocks(resid, start, stop, list(fwd_hooks))

    def _run_blocks(
        self, resid: Tensor, start: int, stop: int, hooks: list[tuple[str, HookFn]]
    ) -> Tensor:
        extra: dict[str, Any] = {}
        pe = self.pos_embed_rows(resid.shape[1])
        if pe is not None:
            extra["shortformer_pos_embed"] = pe.expand(resid.shape[0], *pe.shape)
        with attached(self.model, hooks):
            return self.model(resid, start_at_layer=start, stop_at_layer=stop, **extra)

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
    fused = fused_norm(module)
    if fused is not None:
        return fused(x)
    with silenced(module):
        return module(x)


def fused_norm(module: Any) -> Any:
    """TransformerLens' LayerNorm / RMSNorm (and ``Pre`` forms) in float32/float64 as one fused,
    differentiable function of the input; ``None`` for any other module."""
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


def inplace_norm(module: Any) -> Callable[[Tensor], Tensor] | None:
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
