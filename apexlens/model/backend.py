"""One class between apexlens and the model it is handed: :class:`Backend`.

apexlens works on TransformerLens' ``HookedTransformer`` (TL <= 3.9) and on
``TransformerBridge`` (TL >= 3.9, the only class in TL 4). Everything model-specific the
engines need is a short method here:

* **hook names** (``resid_pre(3)`` -> ``"blocks.3.hook_resid_pre"``; both classes use
  HookedTransformer's names),
* **weights** per layer, in ``hook_q/k/v`` slot layout (:meth:`W_in`, :meth:`W_O_at`, ...),
* **pieces of the forward pass** as functions of a residual stream: ``ln1``, ``ln2``,
  ``mlp``, ``ln_final``, ``unembed``, and ``run_layers`` (blocks ``start..stop-1`` from a
  given residual stream); the head algebra in :class:`~apexlens.model.heads.HeadAlgebra`.

What differs between the model classes sits in a sibling adapter
(:mod:`apexlens.model.protocol`); architecture options are handled here: grouped-query
attention (:meth:`slot`, :meth:`attn_z`), shortformer positional embeddings (added to the q/k
inputs, passed to every block), norms after attention and the MLP (:attr:`post_norms`),
parallel attention and MLP (:attr:`mlp_reads_resid_pre`), the output-logit soft cap
(:meth:`unembed`). Everything else that changes a forward pass (rotary, attention soft caps,
local windows, qk-norm, ALiBi, gated MLPs, norm types) acts after ``hook_q/k/v`` or inside
modules called here, so the engines are exact on it without knowing about it.

The engines never read a config flag such as ``use_attn_result`` or
``use_split_qkv_input``: a head's output is ``z[:, :, h] @ W_O[h]`` and a receiver's changed
input enters at ``hook_q``/``hook_k``/``hook_v`` after its projection is recomputed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import edits
from apexlens.model.devices import check_one_device
from apexlens.model.dims import Dims, dims_of
from apexlens.model.heads import HeadAlgebra
from apexlens.model.hooks import HookFn, any_hooks, silenced
from apexlens.model.protocol import ModelAdapter, Norm


class HookNames:
    """TransformerLens' hook names (the same on both model classes)."""

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
    def mlp_post(layer: int) -> str:
        """An MLP's hidden activation after its nonlinearity (``hook_post``)."""
        return f"blocks.{layer}.mlp.hook_post"

    @staticmethod
    def mlp_pre(layer: int) -> str:
        """An MLP's hidden pre-activation (``hook_pre``)."""
        return f"blocks.{layer}.mlp.hook_pre"

    @staticmethod
    def normalized(layer: int, norm: str) -> str:
        """What norm ``"ln1"`` / ``"ln2"`` of block ``layer`` hands its sublayer, before its
        own weight and bias (``hook_normalized``: RMS 1)."""
        return f"blocks.{layer}.{norm}.hook_normalized"

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


class Backend(HookNames, HeadAlgebra):
    """The model's adapter-independent interface. Build one with
    :func:`apexlens.model.backend_for`."""

    def __init__(self, model: Any, adapter: type[ModelAdapter]) -> None:
        check_one_device(model)
        self.model = model
        cfg = model.cfg
        self.dims: Dims = dims_of(cfg)
        self.adapter: ModelAdapter = adapter(model, self.dims)  # type: ignore[call-arg]
        self.shortformer = getattr(cfg, "positional_embedding_type", "standard") == "shortformer"
        cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
        self.logit_soft_cap = cap if cap > 0 else None
        self._weights: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """The model's name as its config gives it (``"gpt2"``, a toy model's name...)."""
        return str(getattr(self.model.cfg, "model_name", None) or type(self.model).__name__)

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
        return self.adapter.post_norms

    def slot(self, head: int, channel: str | None) -> int:
        """The index in ``hook_q``/``hook_k``/``hook_v`` that query head ``head`` reads for
        ``channel``: the head itself for q, its key/value head for k and v."""
        return head // self.dims.group if channel in ("k", "v") else head

    def group_heads(self, kv: int) -> list[int]:
        """The query heads that read key/value head ``kv``."""
        g = self.dims.group
        return list(range(kv * g, (kv + 1) * g))

    def mlp_in_resid(self, layer: int) -> str:
        """The hook holding the residual stream MLP ``layer`` reads (before its norm)."""
        return self.resid_pre(layer) if self.mlp_reads_resid_pre else self.resid_mid(layer)

    def has_hook(self, name: str) -> bool:
        return name in getattr(self.model, "hook_dict", {})

    def norm_scale_hooks(self) -> list[str]:
        """Every normalisation's ``hook_scale`` (LayerNorm, RMSNorm, their ``Pre`` forms, on
        both model classes), in the model's order: where a norm's scale can overflow."""
        return [n for n in getattr(self.model, "hook_dict", {}) if n.endswith(".hook_scale")]

    def split_embed_hooks(self) -> list[str]:
        """``hook_embed`` and ``hook_pos_embed`` where the residual stream entering block 0 is
        exactly their sum (learned absolute positions); none otherwise (rotary, ALiBi and
        shortformer models add no positional embedding to the residual stream)."""
        standard = getattr(self.model.cfg, "positional_embedding_type", "standard") == "standard"
        names = ["hook_embed", "hook_pos_embed"]
        return names if standard and all(self.has_hook(n) for n in names) else []

    # ------------------------------------------------------------------ weights
    @property
    def dtype(self) -> torch.dtype:
        return self.W_U.dtype

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    def weights_key(self) -> tuple[tuple[int, int], ...]:
        """Where every parameter lives and its in-place version: equal between two calls
        exactly when no weight was replaced or changed in place in between (what a
        computation kept from an earlier pass checks before it is reused)."""
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _memo(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._weights:
            self._weights[key] = make()
        return self._weights[key]

    def W_in(self, channel: str) -> Sequence[Float[Tensor, "slot d_model d_head"]]:
        """``W_Q``, ``W_K`` or ``W_V`` of each layer per ``hook_q/k/v`` slot (indexed by
        layer): the model's own parameters (views; a stacked copy of every layer's would be
        hundreds of MB for GPT-2 medium, made by every one-shot call)."""
        name = f"W_{channel.upper()}"
        return self._memo(name, lambda: self.adapter.attn_params(name))

    def b_in(self, channel: str) -> Sequence[Float[Tensor, "slot d_head"]]:
        name = f"b_{channel.upper()}"
        return self._memo(name, lambda: self.adapter.attn_params(name))

    @property
    def W_O_stacked(self) -> Sequence[Float[Tensor, "head d_head d_model"]]:
        """``W_O`` of each layer (indexed by layer)."""
        return self._memo("W_O", lambda: self.adapter.attn_params("W_O"))

    @property
    def b_O_stacked(self) -> Sequence[Float[Tensor, " d_model"]]:
        return self._memo("b_O", lambda: self.adapter.attn_params("b_O"))

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self._memo("U", self.adapter.unembed_params)[0]

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self._memo("U", self.adapter.unembed_params)[1]

    def pos_embed_rows(self, n_pos: int) -> Float[Tensor, "pos d_model"] | None:
        """Shortformer: the positional embedding added to every block's q/k input."""
        return self.adapter.pos_embed_rows(n_pos)

    def embedding_matrix(self) -> Float[Tensor, "d_vocab d_model"]:
        """What ``hook_embed`` holds for each token id (the embedding lookup, scale included),
        so a soft input ``probs @ E`` equals the model's own embedding on a one-hot input."""
        embed = getattr(self.model, "embed", None)
        if embed is None or not self.has_hook("hook_embed"):
            raise ApexlensError(
                "the model has no token embedding module with a 'hook_embed' hook point; "
                "feature visualization feeds soft inputs through it"
            )
        vocab = torch.arange(self.dims.d_vocab_in, device=self.device)
        with torch.no_grad(), silenced(embed):
            return embed(vocab[None, :])[0].detach()

    # ------------------------------------------------------------------ forward pieces
    def ln1(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation in front of attention in block ``layer`` (identity if none)."""
        return self.adapter.norm("ln1", layer)(x)

    def ln1_(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """:meth:`ln1`, computed in ``x``'s memory (``x`` is overwritten) where the norm
        allows it (outside autograd). On a CPU a fresh output of hundreds of MB costs more in
        page faults than the norm itself."""
        if torch.is_grad_enabled() and x.requires_grad:
            return self.ln1(layer, x)
        return self.adapter.norm_inplace("ln1", layer)(x)

    def ln2(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The normalisation in front of the MLP in block ``layer`` (identity if none)."""
        return self.adapter.norm("ln2", layer)(x)

    def ln1_post(self, layer: int, x: Tensor) -> Tensor:
        """The norm after attention (identity unless :attr:`post_norms`)."""
        return self.adapter.norm("ln1_post", layer)(x)

    def ln2_post(self, layer: int, x: Tensor) -> Tensor:
        """The norm after the MLP (identity unless :attr:`post_norms`)."""
        return self.adapter.norm("ln2_post", layer)(x)

    def ln_final(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.adapter.norm("ln_final")(x)

    def differentiable_norm(self, where: str, layer: int | None = None) -> Norm:
        """A norm autograd can differentiate (``"ln1"``, ``"ln_final"``, ...), for
        attribution: the backend's own pieces run without gradients on a bridge."""
        return self.adapter.differentiable_norm(where, layer)

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """MLP ``layer`` applied to an already-normalised input, position by position."""
        if not self.dims.has_mlps:
            raise ApexlensError(f"the model is attention-only: block {layer} has no MLP")
        return self.adapter.mlp(layer, x)

    def mlp_from_resid(
        self, layer: int, resid: Float[Tensor, "... d_model"]
    ) -> Float[Tensor, "... d_model"]:
        """What MLP ``layer`` adds to the residual stream when it reads ``resid``
        (:meth:`mlp_in_resid`): ``ln2_post(mlp(ln2(resid)))``."""
        return self.ln2_post(layer, self.mlp(layer, self.ln2(layer, resid)))

    def mlp_input_edit(self, layer: int) -> tuple[str, Norm] | None:
        """Where MLP ``layer``'s input can be set without touching the residual stream:
        ``(hook name, f)`` such that the hook's value ``f(resid)`` makes the MLP read the
        residual stream ``resid`` and add ``mlp_from_resid(resid)``; ``None`` where there is
        no such point (then the MLP's output has to be recomputed)."""
        return self.adapter.mlp_input_edit(layer)

    def unembed(
        self, resid_final: Float[Tensor, "... d_model"], tokens: Int[Tensor, " n_tok"] | None = None
    ) -> Float[Tensor, "... n_tok"]:
        """Logits (all of the vocabulary, or only the columns ``tokens``) of a final residual,
        soft-capped (``cap * tanh(x / cap)``) where the model does."""
        return self.logits_of(self.ln_final(resid_final), tokens)

    def logits_of(
        self, x: Float[Tensor, "... d_model"], tokens: Int[Tensor, " n_tok"] | None = None
    ) -> Float[Tensor, "... n_tok"]:
        """:meth:`unembed` of a final residual already through :meth:`ln_final`."""
        if tokens is None:
            logits = self.adapter.unembed(x)
        else:
            logits = x @ self.W_U[:, tokens] + self.b_U[tokens]
        cap = self.logit_soft_cap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    # ------------------------------------------------------------------ runs
    def run_layers(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int,
        stop: int | None = None,
        fwd_hooks: Iterable[tuple[str, HookFn]] = (),
        past: Any = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run blocks ``start..stop-1`` on the residual stream entering block ``start``.

        Returns the residual stream leaving block ``stop-1`` (before ``ln_final``); hooks of
        blocks outside ``start..stop-1`` do not fire. With ``past`` (:meth:`prefix`, see
        :attr:`runs_suffix`), ``resid`` holds only the positions after the prefix, which the
        run's attention reads from the prefix's cached keys and values.
        """
        n = self.dims.n_layers
        stop = n if stop is None else stop
        if not 0 <= start <= n or not 0 <= stop <= n:
            raise ApexlensError(f"run_layers(start={start}, stop={stop}) outside 0..{n}")
        if start >= stop:
            return resid
        if past is None:
            return self.adapter.run_blocks(resid, start, stop, list(fwd_hooks))
        return self.adapter.run_blocks(resid, start, stop, list(fwd_hooks), past)

    @property
    def runs_suffix(self) -> bool:
        """Whether a run can start at a later position, reading the earlier ones' keys and
        values from a :meth:`prefix` (as generation's key/value cache does): with causal
        attention, a change at position ``p`` never reaches an earlier position, so
        everything before the earliest changed position is the unchanged run's. True for a
        causal ``HookedTransformer``; a ``TransformerBridge`` runs every position."""
        return bool(getattr(self.adapter, "runs_suffix", False))

    def block_hooked(self, layer: int) -> bool:
        """Whether anything besides apexlens' own run hooks would see block ``layer`` run: a
        hook of the user's (or of an enclosing context, such as
        :func:`apexlens.noise_hooks`) on one of its modules, or a global module hook.
        Such a hook may depend on every position at once (noise drawn in the activation's
        shape, an edit at a fixed query), so a run that splits the block's positions must
        not (:func:`apexlens.runs.suffix.last_block_from`)."""
        return any_hooks(self.model.blocks[layer])

    def prefix(
        self,
        resid: Float[Tensor, "batch p d_model"],
        start: int,
        stop: int | None = None,
        hooks: Iterable[tuple[str, HookFn]] = (),
        past: Any = None,
    ) -> Any:
        """The keys and values blocks ``start..stop-1`` compute for the positions of
        ``resid`` entering block ``start`` -- the first ``p`` positions of a run, or, after
        ``past`` (an earlier prefix of the same rows), the next ones -- under ``hooks``, for
        :meth:`run_layers` ``(..., past=)`` on the positions after them. Only the keys and
        values are computed: the last block's attention and MLP outputs are not."""
        if not self.runs_suffix:
            raise ApexlensError(f"{self.adapter.name} runs every position (no prefix runs)")
        n = self.dims.n_layers
        return self.adapter.prefix(resid, start, n if stop is None else stop, list(hooks), past)

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
        return self.adapter.forward(tokens, hooks, logits), cache

