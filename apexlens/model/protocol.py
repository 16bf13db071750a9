"""The contract between apexlens and a model class: :class:`ModelAdapter`.

apexlens runs on TransformerLens' ``HookedTransformer`` and on ``TransformerBridge``. What
differs between them -- where the weights live, how a norm or an MLP is called, how blocks
run from a given residual stream, how a whole pass stops before ``ln_final`` -- is behind
this protocol, implemented by two sibling classes found by type
(:class:`~apexlens.model.hooked.HookedAdapter`,
:class:`~apexlens.model.bridged.BridgeAdapter`; :func:`apexlens.model.backend_for` asks each
whether it ``matches``). Everything both classes share (hook names, head algebra, the
unembedding's soft cap, caching) is written once, in :class:`apexlens.model.Backend`.

A new model class is one new adapter and one line in ``ADAPTERS``; a new architecture option
is a change here, in :mod:`apexlens.model`, and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from apexlens.model.hooks import Hooks

Norm = Callable[[Tensor], Tensor]
NormSite = str
"""``"ln1"``, ``"ln2"`` (in front of attention / the MLP), ``"ln1_post"``, ``"ln2_post"``
(after them, Gemma-2), ``"ln_final"``."""


class ModelAdapter(Protocol):
    """What apexlens needs from a model class (see the module docstring)."""

    model: Any
    name: str
    post_norms: bool
    """Norms after attention and after the MLP (Gemma-2)."""

    @staticmethod
    def matches(model: Any) -> bool:
        """Whether this adapter serves ``model``."""
        ...

    def attn_params(self, name: str) -> list[Tensor]:
        """``W_Q``/``W_K``/``W_V``/``W_O``/``b_*`` of each layer in ``hook_q/k/v`` slot layout,
        detached views of the model's parameters (a missing bias: zeros)."""
        ...

    def unembed_params(self) -> tuple[Tensor, Tensor]:
        """``W_U``, ``b_U`` (detached; a missing bias: zeros)."""
        ...

    def pos_embed_rows(self, n_pos: int) -> Tensor | None:
        """Shortformer models: the positional embedding added to every block's q/k input."""
        ...

    def norm(self, where: NormSite, layer: int | None = None) -> Norm:
        """The norm at ``where`` of block ``layer`` as a function (identity if absent), its
        hook points silenced."""
        ...

    def norm_inplace(self, where: NormSite, layer: int | None = None) -> Norm:
        """:meth:`norm` computed in its input's memory where it can be (the input is
        overwritten); outside autograd only."""
        ...

    def differentiable_norm(self, where: NormSite, layer: int | None = None) -> Norm:
        """:meth:`norm` that autograd can differentiate (for attribution)."""
        ...

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """MLP ``layer`` of an already-normalised input, position by position."""
        ...

    def mlp_input_edit(self, layer: int) -> tuple[str, Norm] | None:
        """``(hook, f)``: setting the hook to ``f(resid)`` makes MLP ``layer`` read ``resid``
        without touching the residual stream; ``None`` where there is no such point."""
        ...

    def unembed(self, x: Tensor) -> Tensor:
        """Full-vocabulary logits of an input already through ``ln_final`` (no soft cap)."""
        ...

    def run_blocks(
        self, resid: Tensor, start: int, stop: int, hooks: Hooks, past: Any = None
    ) -> Tensor:
        """Blocks ``start..stop-1`` from the residual stream entering ``start`` under
        ``hooks`` (hooks of other blocks do not fire); the residual leaving ``stop-1``.
        With ``past`` (a :meth:`prefix`), ``resid`` holds only the positions after it."""
        ...

    @property
    def runs_suffix(self) -> bool:
        """Whether :meth:`prefix` and ``run_blocks(..., past=)`` are available (exactly)."""
        ...

    def prefix(
        self, resid: Tensor, start: int, stop: int, hooks: Hooks = (), past: Any = None
    ) -> Any:
        """The keys/values blocks ``start..stop-1`` compute for the positions of ``resid``
        (the first positions of a run, or those after ``past``, an earlier prefix) under
        ``hooks``, for a later ``run_blocks(..., past=)``."""
        ...

    def forward(self, tokens: Tensor, hooks: Hooks, logits: bool) -> Tensor:
        """A whole pass under ``hooks``: logits, or (``logits=False``) the final residual
        stream before ``ln_final``."""
        ...
