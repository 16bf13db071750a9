"""The metric readout: final residual streams -> per-example metric values, computing only
what the metric reads, for many rows at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import Backend
from apexlens.runs.reads import traced_reads
from apexlens.runs.tokens import describe
from apexlens.scoring import Metric, all_finite

MetricFn = Callable[[Tensor], Tensor]


class Readout:
    """Final residual streams -> per-example metric values, computing only what is read.

    A :class:`~apexlens.scoring.Metric` declares the positions and vocabulary columns it
    reads, so only those positions are gathered and only those columns unembedded.

    Any other callable gets logits of the full shape. :meth:`probe` (on the clean run) finds
    what it reads by tracing one call (:mod:`apexlens.runs.reads`: every operation followed,
    comparisons, ``where``, ``argmax``, masks and value-dependent indexing included), and
    verifies it: called with every other logit NaN, very large, very negative or random, it
    must give exactly the same values. Only those logits are computed from then on; the rest
    of the tensor it receives is NaN. Whatever the trace cannot prove (control flow on
    values, ``.item()``, shapes that depend on values...) or the check refutes gets
    everything. It is called on all rows at once (``[rows, batch, pos, vocab]``,
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
        """Find (and verify) the positions and columns a plain function metric reads.

        The reads are *proven* by tracing the metric once (:func:`traced_reads`); the
        positions and columns computed from then on cover them. Then two checks on the clean
        logits: the metric gives exactly its values when every other logit is NaN, very
        large, very negative or random. Whatever is not proven gets the full logits."""
        if isinstance(self.metric, Metric):
            return
        logits = self.bk.unembed(clean_final).detach()
        full = self._call_one(logits.clone())
        read = traced_reads(self.metric, logits)
        if read is None:
            return
        pos = read.any(-1)
        pos[~pos.any(-1), -1] = True  # an example whose value reads nothing: any position
        counts = pos.sum(-1)
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
            if not torch.equal(values, full):
                continue
            g = torch.Generator(device=logits.device).manual_seed(0)
            noise = torch.randn(
                logits.shape, generator=g, device=logits.device, dtype=logits.dtype
            )
            if self._refills_agree(logits, full, noise):
                self.fast = True
                self.compact = self._compact_agrees(logits, full, noise)
                return
        (self.idx, self.tokens), self.probed = kept, False

    def _computed(self, shape: torch.Size) -> Bool[Tensor, "batch pos vocab"]:
        """The logits the fast path computes (every other one it gives as NaN)."""
        mask = torch.zeros(shape, dtype=torch.bool, device=self.idx.device)
        rows = torch.arange(self.batch, device=self.idx.device)[:, None].expand_as(self.idx)
        if self.tokens is None:
            mask[rows, self.idx] = True
        else:
            mask[rows[..., None], self.idx[..., None], self.tokens.to(self.idx.device)] = True
        return mask

    def _refills_agree(
        self, logits: Float[Tensor, "batch pos vocab"], full: Tensor, noise: Tensor
    ) -> bool:
        """The metric's values stay exactly ``full`` whatever the logits it does not read
        hold: very large, very negative, random (a second check after the trace)."""
        unread = ~self._computed(logits.shape)
        if not bool(unread.any()):
            return True
        big = float(torch.finfo(logits.dtype).max) / 16 if logits.is_floating_point() else 1e6
        scale = float(logits.abs().max()) + 1.0
        for fill in (big, -big, None):
            refilled = (
                logits.masked_fill(unread, fill)
                if fill is not None
                else torch.where(unread, noise * scale, logits)
            )
            try:
                values = self._call_one(refilled, finite=False)
            except (RuntimeError, ValueError, TypeError, IndexError, ApexlensError):
                return False
            if not torch.equal(values, full):
                return False
        return True

    def _compact_agrees(
        self, logits: Float[Tensor, "batch pos vocab"], full: Tensor, noise: Tensor
    ) -> bool:
        """Whether the metric gives its values from the read positions alone, in order (on
        the clean logits and on random ones)."""
        cases = [(logits, full)]
        try:
            cases.append((noise, self.from_logits(self._select(noise))))
            self.compact = True
            return all(torch.equal(self.from_logits(self._select(lg)), ref) for lg, ref in cases)
        except (RuntimeError, ValueError, TypeError, IndexError, ApexlensError):
            return False  # indexing by absolute position: it gets the full shape
        finally:
            self.compact = False

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
        """Whether the metric reads every position (worked out once per :attr:`idx`)."""
        memo = self.__dict__.get("_all_positions")
        if memo is not None and memo[0] is self.idx:
            return bool(memo[1])
        every = self.idx.shape[1] == self.n_pos and bool(
            (self.idx == torch.arange(self.n_pos, device=self.idx.device)).all()
        )
        self._all_positions = (self.idx, every)
        return every

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

    def with_log_probs(
        self, resid: Float[Tensor, "*lead batch k d_model"]
    ) -> tuple[Float[Tensor, "*lead batch"], Float[Tensor, "*lead batch k d_vocab"]]:
        """:meth:`__call__` and the next-token log-probabilities of the same final residuals
        (gathered at the read positions), the final norm applied once for both."""
        x = self.bk.ln_final(resid)
        values = self.from_logits(self.bk.logits_of(x, self.tokens))
        return values, torch.log_softmax(self.bk.logits_of(x), -1)

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
        if not lead or flat.shape[0] <= step:
            return self._nan_checked(self._generic(self._full(logits), finite=False))
        pieces = [self._generic(self._full(piece), finite=False) for piece in flat.split(step)]
        return self._nan_checked(torch.cat(pieces).reshape(*lead, self.batch))

    def _nan_checked(self, values: Tensor) -> Tensor:
        """Values of a probed metric: NaN means it read a logit it did not read on the clean
        run (every other logit it receives is NaN)."""
        if not all_finite(values):
            raise ApexlensError(
                f"metric {self.name} read logits it did not read on the clean run (it returned "
                "NaN where apexlens computes only the positions and columns it read there); "
                "make it read the same positions for every input, or declare them with "
                "apexlens.scoring.FunctionMetric(fn, positions=..., tokens=...)"
            )
        return values

    def _call_one(self, logits: Float[Tensor, "batch pos vocab"], finite: bool = True) -> Tensor:
        return self._checked(self.metric(logits), logits.shape[:1], finite)

    def _generic(
        self, logits: Float[Tensor, "*lead batch pos vocab"], finite: bool = True
    ) -> Float[Tensor, "*lead batch"]:
        """The metric of full-shaped logits, on all rows at once where that gives the same
        values, else run by run (``finite``: NaN/inf values are an error here)."""
        lead = logits.shape[:-3]
        flat = logits.reshape(-1, *logits.shape[-3:])
        if lead and self.rows_at_once is not False:
            try:
                values = self._checked(self.metric(logits), logits.shape[:-2], finite)
            except ApexlensError:
                values = None
            except (RuntimeError, IndexError, ValueError, TypeError):
                values = None
            if values is not None and self.rows_at_once is None:
                # checked once against run-by-run calls, on the first and the last row
                for i in sorted({0, flat.shape[0] - 1}):
                    ref = self._call_one(flat[i], finite)
                    if not torch.allclose(
                        values.reshape(-1, self.batch)[i], ref, rtol=1e-6, atol=1e-9
                    ):
                        values = None
                        break
            self.rows_at_once = values is not None
            if values is not None:
                return values
        per_run = torch.stack([self._call_one(lg, finite) for lg in flat])
        return per_run.reshape(*lead, self.batch)

    def _checked(
        self, values: Any, expected: torch.Size | tuple[int, ...], finite: bool = True
    ) -> Tensor:
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
        if finite and not all_finite(values):
            raise ApexlensError(f"metric {name} returned NaN or inf")
        return values
