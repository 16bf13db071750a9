"""Attaching hooks to a model without leaving a trace, one caller at a time.

Every apexlens feature that changes a forward pass does it through TransformerLens hook
points, and every such change goes through :func:`attached`. It adds the hooks in a new
hook *context level*, and removes exactly those hooks when the ``with`` block ends --
normally, on an exception, or on ``KeyboardInterrupt``. Hooks the user attached
themselves (at any level, permanent or not) are never removed or reordered.

**Threads.** Hooks live on the model, so two threads patching one model would see each
other's hooks. Every apexlens entry point holds the model's lock (:func:`model_lock`, a
re-entrant lock per model) while it runs: concurrent calls on one model are serialised and
each gets exactly the numbers it would get alone. Calls on different models run in parallel.
A forward pass *you* run in another thread, outside apexlens, is not covered: inside a
``with apexlens.patched(...)`` block, or while another thread is inside an apexlens call,
run your own forward passes in that block or wait for the call.

:func:`inference_mode` puts the model in eval mode without gradients for the duration of
a call and then restores every module's training flag exactly as the user had it.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from apexlens.errors import ApexlensError

HookFn = Callable[..., Any]
"""A TransformerLens hook: ``fn(activation, hook) -> activation | None``."""

Hooks = Sequence[tuple[str, HookFn]]
"""``(hook_name, fn)`` pairs, TransformerLens' ``fwd_hooks``."""

_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("apexlens_grad", default=False)
_ACTIVE: contextvars.ContextVar[frozenset[tuple[int, bool]]] = contextvars.ContextVar(
    "apexlens_inference", default=frozenset()
)
"""The ``(id(model), grad)`` of the :func:`inference_mode` blocks this context is inside."""

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The re-entrant lock apexlens holds on ``model`` while it attaches hooks or runs it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def attached(model: Any, fwd_hooks: Hooks) -> Iterator[Any]:
    """Attach ``fwd_hooks`` for the duration of a with-block, holding the model's lock.

    Unknown hook names raise an :class:`~apexlens.errors.ApexlensError` naming the hook
    before anything is attached.
    """
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None:
        for name, _ in fwd_hooks:
            if name not in hook_dict:
                raise ApexlensError(f"the model has no hook point named {name!r}")
    with model_lock(model), _hooks_of(model, list(fwd_hooks)):
        yield model


def _hooks_of(model: Any, fwd_hooks: list[tuple[str, HookFn]]) -> Any:
    """``model.hooks(fwd_hooks)``, or, for TransformerLens' own ``HookedRootModule.hooks``,
    the same context touching only the hook points given: its exit walks every hook point
    of the model (about as long as a forward of a two-layer toy model)."""
    own = _root_hooks()
    if own is None or getattr(type(model), "hooks", None) is not own or not hasattr(
        model, "mod_dict"
    ):
        return model.hooks(fwd_hooks=fwd_hooks)
    return _touched_hooks(model, fwd_hooks)


@functools.cache
def _root_hooks() -> Any:
    """``HookedRootModule.hooks``, looked up once (from ``transformer_lens``, where TL 3 and
    TL 4 both export it; its old ``hook_points`` path warns on every import in TL 3)."""
    try:
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - TransformerLens is a dependency
        return None
    return HookedRootModule.hooks


@contextmanager
def _touched_hooks(model: Any, fwd_hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
    """``HookedRootModule.hooks`` (same level bookkeeping, same removal of this level's
    non-permanent hooks, ``is_caching`` reset), removing from the touched hook points only."""
    model.context_level += 1
    level = model.context_level
    touched: dict[int, Any] = {}
    try:
        for name, fn in fwd_hooks:
            hp = model.mod_dict[name]
            touched[id(hp)] = hp
            hp.add_hook(fn, dir="fwd", level=level)
        yield
    finally:
        for hp in touched.values():
            hp.remove_hooks("fwd", including_permanent=False, level=level)
        model.is_caching = False
        model.context_level -= 1


@contextmanager
def inference_mode(model: Any, grad: bool = False) -> Iterator[Any]:
    """Eval mode, no gradients (``grad=True``: with them, for attribution) and the model's
    lock for the block.

    Every module's own training flag comes back afterwards exactly as it was -- a model in
    eval mode with its dropout modules in training mode (MC dropout) keeps that set-up --
    also after an exception or a ``KeyboardInterrupt``: the flags are restored in a
    ``finally`` that a second interrupt cannot cut short (it is re-raised afterwards).

    ``grad=True`` inside ``torch.inference_mode()`` raises one
    :class:`~apexlens.errors.ApexlensError`: no gradient can be taken there.
    """
    if grad and torch.is_inference_mode_enabled():
        raise ApexlensError(
            "this needs gradients, which torch.inference_mode() switches off: call it outside "
            "the torch.inference_mode() block (torch.no_grad() is fine: apexlens turns "
            "gradients on where it needs them)"
        )
    with model_lock(model):
        active = _ACTIVE.get()
        if (id(model), grad) in active and torch.is_grad_enabled() == grad:
            # inside a block of the same kind on this model: it set the flags and the grad
            # mode, and restores them (no second walk over the modules)
            yield model
            return
        modules = _all_modules(model) if isinstance(model, torch.nn.Module) else []
        flags = [m.training for m in modules]
        token = _GRAD.set(grad)
        inside = _ACTIVE.set(active | {(id(model), grad)})
        try:
            if any(flags):
                model.eval()
            with torch.enable_grad() if grad else torch.no_grad():
                yield model
        finally:  # the flags first: a second interrupt has the fewest steps to land in
            try:
                if any(flags):
                    _restore_flags(modules, flags)
            finally:
                _ACTIVE.reset(inside)
                _GRAD.reset(token)


def _all_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module of ``model`` once (``model.modules()`` without the names it builds)."""
    out: list[torch.nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


def grad_wanted() -> bool:
    """Whether the innermost :func:`inference_mode` asked for gradients (``grad=True``)."""
    return _GRAD.get()


def _restore_flags(modules: list[torch.nn.Module], flags: list[bool]) -> None:
    """Put every module's ``training`` flag back; an interrupt arriving meanwhile waits."""
    pending: BaseException | None = None
    i = 0
    while i < len(modules):
        try:
            while i < len(modules):
                modules[i].training = flags[i]
                i += 1
        except KeyboardInterrupt as err:  # finish the restore, then raise it
            pending = err
    if pending is not None:
        raise pending


def global_hooks() -> bool:
    """Whether a global module forward hook or pre-hook is registered (it sees every
    module's call)."""
    from torch.nn.modules import module as nn_module

    return bool(
        getattr(nn_module, "_global_forward_hooks", {})
        or getattr(nn_module, "_global_forward_pre_hooks", {})
    )


def any_hooks(module: torch.nn.Module) -> bool:
    """Whether a forward hook or pre-hook sits on ``module`` or any module inside it, or a
    global module hook on every module."""
    if global_hooks():
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@contextmanager
def silenced(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` with the forward hooks of its hook points switched off (call it
    while holding the model's lock: the engines do).

    apexlens calls pieces of the model (a norm, an MLP, a block's attention) on stacked rows
    of its own; the user's hooks on those pieces must not see them. Each hook point's
    registry of PyTorch forward hooks is swapped for an empty one and the *same* registry
    object is put back afterwards (also on exceptions), so the user's hooks come back
    unchanged and in order; nothing is added or removed. Hooks attached inside the block go
    to the empty registries and are gone with them.
    """
    from transformer_lens.hook_points import HookPoint

    saved: list[tuple[torch.nn.Module, Any]] = []
    try:
        for sub in module.modules():
            if isinstance(sub, HookPoint):
                saved.append((sub, sub._forward_hooks))
                sub._forward_hooks = OrderedDict()
        yield
    finally:
        for sub, hooks in saved:
            sub._forward_hooks = hooks


FLAGGED_HOOKS = {".hook_attn_in": "set_use_attn_in", ".hook_mlp_in": "set_use_hook_mlp_in"}
"""Hook points a ``HookedTransformer`` fires only with a config flag on (hook name suffix ->
the model's setter); a ``TransformerBridge`` has no such flags."""


@contextmanager
def firing(model: Any, names: Sequence[str]) -> Iterator[None]:
    """Make the hook points ``names`` fire for the block: on a ``HookedTransformer`` the flags
    of :data:`FLAGGED_HOOKS` that ``names`` need are switched on (holding the model's lock)
    and switched back off afterwards, also after an exception. Other names need nothing."""
    setters = [s for suffix, s in FLAGGED_HOOKS.items() if any(n.endswith(suffix) for n in names)]
    cfg = getattr(model, "cfg", None)
    flags = {"set_use_attn_in": "use_attn_in", "set_use_hook_mlp_in": "use_hook_mlp_in"}
    with model_lock(model):
        changed: list[str] = []
        try:
            for setter in setters:
                if hasattr(model, setter) and getattr(cfg, flags[setter], None) is False:
                    getattr(model, setter)(True)
                    changed.append(setter)
            yield
        finally:
            for setter in changed:
                getattr(model, setter)(False)


@contextmanager
def before_each_forward(
    model: Any, fn: Callable[[Any, tuple[Any, ...], dict[str, Any]], None]
) -> Iterator[None]:
    """Call ``fn(model, args, kwargs)`` before every forward pass of ``model`` in the block.

    TransformerLens' ``run_with_hooks`` calls ``model.forward`` directly (PyTorch's forward
    pre-hooks never see it), so the model's ``forward`` is wrapped for the block -- an
    attribute of this one instance, removed afterwards, also after an exception. ``fn`` may
    run the model again: its nested passes do not call ``fn``.
    """
    own = model.__dict__.get("forward")
    inner = model.forward
    depth = [0]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not depth[0]:
            depth[0] += 1
            try:
                fn(model, args, kwargs)
            finally:
                depth[0] -= 1
        return inner(*args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
