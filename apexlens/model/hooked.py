"""The adapter for TransformerLens' ``HookedTransformer`` (TL <= 3.9).

One of two sibling adapters (:mod:`apexlens.model.bridged` is the other), each implementing
the contract :class:`apexlens.model.protocol.ModelAdapter`; :func:`apexlens.model.backend_for`
picks one by the model's type. Everything that differs between the model classes is here:
where the weights live, how a norm or an MLP is called, how blocks are run from a residual
stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.model.dims import Dims
from apexlens.model.hooks import Hooks, silenced
from apexlens.model.norms import apply_norm, fused_activation, fused_norm, inplace_norm, normalizer
from apexlens.model.skips import hooked_pass

_NORM_OF = {"ln1": "ln1", "ln2": "ln2", "ln1_post": "ln1_post", "ln2_post": "ln2_post"}


class HookedAdapter:
    """:class:`~apexlens.model.protocol.ModelAdapter` of a ``HookedTransformer``."""

    name = "HookedTransformer"

    def __init__(self, model: Any, dims: Dims) -> None:
        self.model = model
        self.grouped = dims.group > 1
        self.post_norms = bool(getattr(model.cfg, "use_normalization_before_and_after", False))
        self.shortformer = (
            getattr(model.cfg, "positional_embedding_type", "standard") == "shortformer"
        )

    @staticmethod
    def matches(model: Any) -> bool:
        try:
            from transformer_lens import HookedTransformer
        except ImportError:  # TransformerLens 4.x
            return False
        return isinstance(model, HookedTransformer)

    # ------------------------------------------------------------------ weights
    def attn_params(self, name: str) -> list[Tensor]:
        """Attention weight ``name`` (``W_Q``, ``b_O``, ...) of each layer in ``hook_q/k/v``
        slot layout: the model's own parameters (views, no copies)."""
        kv = self.grouped and name[-1] in "KV"  # grouped-query: one slot per key/value head
        attr = "_" + name if kv else name
        return [getattr(block.attn, attr).detach() for block in self.model.blocks]

    def unembed_params(self) -> tuple[Tensor, Tensor]:
        return self.model.W_U.detach(), self.model.b_U.detach()

    def pos_embed_rows(self, n_pos: int) -> Tensor | None:
        """Shortformer: the positional embedding added to every block's q/k input."""
        return self.model.pos_embed.W_pos[:n_pos] if self.shortformer else None

    # ------------------------------------------------------------------ pieces
    def _norm_module(self, where: str, layer: int | None) -> Any:
        if where == "ln_final":
            module = getattr(self.model, "ln_final", None)
            return None if isinstance(module, torch.nn.Identity) else module
        if where in ("ln1_post", "ln2_post") and not self.post_norms:
            return None
        assert layer is not None
        module = getattr(self.model.blocks[layer], _NORM_OF[where], None)
        return None if isinstance(module, torch.nn.Identity) else module

    def norm(self, where: str, layer: int | None = None) -> Callable[[Tensor], Tensor]:
        module = self._norm_module(where, layer)
        return lambda x: apply_norm(module, x)

    def norm_inplace(self, where: str, layer: int | None = None) -> Callable[[Tensor], Tensor]:
        module = self._norm_module(where, layer)
        fn = inplace_norm(module)
        return fn if fn is not None else (lambda x: apply_norm(module, x))

    def differentiable_norm(
        self, where: str, layer: int | None = None
    ) -> Callable[[Tensor], Tensor]:
        module = self._norm_module(where, layer)
        fused = fused_norm(module) if module is not None else None
        return fused if fused is not None else (lambda x: apply_norm(module, x))

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        module = self.model.blocks[layer].mlp
        act = fused_activation(module, self.model.cfg)
        if act is not None:
            return act(x @ module.W_in + module.b_in) @ module.W_out + module.b_out
        shape = x.shape
        with silenced(module):
            return module(x.reshape(1, -1, shape[-1])).reshape(shape)

    def mlp_input_edit(self, layer: int) -> tuple[str, Callable[[Tensor], Tensor]] | None:
        """``ln2.hook_normalized``: the MLP's input normalised before the norm's own weight
        and bias, computed with torch's fused kernel (the same function)."""
        if self.post_norms:
            return None
        fn = normalizer(getattr(self.model.blocks[layer], "ln2", None))
        return None if fn is None else (f"blocks.{layer}.ln2.hook_normalized", fn)

    def unembed(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        W_U, b_U = self.unembed_params()
        return x @ W_U + b_U

    # ------------------------------------------------------------------ runs
    def run_blocks(
        self, resid: Tensor, start: int, stop: int, hooks: Hooks, past: Prefix | None = None
    ) -> Tensor:
        """Blocks ``start..stop-1``; with ``past`` (:meth:`prefix`), ``resid`` holds the
        positions after the prefix only and attends to the prefix's cached keys/values."""
        offset = 0 if past is None else past.n_pos
        extra: dict[str, Any] = {}
        pe = self.pos_embed_rows(offset + resid.shape[1])
        if pe is not None:
            pe = pe[offset:]
            extra["shortformer_pos_embed"] = pe.expand(resid.shape[0], *pe.shape)
        if past is not None:
            extra["past_kv_cache"] = past.entries(resid.shape[0])
        with hooked_pass(self.model, hooks):
            return self.model(resid, start_at_layer=start, stop_at_layer=stop, **extra)

    @property
    def runs_suffix(self) -> bool:
        """Whether :meth:`prefix` can stand in for the first positions of a run: causal
        attention (a position never reads a later one) with TransformerLens' own key/value
        cache, which offsets rotary, ALiBi, local windows and shortformer positions."""
        cfg = self.model.cfg
        return getattr(cfg, "attention_dir", "causal") == "causal" and getattr(
            cfg, "positional_embedding_type", "standard"
        ) in ("standard", "rotary", "alibi", "shortformer")

    def prefix(
        self,
        resid: Tensor,
        start: int,
        stop: int,
        hooks: Hooks = (),
        past: Prefix | None = None,
    ) -> Prefix:
        """The keys and values blocks ``start..stop-1`` compute for the positions of
        ``resid`` entering block ``start`` (the first ones of a run, or, with ``past``, the
        ones after ``past``'s), under ``hooks``: one run of those positions that records each
        block's cache entry (whatever the attention does between ``hook_k`` and its cache --
        a qk-norm, a clamp -- is in the recorded values) and stops at the last block's, whose
        attention and MLP outputs no one reads."""
        n = int(self.model.cfg.n_layers)
        rows, offset = int(resid.shape[0]), 0 if past is None else past.n_pos
        before = [None] * n if past is None else past.entries(rows)
        slots: list[Any] = [None] * n
        for i in range(start, stop):
            slots[i] = _Entry(resid.new_empty(rows, 0, 1, 1), None, before[i], last=i == stop - 1)
        extra: dict[str, Any] = {"past_kv_cache": slots}
        pe = self.pos_embed_rows(offset + resid.shape[1])
        if pe is not None:
            pe = pe[offset:]
            extra["shortformer_pos_embed"] = pe.expand(rows, *pe.shape)
        with hooked_pass(self.model, hooks):
            try:
                self.model(resid, start_at_layer=start, stop_at_layer=stop, **extra)
            except _Recorded:
                pass
        return Prefix(slots, offset + int(resid.shape[1]), rows)

    def forward(self, tokens: Int[Tensor, "batch pos"], hooks: Hooks, logits: bool) -> Tensor:
        with hooked_pass(self.model, hooks):
            if logits:
                return self.model(tokens)
            return self.model(tokens, stop_at_layer=int(self.model.cfg.n_layers))


class _Recorded(Exception):
    """Raised by the last recording entry of a :meth:`HookedAdapter.prefix` run: the keys and
    values are known, nothing after them is needed."""


class _Entry:
    """A layer's key/value cache entry as TransformerLens' attention uses it
    (``past_keys.size(1)`` is the position offset; ``append`` returns every key and value):
    recording (``values is None``: keeps what it is handed, after ``before``'s keys and
    values when given; ``last``: then ends the run) or prepending fixed ones."""

    def __init__(
        self, keys: Tensor, values: Tensor | None, before: _Entry | None = None, last: bool = False
    ) -> None:
        self.past_keys, self.past_values = keys, values
        self.before, self.last = before, last
        if before is not None:  # the position offset is the earlier positions'
            self.past_keys = before.past_keys

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.past_values is None:
            if self.before is not None:
                k, v = self.before.append(k, v)
            self.past_keys, self.past_values = k, v
            if self.last:
                raise _Recorded
            return k, v
        return torch.cat([self.past_keys, k], 1), torch.cat([self.past_values, v], 1)


@dataclass
class Prefix:
    """The cached keys and values of a run's first :attr:`n_pos` positions, per layer
    (``None`` outside the layers recorded), for :attr:`batch` examples."""

    slots: list[Any]
    n_pos: int
    batch: int

    def entries(self, n: int) -> list[Any]:
        """Fixed entries for ``n`` stacked rows (copies of the batch along the batch axis)."""
        reps = n // self.batch
        out: list[Any] = []
        for e in self.slots:
            if e is None or e.past_values is None:
                out.append(None)
                continue
            k, v = e.past_keys, e.past_values
            if reps > 1:
                k, v = k.repeat(reps, *([1] * (k.ndim - 1))), v.repeat(reps, *([1] * (v.ndim - 1)))
            out.append(_Entry(k, v))
        return out
