"""Cached runs and everything the engines share about running a model.

Every engine of apexlens works on top of whole forward passes that happen once: the clean
run and, where there is one, the corrupted run (:class:`Run`, :func:`cached_run`). What an
engine then computes is a set of *rows* -- one per sender, node, circuit or (sigma, draw)
-- each a modified copy of the batch. This module holds the pieces every engine uses for
that, so none of them writes its own:

* :func:`check_tokens` -- the one check of token input (one wording for every entry point);
* :class:`Run` / :func:`cached_run` -- the activations one forward pass left behind;
* :class:`Runs` -- the clean and corrupted runs of an experiment with its named positions;
* :class:`Readout` -- final residual streams -> per-example metric values, computing only
  what the metric reads, for many rows at once;
* :func:`row_chunks` -- rows in chunks that fit a memory budget, with one progress bar;
* :func:`run_rows` -- stack rows along the batch, run layers, reshape back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens import edits
from apexlens.backend import Backend
from apexlens.errors import ApexlensError
from apexlens.graph import Node, position_mask
from apexlens.hooks import Hooks
from apexlens.scoring import Metric

T = TypeVar("T")


# ============================================================================ tokens
def describe(t: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def check_tokens(bk: Backend, tokens: Any, name: str = "tokens") -> Int[Tensor, "batch pos"]:
    """Token ids ``[batch, pos]`` checked against the model, as ``long`` on its device.

    Raises one :class:`ApexlensError` naming the problem: not an integer tensor (floats,
    bools, uint8 are refused: a bool or byte tensor is almost always a mask), not 2-D, no
    rows, no positions, ids outside the vocabulary, or more positions than the context.
    """
    ok_dtypes = (torch.int64, torch.int32, torch.int16)
    if not isinstance(tokens, Tensor) or tokens.dtype not in ok_dtypes or tokens.ndim != 2:
        raise ApexlensError(
            f"{name} must be an integer tensor [batch, pos] of token ids (int64/int32), got "
            f"{describe(tokens)}"
        )
    if tokens.shape[0] == 0:
        raise ApexlensError(
            f"{name} has no rows (shape {tuple(tokens.shape)}): give at least one example"
        )
    if tokens.shape[1] == 0:
        raise ApexlensError(
            f"{name} has no positions (shape {tuple(tokens.shape)}): sequences are empty"
        )
    d_vocab = int(bk.model.cfg.d_vocab)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        raise ApexlensError(
            f"{name} holds token ids outside the vocabulary 0..{d_vocab - 1} (found {lo}..{hi})"
        )
    if tokens.shape[1] > bk.dims.n_ctx:
        raise ApexlensError(
            f"{name} has {tokens.shape[1]} positions; the model's context n_ctx is {bk.dims.n_ctx}"
        )
    return tokens.long().to(bk.device)


def check_pair(
    bk: Backend, clean: Any, corrupted: Any
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Clean and corrupted tokens, each checked, of the same shape."""
    c = check_tokens(bk, clean, "clean_tokens")
    k = check_tokens(bk, corrupted, "corrupted_tokens")
    if c.shape != k.shape:
        raise ApexlensError(
            f"clean tokens {tuple(c.shape)} and corrupted tokens {tuple(k.shape)} must have the "
            "same shape"
        )
    return c, k


# ============================================================================ runs
def cache_names(bk: Backend) -> list[str]:
    """The activations every engine reads from a cached run."""
    names = [bk.resid_pre(0), *split_embed_names(bk)]
    for layer in range(bk.dims.n_layers):
        names += [bk.resid_pre(layer), bk.z(layer), *(bk.qkv(layer, c) for c in "qkv")]
        if bk.dims.has_mlps:
            names += [bk.mlp_in_resid(layer), bk.mlp_out(layer)]
    return list(dict.fromkeys(names))


def split_embed_names(bk: Backend) -> list[str]:
    """``hook_embed`` and ``hook_pos_embed`` where the residual stream entering block 0 is
    exactly their sum (learned absolute positions); none otherwise (rotary, ALiBi and
    shortformer models add no positional embedding to the residual stream)."""
    hook_dict = getattr(bk.model, "hook_dict", {})
    standard = getattr(bk.model.cfg, "positional_embedding_type", "standard") == "standard"
    names = ["hook_embed", "hook_pos_embed"]
    return names if standard and all(n in hook_dict for n in names) else []


@dataclass
class Run:
    """What one forward pass left behind: activations by hook name and the final residual."""

    acts: dict[str, Tensor]
    final: Float[Tensor, "batch pos d_model"]

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]

    def resid(self, layer: int, bk: Backend) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering block ``layer`` (``n_layers``: the final one)."""
        return self.final if layer >= bk.dims.n_layers else self.acts[bk.resid_pre(layer)]


def cached_run(
    bk: Backend, tokens: Int[Tensor, "batch pos"], names: Iterable[str] | None = None
) -> Run:
    """Run ``tokens`` once and keep what the engines read (:func:`cache_names`)."""
    final, acts = bk.run_with_cache(
        tokens.to(bk.device), cache_names(bk) if names is None else names, logits=False
    )
    return Run(acts, final)


def run_from(bk: Backend, resid0: Float[Tensor, "batch pos d_model"], names: Iterable[str]) -> Run:
    """A :class:`Run` of the model from a given residual stream entering block 0."""
    acts: dict[str, Tensor] = {}
    hooks = [(n, edits.save(acts, n)) for n in dict.fromkeys(names) if n != bk.resid_pre(0)]
    final = bk.run_layers(resid0, 0, None, hooks)
    acts[bk.resid_pre(0)] = resid0.detach().clone()
    return Run(acts, final)


@dataclass
class Runs:
    """The cached clean (and corrupted) run of an experiment, with its named positions."""

    bk: Backend
    clean: Run
    corrupted: Run | None
    batch: int
    n_pos: int
    named_positions: Mapping[str, Any] = field(default_factory=dict)
    memory_budget: int = 0
    scratch: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Working memory an engine reuses from one call on these runs to the next (the
    circuit engine's sender buffer, at most about :attr:`memory_budget`), kept on the CPU
    only: there fresh memory of hundreds of MB costs more in page faults than the products
    that fill it; CUDA's caching allocator reuses its memory by itself. The engines use it
    while holding the model's lock. It goes with the runs (an Experiment keeps it while it
    lives)."""

    def __post_init__(self) -> None:
        if not self.memory_budget:
            self.memory_budget = default_budget(self.bk, self.batch, self.n_pos)

    def mask(self, node: Node) -> Bool[Tensor, "batch pos"] | None:
        """Where ``node`` acts (``None``: every position)."""
        return position_mask(node, self.batch, self.n_pos, self.named_positions, self.bk.device)

    def rows_per_chunk(
        self, n_rows: int, n_tok: int, attention: bool, readout: Readout | None = None
    ) -> int:
        """Rows per chunk so one chunk's working set stays within the memory budget.

        ``n_tok`` is the number of token positions a row carries; ``attention`` whether the
        rows run through attention (its scores grow with the square of the sequence); a
        ``readout`` adds the logits it computes per row (:meth:`Readout.bytes_per_row`).
        """
        extra = 0 if readout is None else readout.bytes_per_row()
        return rows_per_chunk(
            self.bk, self.memory_budget, n_rows, self.batch, self.n_pos, n_tok, attention, extra
        )


def _d_mlp(bk: Backend) -> int:
    return int(getattr(bk.model.cfg, "d_mlp", None) or 4 * bk.dims.d_model)


def default_budget(bk: Backend, batch: int, n_pos: int) -> int:
    """Half of what a plain ``run_with_cache`` of the batch holds; for a batch whose cache is
    small next to the model (a quarter of its weights), up to three quarters of it (peaks
    stay under one ``run_with_cache``); at least 16 MiB. Small batches chunk at a loss:
    each chunk streams every weight once (GPT-2 medium at 8 x 16 ran a random-half circuit
    in two chunks at 2.07x one forward, in one at 1.78x)."""
    d = bk.dims
    n_tok = batch * n_pos
    per_layer = n_tok * (12 * d.d_model + 2 * _d_mlp(bk)) + 2 * batch * d.n_heads * n_pos**2
    cache = (d.n_layers * per_layer + n_tok * d.d_vocab) * bk.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in bk.model.parameters())
    return max(16 * 2**20, cache // 2, min(3 * cache // 4, weights // 4))


def rows_per_chunk(
    bk: Backend,
    budget: int,
    n_rows: int,
    batch: int,
    n_pos: int,
    n_tok: int,
    attention: bool,
    extra: int = 0,
) -> int:
    """Rows per chunk within ``budget`` bytes (``extra``: more bytes per row)."""
    d = bk.dims
    per_tok = (10 * d.d_model + 2 * _d_mlp(bk) + 4 * d.n_heads * d.d_head) * bk.dtype.itemsize
    attn = batch * d.n_heads * n_pos * n_pos * 3 * bk.dtype.itemsize if attention else 0
    per_row = n_tok * per_tok + attn + extra
    return max(1, min(n_rows, budget // max(per_row, 1)))


# ============================================================================ rows
def row_chunks(
    items: Sequence[T], size: int, *, desc: str, progress: bool
) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of ``size``, with one progress bar (on stderr)."""
    chunks = [items[i : i + size] for i in range(0, len(items), max(1, size))]
    if not progress:
        yield from chunks
        return
    with progress_bar(len(items), desc, True, unit="row") as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "step") -> Any:
    """A tqdm bar on stderr counting ``total`` steps (a silent one when not ``enabled``)."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=not enabled
    )


def stack_rows(x: Float[Tensor, "rows batch ..."]) -> Float[Tensor, "n ..."]:
    """``[rows, batch, ...]`` -> ``[rows * batch, ...]``: rows stacked along the batch."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run_rows(
    bk: Backend,
    resid: Float[Tensor, "rows batch pos d_model"],
    start: int,
    hooks: Hooks = (),
    stop: int | None = None,
) -> Float[Tensor, "rows batch pos d_model"]:
    """Run blocks ``start..stop-1`` on every row at once (rows stacked along the batch);
    hooks see ``[rows * batch, ...]`` activations. Returns the residual leaving the last block."""
    rows, batch = resid.shape[:2]
    out = bk.run_layers(stack_rows(resid), start, stop, hooks)
    return out.reshape(rows, batch, *out.shape[1:])


def grouped_kv_hooks(
    bk: Backend,
    layer: int,
    items: Sequence[tuple[int, str]],
    values: Callable[[Mapping[str, Tensor]], Mapping[tuple[int, str], Tensor]],
) -> list[tuple[str, Any]]:
    """Hook edits giving query heads of a grouped-query layer key/value inputs of their own.

    ``items`` are ``(query head, "k" | "v")``; ``values(store)`` returns, when ``hook_z``
    fires, each item's new ``hook_k``/``hook_v`` slot value ``[n, pos, d_head]`` (``store``
    holds this run's ``"resid"``, ``"q"``, ``"k"``, ``"v"`` of the layer, after every
    earlier edit). Only those heads' ``hook_z`` change: head ``h``'s new ``z`` is the one
    :meth:`~apexlens.backend.Backend.attn_z` computes with its key/value slot holding its own
    input (query heads sharing a slot take turns, one call each) -- exactly an ungrouped
    copy of the layer with only head ``h``'s slice of ``hook_k``/``hook_v`` changed.
    Attach these after every other edit of the layer's ``hook_q/k/v``.
    """
    store: dict[str, Tensor] = {}
    heads = sorted({h for h, _ in items})
    rounds: list[list[int]] = []
    used: dict[int, int] = {}
    for h in heads:
        r = used.get(bk.slot(h, "k"), 0)
        used[bk.slot(h, "k")] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(h)

    def z_value(z: Tensor) -> Tensor:
        new = values(store)
        out: dict[int, Tensor] = {}
        for heads_now in rounds:
            kv = {"k": store["k"].clone(), "v": store["v"].clone()}
            for h in heads_now:
                for ch in ("k", "v"):
                    if (h, ch) in new:
                        kv[ch][:, :, bk.slot(h, ch)] = new[(h, ch)].to(kv[ch].dtype)
            z_new = bk.attn_z(layer, store["resid"], store["q"], kv["k"], kv["v"])
            for h in heads_now:
                out[h] = z_new[:, :, h]
        return torch.stack([out[h] for h in heads], dim=2)

    return [
        (bk.resid_pre(layer), edits.save(store, "resid", clone=False)),
        *((bk.qkv(layer, ch), edits.save(store, ch, clone=False)) for ch in "qkv"),
        (bk.z(layer), edits.set_heads(heads, z_value)),
    ]


def run_tokens(
    bk: Backend, tokens: Int[Tensor, "batch pos"], hooks: Hooks
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream of a whole forward pass of ``tokens`` under ``hooks``."""
    final, _ = bk.run_with_cache(tokens, [], fwd_hooks=hooks, logits=False)
    return final


# ============================================================================ readout
MetricFn = Callable[[Tensor], Tensor]


class Readout:
    """Final residual streams -> per-example metric values, computing only what is read.

    A :class:`~apexlens.scoring.Metric` declares the positions and vocabulary columns it
    reads, so only those positions are gathered and only those columns unembedded.

    Any other callable gets logits of the full shape. :meth:`probe` (on the clean run) finds
    what it reads: the positions and columns where its gradient is nonzero, *verified* by
    calling it with every other logit set to NaN -- it must give exactly the same values (a
    NaN would show a read the gradient missed). Only those logits are computed from then on;
    the rest of the tensor it receives is NaN. Without a gradient, or when the check fails,
    it gets everything. It is called on all rows at once (``[rows, batch, pos, vocab]``,
    which a metric written with ``...`` indexing accepts), checked once against the same
    metric called run by run; if it refuses the leading axis or disagrees, it is called one
    run (``[batch, pos, vocab]``) at a time from then on.

    Longer than most classes on purpose: plain function metrics need their probe, their
    full-shaped logits and their run-by-run fallback here, in one place.
    """

    def __init__(self, bk: Backend, metric: MetricFn, batch: int, n_pos: int):
        if not callable(metric):
            raise ApexlensError(
                f"metric must be callable (logits [batch, pos, vocab] -> one value per example "
                f"[batch]), got {describe(metric)}"
            )
        self.bk, self.metric, self.batch, self.n_pos = bk, metric, batch, n_pos
        self.fast = isinstance(metric, Metric)
        device = bk.device
        if isinstance(metric, Metric):
            self.idx: Int[Tensor, "batch k"] = metric.read_positions(batch, n_pos).to(device)
            self.tokens = None if metric.tokens is None else metric.tokens.to(device)
        else:
            self.idx = torch.arange(n_pos, device=device).expand(batch, n_pos)
            self.tokens = None
        self.name = getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))
        self.rows_at_once: bool | None = None  # generic callables: unknown until tried
        self.probed = False  # a generic callable whose reads were found and verified
        self.compact = False  # ... that also gives its values from the read positions alone

    # ------------------------------------------------------------------ plain functions
    def probe(self, clean_final: Float[Tensor, "batch pos d_model"]) -> None:
        """Find (and verify) the positions and columns a plain function metric reads."""
        if isinstance(self.metric, Metric):
            return
        logits = self.bk.unembed(clean_final)
        full = self._call_one(logits)
        with torch.enable_grad():
            x = logits.detach().clone().requires_grad_(True)
            try:
                out = self.metric(x)
            except Exception:  # noqa: BLE001 - no probe, the metric gets everything
                return
            if not isinstance(out, Tensor) or not out.requires_grad:
                return
            (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        if grad is None:
            return
        read = grad != 0
        pos = read.any(-1)
        counts = pos.sum(-1)
        if int(counts.min()) == 0:
            return
        k = int(counts.max())
        idx = torch.stack(
            [
                torch.cat(
                    [p.nonzero().flatten(), p.nonzero().flatten()[:1].repeat(k - int(p.sum()))]
                )
                for p in pos
            ]
        )
        cols = read.any(0).any(0).nonzero().flatten()
        kept = (self.idx, self.tokens)
        for tokens in (cols, None) if len(cols) < logits.shape[-1] else (None,):
            self.idx, self.tokens, self.probed = idx.to(self.bk.device), tokens, True
            try:
                values = self.from_logits(self._select(logits))
            except ApexlensError:
                continue
            if torch.equal(values, full):
                self.fast = True
                self.compact = True  # then try the read positions alone, in order
                try:
                    self.compact = torch.equal(self.from_logits(self._select(logits)), full)
                except Exception:  # noqa: BLE001 - indexing by absolute position: full shape
                    self.compact = False
                return
        (self.idx, self.tokens), self.probed = kept, False

    def bytes_per_row(self) -> int:
        """Memory one row of runs costs at the readout beyond its final residual stream: the
        logits it unembeds (a plain function metric's full-shaped tensor is built in pieces of
        at most :attr:`PIECE_BYTES`, whatever the number of rows)."""
        if isinstance(self.metric, Metric) or (self.probed and self.tokens is not None):
            return 0  # a few vocabulary columns at the read positions
        per_pos = 2 * self.batch * self.bk.dims.d_vocab * self.bk.dtype.itemsize
        return per_pos * (self.idx.shape[1] if self.probed else self.n_pos)

    PIECE_BYTES = 64 << 20
    """The most memory a full-shaped logits tensor for a probed plain function metric takes
    at once: rows beyond it are given to the function in pieces."""

    def _select(self, logits: Float[Tensor, "*lead batch pos vocab"]) -> Tensor:
        """The logits at the read positions and columns (as :meth:`__call__` computes them)."""
        sel = self.gather(logits)
        return sel if self.tokens is None else sel[..., self.tokens]

    def _full(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch pos vocab"]:
        """A full-shaped logits tensor: ``selected`` where the metric reads, NaN elsewhere
        (``compact``: the read positions alone, every vocabulary column)."""
        lead = selected.shape[:-3]
        vocab = self.bk.dims.d_vocab
        if self.tokens is not None:
            cols = selected.new_full((*selected.shape[:-1], vocab), float("nan"))
            cols[..., self.tokens] = selected
            selected = cols
        if self.compact:
            return selected
        full = selected.new_full((*lead, self.batch, self.n_pos, vocab), float("nan"))
        rows = torch.arange(self.batch, device=selected.device)[:, None].expand_as(self.idx)
        full[..., rows, self.idx, :] = selected
        return full

    @property
    def all_positions(self) -> bool:
        return self.idx.shape[1] == self.n_pos and bool(
            (self.idx == torch.arange(self.n_pos, device=self.idx.device)).all()
        )

    def gather(self, x: Float[Tensor, "*lead batch pos d"]) -> Float[Tensor, "*lead batch k d"]:
        """The positions the metric reads."""
        if self.all_positions:
            return x
        lead = x.shape[:-3]
        idx = self.idx.view(*([1] * len(lead)), *self.idx.shape, 1)
        return x.gather(-2, idx.expand(*lead, *self.idx.shape, x.shape[-1]))

    def __call__(
        self, resid: Float[Tensor, "*lead batch k d_model"]
    ) -> Float[Tensor, "*lead batch"]:
        """Metric values from final residual streams already gathered at the read positions."""
        return self.from_logits(self.bk.unembed(resid, self.tokens))

    def from_logits(
        self, logits: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        """Metric values from logits at the read positions and columns (differentiable)."""
        if isinstance(self.metric, Metric):
            return self._checked(self.metric.reduce(logits), logits.shape[:-2])
        if not self.probed:
            return self._generic(logits)
        lead = logits.shape[:-3]
        flat = logits.reshape(-1, *logits.shape[-3:])
        per_row = self.batch * (logits.shape[-2] if self.compact else self.n_pos)
        step = max(1, self.PIECE_BYTES // (per_row * self.bk.dims.d_vocab * logits.element_size()))
        try:
            if not lead or flat.shape[0] <= step:
                return self._generic(self._full(logits))
            pieces = [self._generic(self._full(piece)) for piece in flat.split(step)]
            return torch.cat(pieces).reshape(*lead, self.batch)
        except ApexlensError as err:
            if "NaN" not in str(err):
                raise
            raise ApexlensError(
                f"metric {self.name} read logits it did not read on the clean run (it returned "
                "NaN where apexlens computes only the positions and columns it read there); "
                "make it read the same positions for every input, or declare them with "
                "apexlens.scoring.FunctionMetric(fn, positions=..., tokens=...)"
            ) from None

    def _call_one(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        return self._checked(self.metric(logits), logits.shape[:1])

    def _generic(
        self, logits: Float[Tensor, "*lead batch pos vocab"]
    ) -> Float[Tensor, "*lead batch"]:
        lead = logits.shape[:-3]
        flat = logits.reshape(-1, *logits.shape[-3:])
        if lead and self.rows_at_once is not False:
            try:
                values = self._checked(self.metric(logits), logits.shape[:-2])
            except ApexlensError:
                values = None
            except (RuntimeError, IndexError, ValueError, TypeError):
                values = None
            if values is not None and self.rows_at_once is None:
                # checked once against run-by-run calls, on the first and the last row
                for i in sorted({0, flat.shape[0] - 1}):
                    ref = self._call_one(flat[i])
                    if not torch.allclose(
                        values.reshape(-1, self.batch)[i], ref, rtol=1e-6, atol=1e-9
                    ):
                        values = None
                        break
            self.rows_at_once = values is not None
            if values is not None:
                return values
        per_run = torch.stack([self._call_one(lg) for lg in flat])
        return per_run.reshape(*lead, self.batch)

    def _checked(self, values: Any, expected: torch.Size | tuple[int, ...]) -> Tensor:
        name = self.name
        if not isinstance(values, Tensor):
            raise ApexlensError(
                f"metric {name} returned {describe(values)}; a metric returns a tensor with one "
                f"value per example, shape {tuple(expected)}"
            )
        if values.shape != tuple(expected):
            hint = (
                " (a scalar: drop the .mean() over the batch -- apexlens averages and gives "
                "uncertainty itself)"
                if values.ndim == 0
                else ""
            )
            raise ApexlensError(
                f"metric {name} returned shape {tuple(values.shape)}; a metric returns one value "
                f"per example, shape {tuple(expected)}{hint}"
            )
        if not (
            values.is_floating_point() or values.dtype in (torch.int64, torch.int32, torch.bool)
        ):
            raise ApexlensError(f"metric {name} returned a {values.dtype} tensor; expected numbers")
        values = values.to(self.bk.dtype if self.bk.dtype.is_floating_point else torch.float32)
        if not torch.isfinite(values).all():
            raise ApexlensError(f"metric {name} returned NaN or inf")
        return values
