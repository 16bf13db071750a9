"""A memory preflight: the peak bytes a question will allocate on its device, before it runs.

:func:`estimate_memory` adds up what the question holds at its peak -- the clean and
corrupted runs it caches, the buffers its engine keeps (a circuit's sender buffer, every
sender's output change, the receivers' gradients), and one chunk of rows in flight, with the
chunk sized exactly as the engine sizes it from the memory budget -- in bytes of the model's
dtype, beyond the model's weights and the token ids. The per-token working set of a chunk
(a block's MLP holds about four ``d_mlp``-wide activations per token at its peak, plus a few
``d_model``-wide ones) was read from torch's own allocation records (the profiler's memory
timeline) on HookedTransformers with MLPs; ``tests/test_scale.py`` checks the estimates
against measured peaks (within 25%) on a shape they were not fitted on.

The default memory budget follows the free memory of the device
(:func:`apexlens.runs.default_budget`), so a batch too large for one pass is chunked; this
function says whether the cached runs themselves fit, and how much a question adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.model import Backend, backend_for
from apexlens.runs.cache import cache_names, default_budget, free_share
from apexlens.runs.rows import rows_per_chunk
from apexlens.vocab import parse_nodes
from apexlens.vocab.edges import EdgeIndex
from apexlens.vocab.sites import DEFAULT_SITES, parse_sites


@dataclass(frozen=True)
class _Shape:
    """A question's sizes: the model, the batch, the budget; ``per`` is bytes per token per
    float (``T * itemsize``)."""

    bk: Backend
    batch: int
    n_pos: int
    budget: int

    @property
    def per(self) -> int:
        return self.batch * self.n_pos * self.bk.dtype.itemsize

    def width(self, name: str) -> int:
        """Floats per token of the activation at hook ``name``."""
        d = self.bk.dims
        tail = name.rsplit(".", 1)[-1]
        if tail in ("hook_z", "hook_q", "hook_result"):
            return d.n_heads * d.d_head
        if tail in ("hook_k", "hook_v"):
            return d.n_kv_heads * d.d_head
        if tail in ("hook_pre", "hook_post"):
            return d.d_mlp
        return d.d_model

    def cache(self) -> int:
        """Bytes of one cached run (:func:`~apexlens.runs.cache_names` and the final
        residual stream)."""
        return self.per * (sum(self.width(n) for n in cache_names(self.bk)) + self.bk.dims.d_model)

    def peak_inside(self) -> int:
        """Bytes a block holds at its peak for one copy of the batch, beyond residual-sized
        tensors: the MLP's activations (four ``d_mlp``-wide per token) or attention's
        scores (four ``[batch, head, pos, pos]``), whichever is larger."""
        d = self.bk.dims
        mlp = self.per * 4 * d.d_mlp if d.has_mlps else 0
        return max(mlp, 4 * self.batch * d.n_heads * self.n_pos**2 * self.bk.dtype.itemsize)

    def setup(self) -> int:
        """An Experiment: both runs cached, the second one's last block in flight."""
        return 2 * self.cache() + self.row(2)

    def row(self, dm: int, more: int = 0) -> int:
        """One row (a copy of the batch) running blocks: :meth:`peak_inside`, ``dm``
        residual-sized tensors and ``more`` floats per token."""
        return self.peak_inside() + self.per * (dm * self.bk.dims.d_model + more)

    def last_row(self, k: int) -> int:
        """One row whose last block computes only the ``k`` read positions (the last ones;
        :func:`~apexlens.runs.suffix.run_suffix_rows`): attention and MLP at those positions
        and about eleven residual-sized tensors (the keys and values of every position, the
        hooks' full-width activations), fitted like :meth:`row`."""
        d, it = self.bk.dims, self.bk.dtype.itemsize
        mlp = self.batch * k * it * 4 * d.d_mlp if d.has_mlps else 0
        attn = 4 * self.batch * d.n_heads * k * self.n_pos * it
        return max(mlp, attn) + self.per * 11 * d.d_model

    def reads_late(self, opts: dict[str, Any]) -> int | None:
        """The read positions ``k`` (option ``read_positions``, default 1: the metric reads
        the last ones) where a run's last block computes them only; ``None`` where it runs
        every position (every position read, or a model that runs no suffixes)."""
        k = _read_positions(opts)
        return k if k < self.n_pos and self.bk.runs_suffix else None

    def chunk(self, n_rows: int, n_tok: int, extra: int = 0) -> int:
        """Rows per chunk, as the engines size them from the budget."""
        return rows_per_chunk(
            self.bk, self.budget, max(1, n_rows), self.batch, self.n_pos, n_tok, True, extra
        )


def _read_positions(opts: dict[str, Any]) -> int:
    """The option ``read_positions``: how many positions the metric reads (default 1)."""
    return int(opts.get("read_positions", 1))


def _path_patch(s: _Shape, opts: dict[str, Any]) -> int:
    d = s.bk.dims
    senders = parse_nodes(opts.get("senders", "all-heads"), d)
    receivers = parse_nodes(opts.get("receivers", "logits"), d)
    rows = len(senders)
    if all(r.kind == "logits" for r in receivers):  # only the read positions travel
        k = _read_positions(opts)
        n_tok = s.batch * k
        chunk = rows_per_chunk(s.bk, s.budget, rows, s.batch, s.n_pos, n_tok, False)
        per_row = n_tok * s.bk.dtype.itemsize * (4 * d.d_mlp + 6 * d.d_model)
        return max(s.setup(), 2 * s.cache() + chunk * per_row)
    chunk = s.chunk(rows, s.batch * s.n_pos)
    late = s.reads_late(opts)
    last = d.n_layers - 1
    if late is not None and min(r.layer for r in receivers if r.kind != "logits") == last:
        row = s.last_row(late)  # the rows run the last block only, at the read positions
    else:
        row = s.row(5)
    return max(s.setup(), 2 * s.cache() + s.per * d.d_model + chunk * row)


def _act_patch(s: _Shape, opts: dict[str, Any]) -> int:
    nodes = parse_nodes(opts.get("nodes", "all-heads"), s.bk.dims)
    by_layer: dict[int, int] = {}
    for n in nodes:
        by_layer[n.layer] = by_layer.get(n.layer, 0) + 1
    chunk = min(s.chunk(len(nodes), s.batch * s.n_pos), max(by_layer.values()))
    return max(s.setup(), 2 * s.cache() + chunk * s.row(7))


def _senders(s: _Shape) -> int:
    return len(EdgeIndex(s.bk).senders)


def _circuit(s: _Shape, opts: dict[str, Any]) -> int:
    d = s.bk.dims
    n_senders = _senders(s)
    per_example = n_senders * s.n_pos * d.d_model * s.bk.dtype.itemsize
    examples = min(s.batch, max(1, s.budget // max(per_example, 1)))
    share = examples / s.batch  # the examples of one chunk
    work = s.row(n_senders + 15)
    return max(s.setup(), 2 * s.cache() + int(work * share))


def _exact(s: _Shape, opts: dict[str, Any]) -> int:
    d = s.bk.dims
    index = EdgeIndex(s.bk)
    n_edges = int(index.valid.sum())
    chunk = s.chunk(n_edges, s.batch * s.n_pos)
    held = s.per * len(index.senders) * d.d_model + n_edges * s.batch * s.bk.dtype.itemsize
    # rows run in groups by the block they start at (a head's: its own; an MLP's: the next);
    # those starting at the last block compute it at the read positions only
    k, last = s.reads_late(opts), d.n_layers - 1
    rows_from: dict[int, int] = {}
    for j, r in enumerate(index.receivers):
        if r.kind != "logits":
            start = r.layer + (r.kind == "mlp")
            rows_from[start] = rows_from.get(start, 0) + int(index.valid[:, j].sum())
    work = 0
    for start, n in rows_from.items():
        if start <= last:
            row = s.last_row(k) if k is not None and start == last else s.row(7)
            work = max(work, min(chunk, n) * row)
    return max(s.setup(), 2 * s.cache() + held + work)


def _gradients(s: _Shape, alphas: int) -> int:
    d = s.bk.dims
    index = EdgeIndex(s.bk)
    held = s.per * d.d_model * (len(index.senders) + 2 * len(index.receivers))
    per_row = s.per * (d.n_layers * ((3 * d.d_mlp if d.has_mlps else 0) + d.d_model)
                       + 17 * d.n_heads * d.d_model)
    extra = 9 * d.n_heads * s.per * d.d_model
    chunk = s.chunk(alphas, s.batch * s.n_pos, extra)
    factor = 1.0 if alphas == 1 else 1.15
    return max(s.setup(), 2 * s.cache() + held + int(factor * chunk * per_row))


def _apex(s: _Shape, opts: dict[str, Any]) -> int:
    """One row is one example under one (sigma, draw): rows per pass as the noise engine
    sizes them (:func:`apexlens.engines.noise.sweep.rows_per_pass`); each row holds its noise
    at every site, the forward's working set and float64 logits at the scored positions (the
    counter-based draw's temporaries, one site at a time, stay below the forward's peak)."""
    d, itemsize = s.bk.dims, s.bk.dtype.itemsize
    sites = parse_sites(opts.get("sites", DEFAULT_SITES), s.bk)
    n_rows = int(opts.get("n_sigmas", 8)) * int(opts.get("n_draws", 32)) * s.batch
    widths = [s.width(site.hook) * (d.n_heads if site.shared_axes else 1) for site in sites]
    site_numel = sum(widths) * s.n_pos
    k = _read_positions(opts)
    extra = site_numel * (56 + 3 * itemsize) + 8 * 4 * k * d.d_vocab
    rows = rows_per_chunk(s.bk, s.budget, n_rows, 1, s.n_pos, s.n_pos, True, extra)
    one = _Shape(s.bk, 1, s.n_pos, s.budget)
    per_row = one.row(4, sum(widths)) + 8 * 4 * k * d.d_vocab
    clean = s.per * (d.d_vocab + d.d_model + sum(widths))
    return rows * per_row + clean


QUESTIONS: dict[str, Callable[[_Shape, dict[str, Any]], int]] = {
    "path_patch": _path_patch,
    "act_patch": _act_patch,
    "circuit": _circuit,
    "attribute_edges:exact": _exact,
    "attribute_edges:eap": lambda s, o: _gradients(s, 1),
    "attribute_edges:eap-ig": lambda s, o: _gradients(s, int(o.get("ig_steps", 5))),
    "apex": _apex,
}
"""The questions :func:`estimate_memory` knows, with their options (defaults as the API's):
``path_patch`` (``senders``, ``receivers``), ``act_patch`` (``nodes``), ``circuit`` (one
hypothesis of any size: the sender buffer does not depend on it), ``attribute_edges:exact``
/ ``:eap`` / ``:eap-ig`` (``ig_steps``; every edge), ``apex`` (``sites``, ``n_sigmas``,
``n_draws``; the budget is APEX's own ``memory_budget``). ``path_patch`` and
``attribute_edges:exact`` also take ``read_positions``: how many positions the metric reads
(the last ones; default 1)."""


def estimate_memory(
    model: Any,
    tokens_shape: Sequence[int],
    question: str,
    *,
    memory_budget: int | None = None,
    **options: Any,
) -> int:
    """Peak bytes ``question`` will allocate on the model's device for a batch of
    ``tokens_shape`` (``(batch, pos)``), beyond the model's weights: its cached runs, its
    engine's buffers and one chunk of rows in flight (module docstring).

    ``question``: one of :data:`QUESTIONS` (``"path_patch"``, ``"act_patch"``,
    ``"circuit"``, ``"attribute_edges:exact"``, ``"attribute_edges:eap"``,
    ``"attribute_edges:eap-ig"``, ``"apex"``), with its options as keywords, e.g.
    ``senders="heads:0", receivers="9.9.q"``. ``memory_budget``: the budget the call will
    get (default: the default budget, which follows the device's free memory)."""
    bk = backend_for(model)
    try:
        batch, n_pos = (int(x) for x in tokens_shape)
    except (TypeError, ValueError):
        raise ApexlensError(f"tokens_shape must be (batch, pos), got {tokens_shape!r}") from None
    if batch < 1 or n_pos < 1:
        raise ApexlensError(f"tokens_shape must be positive, got {tokens_shape!r}")
    if question not in QUESTIONS:
        raise ApexlensError(f"question must be one of {', '.join(map(repr, QUESTIONS))}; got {question!r}")
    if memory_budget is None and question == "apex":  # APEX's own default
        free = free_share(bk.device)
        memory_budget = 1 << 30 if free is None else max(16 << 20, min(1 << 30, free // 2))
    elif memory_budget is None:
        memory_budget = default_budget(bk, batch, n_pos)
    return int(QUESTIONS[question](_Shape(bk, batch, n_pos, int(memory_budget)), options))
