"""Which logits a plain function metric reads -- found by tracing it, proven, never guessed.

:func:`traced_reads` calls the metric once on real logits ``x`` under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that follows every ATen operation and
a :class:`~torch.overrides.TorchFunctionMode` that watches for values leaving torch
(``.tolist()``, ``.numpy()``, ...). It returns a boolean mask of the elements of ``x`` the
result can depend on, or ``None`` when that cannot be proven.

Every tensor the metric computes is classified by what its values may depend on:

* an **alias** of ``x`` (a view: same storage) -- each element is one element of ``x``,
  known from the view's size, stride and offset;
* **tracked** -- each element depends on at most one element of ``x`` (its *coordinate*,
  ``-1`` for none), widened along the dimensions of ``x`` in its *spread* to the indices
  listed there (a softmax over the vocabulary depends on the whole row, a max over three
  columns on those three), and on elements already read;
* **tainted** -- depends only on elements already read;
* independent of ``x``.

Views, selections with constant indices (``index``, ``gather``, ``index_select``, ``take``,
masks...) and element-wise operations carry coordinates along (the same operation applied
to the coordinates); operations along a dimension (``softmax``, ``logsumexp``, ``max``,
``topk``, ``sort``, ``sum``...) widen the spread. Any other operation *reads* every element
its tracked arguments depend on and makes its outputs tainted; a value-dependent index
(``x[x.argmax()]``) reads everything it may select from. The metric's result is read at the
end. A comparison is an operation like any other, so ``torch.where(a > b, a, b)`` reads
both ``a`` and ``b`` whatever the comparison gives on these logits.

Nothing is proven -- ``None`` -- when control flow or a shape may depend on values: a
scalar taken out of a dependent tensor (``.item()``, ``float()``, ``if t:``), an operation
whose output shape depends on values (``nonzero``, ``unique``, a boolean mask computed from
the logits), values leaving torch, an operation the tracer cannot follow (tensor subclasses,
dtype reinterpretation), or any exception. Then the metric gets the full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class Unproven(Exception):
    """The trace cannot prove which elements are read (or every element is)."""


TRACE_ERRORS = (
    Unproven,
    ArithmeticError,
    AssertionError,
    AttributeError,
    LookupError,
    NotImplementedError,
    RuntimeError,
    TypeError,
    ValueError,
)
"""What ends a trace without a proof (the metric's own errors included: called plainly, it
raises them again where they belong)."""


Spread = dict[int, "Tensor | None"]
"""Dimensions of ``x`` along which a dependence widens -> the indices it may take there
(``None``: all of them)."""


class Dep:
    """What a tracked tensor's elements depend on: element ``e`` on the elements of ``x``
    that agree with ``coords[e]`` (a flat index; ``-1``: none) on every dimension not in
    ``spread`` and take one of its indices on those. An alias of ``x`` computes its
    coordinates from its view when asked."""

    __slots__ = ("_coords", "_view", "spread")

    def __init__(
        self,
        coords: Int[Tensor, "..."] | None,
        spread: Spread | None = None,
        view: Tensor | None = None,
    ):
        self._coords, self._view, self.spread = coords, view, dict(spread or {})

    @property
    def coords(self) -> Int[Tensor, "..."]:
        if self._coords is None:
            assert self._view is not None
            t = self._view
            coords = torch.full((), int(t.storage_offset()), dtype=torch.long, device=t.device)
            for size, stride in zip(t.shape, t.stride(), strict=True):
                coords = coords[..., None] + torch.arange(size, device=t.device) * stride
            self._coords = coords.reshape(t.shape)
        return self._coords


def merged(spreads: list[Spread], sizes: tuple[int, ...]) -> Spread:
    """The union of several spreads (per dimension, the union of their indices)."""
    out: Spread = {}
    for spread in spreads:
        for dim, idx in spread.items():
            if idx is None or (dim in out and out[dim] is None):
                out[dim] = None
                continue
            before = out.get(dim)
            both = torch.unique(idx if before is None else torch.cat([before, idx]))
            out[dim] = None if both.numel() >= sizes[dim] else both
    return out


ESCAPES = {
    Tensor.tolist,
    Tensor.numpy,
    Tensor.__array__,
    Tensor.__dlpack__,
    Tensor.data_ptr,
    Tensor.untyped_storage,
    Tensor.storage,
    Tensor._typed_storage,
    Tensor.__reduce_ex__,
}
"""Tensor methods whose values leave torch (read outside the dispatcher)."""

SELECT = {
    aten.index.Tensor,
    aten._unsafe_index.Tensor,
    aten.index_select.default,
    aten.gather.default,
    aten.take.default,
    aten.masked_select.default,
}
"""Selections: output elements are input elements picked by index arguments."""

STRUCTURAL = {
    aten._unsafe_view.default,
    aten.cat.default,
    aten.stack.default,
    aten.flip.default,
    aten.roll.default,
    aten.repeat.default,
    aten.narrow_copy.default,
    aten.select_copy.int,
    aten.slice_copy.Tensor,
    aten.permute_copy.default,
    aten.expand_copy.default,
    aten.view_copy.default,
    aten.transpose_copy.int,
    aten.unsqueeze_copy.default,
    aten.squeeze_copy.dim,
    aten.t_copy.default,
}
"""Rearrangements: output elements are input elements, placed by non-tensor arguments."""

CONDITIONAL = {aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor}
"""Element-wise choices between branches by a condition."""

SAME_COORDS = {aten._to_copy.default, aten.clone.default, aten.lift_fresh_copy.default}
"""Element by element copies (a dtype or device change)."""

ALONG = {
    aten._softmax.default,
    aten._log_softmax.default,
    aten.topk.default,
    aten.sort.default,
    aten.sort.stable,
    aten.cumsum.default,
    aten.cumprod.default,
    aten.cummax.default,
    aten.cummin.default,
    aten.logcumsumexp.default,
    aten.kthvalue.default,
    aten.median.dim,
    aten.mode.default,
}
"""Along-a-dimension operations besides reductions: each output element depends on the
input elements along ``dim`` at its place."""

SHAPE_ONLY = {
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.randint_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
}
"""Operations that use an input's shape, never its values."""

STORAGE_VIEWS = {
    aten.as_strided.default,
    aten._reshape_alias.default,
    aten.view.dtype,
    aten.view_as_real.default,
    aten.view_as_complex.default,
    aten.set_.source_Tensor,
}
"""Views defined by storage layout or dtype: coordinates do not follow them."""


def traced_reads(
    fn: Callable[[Tensor], Any], x: Tensor
) -> Bool[Tensor, "*shape"] | None:
    """The elements of ``x`` that ``fn(x)`` can depend on, proven by tracing one call (on a
    private copy of ``x``); ``None`` when that cannot be proven or every element is read."""
    tracer = Tracer(x.detach().clone(memory_format=torch.contiguous_format))
    try:
        with tracer.active():
            out = fn(tracer.x)
        if not isinstance(out, Tensor):
            return None
        tracer.read_all_of(out)
    except TRACE_ERRORS:  # anything unproven gets the full logits
        return None
    return tracer.read.view(x.shape)


class Tracer:
    """The state of one trace: the input, what each tensor depends on, what is read."""

    def __init__(self, x: Tensor):
        self.x = x
        self.ptr = _storage(x)
        self.read = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
        self.deps: dict[int, tuple[Tensor, Dep]] = {}  # id -> (the tensor, kept alive)
        self.tainted: set[int] = set()  # storages of values computed from reads
        self.keep: list[Tensor] = []  # keeps tainted storages alive (no address reuse)
        self.shape = tuple(int(n) for n in x.shape)
        strides = [1]
        for size in reversed(self.shape[1:]):
            strides.insert(0, strides[0] * size)
        self.strides = torch.tensor(strides, device=x.device)
        self.sizes = torch.tensor(self.shape, device=x.device)

    @contextmanager
    def active(self) -> Iterator[None]:
        with _Escapes(self), _Dispatch(self):
            yield

    # ------------------------------------------------------------------ classification
    def dep(self, t: Tensor) -> Dep | bool:
        """``t``'s dependence: a :class:`Dep`, ``True`` (tainted) or ``False`` (independent)."""
        if type(t) is not Tensor and not isinstance(t, torch.nn.Parameter):
            raise Unproven(f"a tensor subclass {type(t).__name__}")
        if t.layout != torch.strided:
            raise Unproven(f"a {t.layout} tensor")
        ptr = _storage(t)
        if ptr == self.ptr:
            if t.dtype != self.x.dtype:
                raise Unproven("the logits reinterpreted as another dtype")
            return Dep(None, view=t)
        entry = self.deps.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        return ptr in self.tainted

    def depends(self, t: Any) -> bool:
        return isinstance(t, Tensor) and self.dep(t) is not False

    def is_alias(self, t: Any) -> bool:
        """An alias of the input in its own dtype (a view: nothing read yet)."""
        return isinstance(t, Tensor) and _storage(t) == self.ptr and t.dtype == self.x.dtype

    # ------------------------------------------------------------------ reads and results
    def read_dep(self, d: Dep | bool) -> None:
        """Mark what ``d`` depends on as read."""
        if not isinstance(d, Dep):
            return
        coords = d.coords.flatten()
        coords = coords[coords >= 0]
        if not coords.numel():
            return
        mask = torch.zeros_like(self.read)
        mask[coords] = True
        if d.spread:
            grid = mask.view(self.shape)
            for dim, idx in sorted(d.spread.items(), key=lambda kv: kv[0]):
                line = grid.any(dim, keepdim=True)
                if idx is not None:
                    at = torch.zeros(self.shape[dim], dtype=torch.bool, device=grid.device)
                    at[idx] = True
                    line = line & at.view([-1 if i == dim else 1 for i in range(grid.ndim)])
                grid = grid | line
            mask = grid.reshape(-1)
        self.read |= mask
        if bool(self.read.all()):
            raise Unproven("every logit is read")

    def read_all_of(self, *tensors: Any) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self.read_dep(self.dep(t))

    def read_and_taint(self, deps: list[Any], out: Any) -> None:
        """The general case: every dependence of the inputs is read, the outputs tainted."""
        for d in deps:
            self.read_dep(d)
        self.taint(out)

    def taint(self, out: Any) -> None:
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.numel() and _storage(t) != self.ptr:
                self.tainted.add(_storage(t))
                self.keep.append(t)

    def track(self, t: Tensor, d: Dep) -> None:
        if tuple(d.coords.shape) != tuple(t.shape):
            raise Unproven("coordinates lost track of a shape")  # never expected
        if _storage(t) == self.ptr:
            return  # an alias of the input: its coordinates come from its view
        self.deps[id(t)] = (t, d)

    def unravel(self, coords: Tensor) -> Int[Tensor, "... ndim"]:
        """Flat indices -> indices along each dimension of ``x`` (``-1`` stays ``-1``)."""
        pos = coords[..., None] // self.strides % self.sizes
        return pos.masked_fill(coords[..., None] < 0, -1)

    def joint(self, deps: list[Dep]) -> Spread:
        """The spread of elements that come from any of ``deps``: the union of theirs, each
        dimension's indices including those a dependence has there without spreading."""
        spread = merged([d.spread for d in deps], self.shape)
        extra: Spread = {}
        for dim, idx in spread.items():
            if idx is None:
                continue
            own = [
                self.unravel(d.coords)[..., dim][d.coords >= 0]
                for d in deps
                if dim not in d.spread
            ]
            extra[dim] = torch.unique(torch.cat([idx, *own]))
        return merged([spread, extra], self.shape)

    def merge(self, found: list[tuple[Tensor, Dep]], shape: torch.Size) -> Dep | None:
        """One dependence for element-wise results of several tracked tensors (broadcast to
        ``shape``), or ``None`` where their coordinates disagree outside their spread."""
        spread = self.joint([d for _, d in found])
        coords = found[0][1].coords.expand(shape)
        keep = [i for i in range(len(self.shape)) if i not in spread]
        for _, d in found[1:]:
            other = d.coords.expand(shape)
            both = (coords >= 0) & (other >= 0)
            agree = (self.unravel(coords)[..., keep] == self.unravel(other)[..., keep]).all(-1)
            if not bool((agree | ~both).all()):
                return None
            coords = torch.where(coords >= 0, coords, other)
        return Dep(coords.contiguous(), spread)


def _storage(t: Tensor) -> int:
    storage = t.untyped_storage()
    return int(storage.data_ptr()) if storage.nbytes() else 0


class _Escapes(TorchFunctionMode):
    """Values leaving torch (``.tolist()``, ``.numpy()``...) from a dependent tensor."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in ESCAPES and any(
            self.tracer.depends(a) for a in pytree.tree_leaves((args, kwargs))
        ):
            raise Unproven(f"values of the logits leave torch through {func.__name__}")
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    """Every ATen operation: run it, then account for what its outputs depend on."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.t = tracer

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = pytree.tree_leaves(out)
        if outs and all(self.t.is_alias(o) for o in outs) and _is_view(func):
            return out  # a view of the input: its coordinates come from its strides
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        deps = [self.t.dep(a) for a in tensors]
        if func in SHAPE_ONLY or not any(d is not False for d in deps):
            return out
        account(self.t, Op(func, args, kwargs, out, tensors, deps))
        return out


def _is_view(func: Any) -> bool:
    schema = func._schema
    return any(r.alias_info is not None for r in schema.returns) and not any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
    )


@dataclass
class Op:
    """One ATen call that involves the logits: the operation, its arguments and outputs,
    and the dependence of each tensor argument (in the order ``pytree`` lists them)."""

    func: Any
    args: Any
    kwargs: Any
    out: Any
    tensors: list[Tensor]
    deps: list[Dep | bool]

    def tracked(self) -> list[tuple[Tensor, Dep]]:
        return [(a, d) for a, d in zip(self.tensors, self.deps, strict=True) if isinstance(d, Dep)]

    @property
    def any_tainted(self) -> bool:
        return any(d is True for d in self.deps)


def account(t: Tracer, op: Op) -> None:
    """Record what an operation's outputs depend on (some input depends on the logits)."""
    func = op.func
    outs = pytree.tree_leaves(op.out)
    if torch.Tag.data_dependent_output in func.tags or any(
        not isinstance(o, Tensor) and o is not None for o in outs
    ):
        raise Unproven(f"{func} takes a value out of the logits (control flow on values)")
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        t.read_and_taint(op.deps, op.out)  # in place: all involved is read, the result tainted
    elif func in STORAGE_VIEWS:
        raise Unproven(f"{func} reinterprets storage")
    elif _is_view(func) or func in STRUCTURAL or func in SAME_COORDS:
        _rearranged(t, op)
    elif func in SELECT:
        _selected(t, op)
    elif torch.Tag.dynamic_output_shape in func.tags:
        raise Unproven(f"the shape of {func}'s output depends on the logits")
    elif func in CONDITIONAL:
        _conditional(t, op)
    elif torch.Tag.pointwise in func.tags:
        _pointwise(t, op)
    elif func in ALONG or torch.Tag.reduction in func.tags:
        _along(t, op)
    else:
        t.read_and_taint(op.deps, op.out)


def _rearranged(t: Tracer, op: Op) -> None:
    """Views, copies and rearrangements: the same operation applied to the coordinates."""
    found = op.tracked()
    if found:
        spread = t.joint([d for _, d in found])
        if op.func in SAME_COORDS:
            coords: Any = found[0][1].coords
        else:
            swap = {
                id(a): d.coords if isinstance(d, Dep) else torch.full_like(a, -1, dtype=torch.long)
                for a, d in zip(op.tensors, op.deps, strict=True)
            }
            c_args, c_kwargs = pytree.tree_map_only(
                Tensor, lambda a: swap[id(a)], (op.args, op.kwargs)
            )
            coords = op.func(*c_args, **c_kwargs)
        pairs = zip(pytree.tree_leaves(op.out), pytree.tree_leaves(coords), strict=True)
        for o, c in pairs:
            if isinstance(o, Tensor):
                t.track(o, Dep(c, spread))
    if op.any_tainted:
        t.taint(op.out)  # (a view of a tainted tensor shares its storage: tainted already)


def _selected(t: Tracer, op: Op) -> None:
    """Selections: with indices independent of the logits, the selected coordinates; with
    value-dependent indices, everything they may select from (a value-dependent boolean mask
    makes the shape depend on values: unproven)."""
    data = op.args[0]
    data_dep = t.dep(data)
    index_deps = [(a, d) for a, d in zip(op.tensors, op.deps, strict=True) if a is not data]
    if any(d is not False for _, d in index_deps):
        if op.func is aten.masked_select.default or any(
            d is not False and a.dtype in (torch.bool, torch.uint8) for a, d in index_deps
        ):
            raise Unproven("a boolean mask computed from the logits")
        t.read_and_taint(op.deps, op.out)
    elif isinstance(data_dep, Dep):
        coords = op.func(data_dep.coords, *op.args[1:], **op.kwargs)
        t.track(op.out, Dep(coords, data_dep.spread))
    else:
        t.taint(op.out)


def _conditional(t: Tracer, op: Op) -> None:
    """``where(cond, a, b)`` and ``masked_fill(a, mask, v)`` with a condition independent of
    the logits: each element takes its coordinates from the branch it comes from."""
    bound = _bind(op.func, op.args, op.kwargs)
    if op.func is aten.where.self:
        cond, branches = bound["condition"], (bound["self"], bound["other"])
    else:
        cond, branches = bound["mask"], (bound.get("value"), bound["self"])
    if t.depends(cond) or not isinstance(op.out, Tensor):
        _pointwise(t, op)
        return
    shape = op.out.shape
    coords, deps = [], []
    for branch in branches:
        d = t.dep(branch) if isinstance(branch, Tensor) else False
        if isinstance(d, Dep):
            coords.append(d.coords.expand(shape))
            deps.append(d)
        else:
            coords.append(torch.full(shape, -1, dtype=torch.long, device=op.out.device))
    chosen = torch.where(cond.to(coords[0].device).expand(shape), coords[0], coords[1])
    t.track(op.out, Dep(chosen.contiguous(), t.joint(deps)))
    if op.any_tainted:
        t.taint(op.out)


def _pointwise(t: Tracer, op: Op) -> None:
    """Element-wise: each output element depends on the inputs' elements at its place;
    coordinates that agree (up to their spread) merge, others are read."""
    found = op.tracked()
    dep = t.merge(found, op.out.shape) if found and isinstance(op.out, Tensor) else None
    if dep is None:
        t.read_and_taint(op.deps, op.out)
        return
    t.track(op.out, dep)
    if op.any_tainted:
        t.taint(op.out)


def _along(t: Tracer, op: Op) -> None:
    """Along dimensions (softmax, sort, reductions): each output element depends on the input
    elements along the reduced dimensions at its place -- the spread widens to the indices
    they take along each dimension of the logits where they differ."""
    src = op.args[0]
    d = t.dep(src)
    if not isinstance(d, Dep) or any(isinstance(e, Dep) for e in op.deps[1:]):
        t.read_and_taint(op.deps, op.out)
        return
    dims = _dims(_bind(op.func, op.args, op.kwargs).get("dim"), src.ndim)
    coords = d.coords
    outs = [o for o in pytree.tree_leaves(op.out) if isinstance(o, Tensor)]
    reps = [_representative(coords, dims, o.shape) for o in outs]
    if not coords.numel() or any(r is None for r in reps):
        t.read_and_taint(op.deps, op.out)
        return
    rep = coords.amax(dim=dims, keepdim=True) if dims else coords
    pos, at_rep = t.unravel(coords), t.unravel(rep)
    valid = (coords >= 0)[..., None]
    differs = ((pos != at_rep) & valid).reshape(-1, len(t.shape)).any(0)
    widened = {
        i: torch.unique(pos[..., i][coords >= 0])
        for i in range(len(t.shape))
        if bool(differs[i])
    }
    spread = merged([d.spread, widened], t.shape)
    for o, r in zip(outs, reps, strict=True):
        assert r is not None
        t.track(o, Dep(r, spread))
    if op.any_tainted:
        t.taint(op.out)


def _representative(coords: Tensor, dims: list[int], shape: torch.Size) -> Tensor | None:
    """Coordinates of an along-dimension output of ``shape``: per place, the largest
    coordinate along the reduced dimensions (it stands for all of them, given the spread)."""
    if not dims:
        return coords if tuple(coords.shape) == tuple(shape) else None
    kept = coords.amax(dim=dims, keepdim=True)
    for option in (kept, kept.squeeze(dims)):
        if tuple(option.shape) == tuple(shape):
            return option.contiguous()
    full = kept.expand(coords.shape)
    if tuple(full.shape) == tuple(shape):
        return full.contiguous()  # softmax, sort, cumsum: the input's shape
    if len(dims) == 1 and full.ndim == len(shape):
        narrowed = full.narrow(dims[0], 0, min(shape[dims[0]], full.shape[dims[0]]))
        if tuple(narrowed.shape) == tuple(shape):
            return narrowed.contiguous()  # topk, kthvalue with keepdim
    return None


def _bind(func: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    """``func``'s arguments by name, defaults included."""
    schema = func._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update({a.name: v for a, v in zip(schema.arguments, args, strict=False)})
    bound.update(kwargs)
    return bound


def _dims(dim: Any, ndim: int) -> list[int]:
    """The reduced dimensions, non-negative (``None`` or ``[]``: all)."""
    if ndim == 0:
        return []
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({int(x) % ndim for x in dims})
