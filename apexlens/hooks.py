"""Attaching hooks to a model without leaving a trace.

Every apexlens feature that changes a forward pass does it through TransformerLens hook
points, and every such change goes through :func:`attached`. It adds the hooks in a new
hook *context level*, and removes exactly those hooks when the ``with`` block ends --
normally, on an exception, or on ``KeyboardInterrupt``. Hooks the user attached
themselves (at any level, permanent or not) are never removed or reordered.

:func:`inference_mode` puts the model in eval mode without gradients for the duration of
a call and then restores whatever training flag the user had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

HookFn = Callable[..., Any]
"""A TransformerLens hook: ``fn(activation, hook) -> activation | None``."""


@contextmanager
def attached(model: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[Any]:
    """Attach ``fwd_hooks`` (``(hook_name, fn)`` pairs) for the duration of a with-block.

    Unknown hook names raise a ``KeyError`` naming the hook before anything is attached.
    """
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None:
        for name, _ in fwd_hooks:
            if name not in hook_dict:
                raise KeyError(f"the model has no hook point named {name!r}")
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        yield model


@contextmanager
def inference_mode(model: Any) -> Iterator[Any]:
    """Eval mode and no gradients for the block; the user's training flag comes back after."""
    was_training = bool(getattr(model, "training", False))
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
