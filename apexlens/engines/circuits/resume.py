"""A circuit pass resumed from the first layer a new hypothesis changes (the workbench's toggle).

In a circuit run (:mod:`~apexlens.engines.circuits.plan`) a receiver reads ``resid - sum over
its excluded senders D[s]``: what it reads depends on its own column of the keep-matrix and
on what the senders before it computed, which in turn depends only on the columns of the
receivers before them. So when hypothesis B differs from the hypothesis A evaluated last (on
the same examples, ablation values and weights) only in columns of receivers at layer ``L``
or later, everything B's pass computes before block ``L`` is what A's pass computed: the
residual stream entering block ``L``, the sender-buffer slots of every sender before it, and
their running total. :class:`Checkpoints` keeps those from the last pass and runs B from
block ``L`` on (``L = n_layers``: the logits' read alone). The resumed pass runs the same
hooks with the same operations on the same inputs as a whole pass of B: its final residual
stream is bit-for-bit the whole pass's, on every model class
(``tests/test_circuit_resume.py``), so :meth:`apexlens.Experiment.evaluate_circuit`'s numbers
are unchanged by it. A toggle of an edge into layer ``L`` costs ``(n_layers - L) / n_layers``
of a pass; into the logits, one read; re-evaluating the last hypothesis, nothing.

Memory (bounded, one set per cached runs): one sender buffer and read workspace of its own
(other circuit passes on the same runs keep using theirs, so a weighing or a fully ablated
pass between two toggles does not overwrite it) and the residual stream and running total
entering every block, ``2 (n_layers + 1)`` residual streams: about 90 MB for GPT-2 small at
8 x 16 tokens. Used only where the pass runs as one chunk in
one process without autograd (:func:`apexlens.engines.circuits.circuit_final`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from apexlens.engines.circuits.buffer import SenderBuffer
from apexlens.engines.circuits.plan import CircuitPlan
from apexlens.model import Backend
from apexlens.model.hooks import HookFn
from apexlens.runs.ablation import AblationValues
from apexlens.runs.rows import run_tokens
from apexlens.vocab.edges import EdgeIndex

KEY = "circuit-resume"
"""Where the :class:`Checkpoints` of a cached run live (:attr:`apexlens.runs.Runs.scratch`)."""


def receiver_layers(index: EdgeIndex) -> Tensor:
    """The block each receiver column is read in (``n_layers`` for the logits)."""
    n = index.dims.n_layers
    return torch.tensor([n if r.kind == "logits" else r.layer for r in index.receivers])


class Checkpoints:
    """The last circuit pass on one cached run, at every block boundary (module docstring)."""

    def __init__(self) -> None:
        self.scratch: dict[str, Any] = {}  # the sender buffer's memory (SenderBuffer's scratch)
        self.key: tuple[Any, ...] | None = None
        self.refs: tuple[Any, ...] = ()  # held, so that their ids are never another object's
        self.keep: Tensor | None = None  # None: nothing valid kept
        self.layers: Tensor | None = None
        self.resid: Tensor | None = None  # [n_layers + 1, batch, pos, d_model]
        self.totals: Tensor | None = None  # the buffer's running total, at the same points
        self.final: Tensor | None = None
        self.passes = {"whole": 0, "resumed": 0, "logits": 0, "same": 0}
        """How each evaluation ran (for benchmarks and tests)."""

    def start_layer(self, key: tuple[Any, ...], refs: tuple[Any, ...], keep: Tensor) -> int:
        """The first block the pass of ``keep`` must run: 0 where nothing kept can be reused,
        ``n_layers`` where only the logits' read changed, ``n_layers + 1`` for the last
        hypothesis itself."""
        old = self.keep
        if (
            old is None
            or self.key != key
            or len(refs) != len(self.refs)
            or any(a is not b for a, b in zip(refs, self.refs, strict=True))
            or old.shape != keep.shape
            or not any(k.startswith("sender_buffer") for k in self.scratch)
        ):
            return 0
        changed = old != keep
        cols = changed.flatten(2).any(-1).any(0) if changed.ndim > 2 else changed.any(0)
        index: EdgeIndex = refs[0]
        if self.layers is None or len(self.layers) != len(index.receivers):
            self.layers = receiver_layers(index)
        if not bool(cols.any()):
            return index.dims.n_layers + 1
        return int(self.layers[cols].min())

    def memory(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        """The checkpoints' memory, ``shape`` = ``[n_layers + 1, batch, pos, d_model]``."""
        r = self.resid
        if r is None or tuple(r.shape) != shape or r.dtype != dtype or r.device != device:
            self.resid = torch.empty(shape, dtype=dtype, device=device)
            self.totals = torch.empty(shape, dtype=dtype, device=device)


def resumed_final(
    scratch: dict[str, Any],
    plan: CircuitPlan,
    tokens: Tensor,
    keep: Bool[Tensor, "sender receiver"] | Bool[Tensor, "sender receiver pos"],
    abl: AblationValues,
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream of ``tokens`` under ``plan`` (the plan of ``keep``), equal
    bit-for-bit to ``run_tokens(bk, tokens, plan.hooks(abl, ...))``, resumed from the first
    block whose receivers ``keep`` changes against the last pass kept in ``scratch``.
    Outside autograd only (a pass under autograd keeps no buffer memory to resume from)."""
    assert not torch.is_grad_enabled(), "resumed passes run outside autograd"
    bk = plan.bk
    cp: Checkpoints = scratch.setdefault(KEY, Checkpoints())
    keep = keep.cpu()
    key = (tuple(tokens.shape), bk.dtype, str(bk.device), bk.weights_key(), plan.total)
    refs = (plan.index, abl, tokens)
    n = bk.dims.n_layers
    start = cp.start_layer(key, refs, keep)
    if start > n:
        assert cp.final is not None
        cp.passes["same"] += 1
        return cp.final.clone()
    cp.keep = None  # nothing valid kept until this pass completes
    if start == n:
        final = _logits_only(cp, plan, abl)
        cp.passes["logits"] += 1
    else:
        cp.memory((n + 1, *tokens.shape, bk.dims.d_model), bk.dtype, bk.device)
        p = plan.open(abl, cp.scratch)
        hooks = [*_recording(cp, bk, p.buf, plan.total, start, n), *p.hooks()]
        if start == 0:
            final = run_tokens(bk, tokens, hooks)
            cp.passes["whole"] += 1
        else:
            assert cp.resid is not None
            hooks.insert(0, (bk.resid_pre(start), _resume(cp, p.buf, plan, start)))
            final = bk.run_layers(cp.resid[start].clone(), start, n, hooks)
            cp.passes["resumed"] += 1
    cp.keep, cp.key, cp.refs, cp.final = keep.clone(), key, refs, final
    return final.clone()


def _recording(
    cp: Checkpoints, bk: Backend, buf: SenderBuffer, total: bool, start: int, n: int
) -> list[tuple[str, HookFn]]:
    """Hooks keeping the residual stream (and the running total) entering blocks
    ``max(start, 1)..n-1`` and leaving the last one (before the logits' read, which comes
    after them: these are attached first)."""

    def at(i: int) -> HookFn:
        def hook(act: Tensor, hook: Any) -> None:
            assert cp.resid is not None and cp.totals is not None and buf.D is not None
            cp.resid[i].copy_(act)
            if total:
                cp.totals[i].copy_(buf.D[:, :, SenderBuffer.TOTAL])

        return hook

    out = [(bk.resid_pre(i), at(i)) for i in range(max(start, 1), n)]
    return [*out, (bk.resid_post(n - 1), at(n))]


def _resume(cp: Checkpoints, buf: SenderBuffer, plan: CircuitPlan, start: int) -> HookFn:
    """The first hook of a pass resumed at block ``start``: the sender buffer over the kept
    memory, holding every sender before the block, and the running total there."""
    first = plan.index.head_sender[start].start

    def hook(act: Tensor, hook: Any) -> None:
        _reopen(cp, buf, act, first, start, plan.total)

    return hook


def _reopen(
    cp: Checkpoints, buf: SenderBuffer, like: Tensor, filled: int, at: int, total: bool
) -> None:
    """``buf`` started over the kept memory with its first ``filled`` senders (and the
    running total, from the checkpoint ``at``) as the last pass left them."""
    kept = dict(cp.scratch)  # held: an entry start() replaced is not this object any more
    buf.start(like)  # decides the buffer's layout (slot_major), hence its entry
    name = "sender_buffer:slot" if buf.slot_major else "sender_buffer"
    mem = cp.scratch.get(name)
    assert mem is not None and kept.get(name) is mem, "a resumed pass reads the kept sender buffer"
    buf.filled = filled
    if total:
        assert buf.D is not None and cp.totals is not None
        buf.D[:, :, SenderBuffer.TOTAL].copy_(cp.totals[at])


def _logits_only(cp: Checkpoints, plan: CircuitPlan, abl: AblationValues) -> Tensor:
    """The final residual stream where only the logits' exclusions changed: their read
    over the kept buffer (the operations of the logits hook), or the kept stream."""
    assert cp.resid is not None
    n = plan.bk.dims.n_layers
    raw = cp.resid[n]
    if plan.logits is None:
        return raw.clone()
    buf = plan.open(abl, cp.scratch).buf
    _reopen(cp, buf, raw, len(plan.index.senders), n, plan.total)
    return buf.read(raw, plan.logits)[:, :, 0].to(raw.dtype)
