"""The adapter for TransformerLens' ``TransformerBridge`` (TL >= 3.9, the only class in TL 4).

One of two sibling adapters (:mod:`apexlens.model.hooked` is the other), each implementing the
contract :class:`apexlens.model.protocol.ModelAdapter`; :func:`apexlens.model.backend_for` picks
one by the model's type. A bridge over a Hugging Face model (GPT-2, GPT-NeoX, Llama, Qwen2,
Gemma-2, ...) exposes the HookedTransformer hook names without compatibility mode, its HF
weights per head (``W_K``/``W_V`` per key/value head), and no bias where the model has none
(zeros here); a bridge from :func:`apexlens.model.convert.to_bridge` runs in compatibility mode.

2. :class:`BridgeBackend` -- the :class:`~apexlens.model.backend.Backend` for a bridge. What differs
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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model.dims import Dims
from apexlens.model.hooks import (
    HookFn,
    Hooks,
    attached,
    grad_wanted,
    inference_mode,
    model_lock,
    silenced,
)


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients for the call (a bridge boots in training mode) and the
    model's lock; gradients stay on only inside ``inference_mode(grad=True)`` (attribution
    differentiates through these pieces).

    ``bridge.eval()``/``train()`` walk ~1000 module visits on a 3-layer bridge (milliseconds);
    when no module is training they are skipped.
    """
    grad = grad_wanted() and torch.is_grad_enabled()
    if any(m.training for m in model.modules()):
        with inference_mode(model, grad=grad):
            yield
    else:
        with model_lock(model), torch.set_grad_enabled(grad):
            yield


class BridgeAdapter:
    """:class:`~apexlens.model.protocol.ModelAdapter` of a ``TransformerBridge``, with or
    without compatibility mode."""

    name = "TransformerBridge"

    def __init__(self, model: Any, dims: Dims) -> None:
        self.model, self.dims = model, dims
        self.post_norms = hasattr(model.blocks[0], "ln1_post") or bool(
            getattr(model.cfg, "use_normalization_before_and_after", False)
        )
        self._inputs: dict[int, dict[int, tuple[tuple[Any, ...], dict[str, Any]]]] = {}

    @staticmethod
    def matches(model: Any) -> bool:
        from apexlens.model.convert import is_bridge

        return is_bridge(model)

    # ------------------------------------------------------------------ weights
    # The bridge assembles these from its modules on each access; detach so a no-grad caller
    # never holds an autograd graph over the model's parameters.
    def _weight(self, name: str) -> Tensor | None:
        try:
            w = getattr(self.model, name)
        except (AttributeError, TypeError, RuntimeError):
            w = None
        return None if w is None else w.detach()

    def attn_params(self, name: str) -> list[Tensor]:
        """Attention weight ``name`` of each layer (the bridge's assembled stacks, split);
        a bias the model does not have is zeros."""
        w = self._weight(name)
        if w is None:
            if not name.startswith("b_"):
                raise ApexlensError(f"this TransformerBridge exposes no {name}")
            d = self.dims
            shape = {"b_O": (d.d_model,), "b_Q": (d.n_heads, d.d_head)}.get(
                name, (d.kv_heads, d.d_head)
            )
            W_U = self.model.W_U
            return [
                torch.zeros(shape, dtype=W_U.dtype, device=W_U.device) for _ in range(d.n_layers)
            ]
        return list(w.unbind(0))

    def unembed_params(self) -> tuple[Tensor, Tensor]:
        W_U = self.model.W_U.detach()
        b = self._weight("b_U")
        zeros = torch.zeros(W_U.shape[-1], dtype=W_U.dtype, device=W_U.device)
        return W_U, zeros if b is None else b

    def pos_embed_rows(self, n_pos: int) -> Tensor | None:
        return None  # no shortformer bridges: to_bridge refuses the option by name

    # ------------------------------------------------------------------ pieces
    def _module(self, where: str, layer: int | None) -> Any:
        if where == "ln_final":
            return getattr(self.model, "ln_final", None)
        assert layer is not None
        return getattr(self.model.blocks[layer], where, None)

    def _call(self, module: Any, x: Tensor) -> Tensor:
        if module is None:
            return x
        with _inference(self.model), silenced(module):
            return module(x)

    def norm(self, where: str, layer: int | None = None) -> Callable[[Tensor], Tensor]:
        module = self._module(where, layer)
        return lambda x: self._call(module, x)

    norm_inplace = norm  # the bridge's norms always make a fresh output

    def differentiable_norm(
        self, where: str, layer: int | None = None
    ) -> Callable[[Tensor], Tensor]:
        module = self._module(where, layer)
        if module is None:
            return lambda x: x

        def f(x: Tensor) -> Tensor:
            with silenced(module):
                return module(x)

        return f

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        shape = x.shape
        out = self._call(self.model.blocks[layer].mlp, x.reshape(1, -1, shape[-1]))
        return out.reshape(shape)

    def mlp_input_edit(self, layer: int) -> tuple[str, Callable[[Tensor], Tensor]] | None:
        return None  # ``hook_resid_mid`` is the MLP's input hook: the output is recomputed

    def unembed(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return self._call(self.model.unembed, x)

    # ------------------------------------------------------------------ runs
    runs_suffix = False
    """A bridge's blocks are the Hugging Face modules, whose key/value caches differ by
    architecture and ``transformers`` version: position-restricted runs fall back to every
    position there (the same numbers, without the saving)."""

    def prefix(
        self, resid: Tensor, start: int, stop: int, hooks: Hooks = (), past: Any = None
    ) -> Any:
        raise ApexlensError("a TransformerBridge has no position-restricted runs (runs_suffix)")

    def run_blocks(
        self, resid: Tensor, start: int, stop: int, hooks: Hooks, past: Any = None
    ) -> Tensor:
        """Blocks ``start..stop-1`` called one after the other (the bridge's own
        ``start_at_layer`` would also run, and fire the hooks of, blocks ``0..start-1``),
        each with the extra inputs the model's own forward hands it (attention mask, rotary
        embeddings, ...; see :meth:`_block_inputs`). ``past`` is never given (no
        :attr:`runs_suffix`)."""
        if past is not None:
            raise ApexlensError("a TransformerBridge has no position-restricted runs")
        inputs = self._block_inputs(resid.shape[1])
        n = resid.shape[0]
        with _inference(self.model), attached(self.model, _named_hooks(hooks)):
            for layer in range(start, stop):
                args, kwargs = inputs[layer]
                out = self.model.blocks[layer](
                    resid,
                    *(_for_rows(a, n) for a in args),
                    **{k: _for_rows(v, n) for k, v in kwargs.items()},
                )
                resid = out[0] if isinstance(out, tuple) else out
        return resid

    def _block_inputs(self, n_pos: int) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
        """What the model's own forward hands every block besides the residual stream, for
        sequences of ``n_pos`` tokens, recorded once (a silent forward pass of two identical
        rows, every hook point switched off). Key/value caches are dropped; tensors with a
        batch axis are later expanded to the rows being run (:func:`_for_rows`)."""
        if n_pos in self._inputs:
            return self._inputs[n_pos]
        record: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def grab(layer: int) -> Any:
            def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                record.setdefault(layer, (tuple(args[1:]), dict(kwargs)))

            return pre

        tok = getattr(getattr(self.model, "tokenizer", None), "pad_token_id", None)
        fill = 1 if tok is None else (int(tok) + 1) % int(self.model.cfg.d_vocab)
        tokens = torch.full((2, n_pos), fill, dtype=torch.long, device=self.model.W_U.device)
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
        self._inputs[n_pos] = {la: (_strip(a), _strip(k)) for la, (a, k) in record.items()}
        return self._inputs[n_pos]

    def forward(self, tokens: Int[Tensor, "batch pos"], hooks: Hooks, logits: bool) -> Tensor:
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
    attached through :class:`BridgeAdapter` see the name they were attached with, as on a
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

