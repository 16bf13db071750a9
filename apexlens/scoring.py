"""Scoring: metrics that read logits, and per-example results with their uncertainty.

A **metric** maps logits ``[batch, pos, vocab]`` to one value per example ``[batch]``. The
built-in ones also *declare what they read* -- the positions (``read_positions``) and the
vocabulary columns (``tokens``) -- so an engine can compute only those: the path-patching
engine then needs the final residual stream at one position per example and, for a logit
difference, two columns of the unembedding instead of 50257. ``metric.reduce(selected)``
is the metric given logits already gathered at those positions and columns; it broadcasts
over any leading dimensions (many patched runs at once).

A :class:`Scores` keeps the per-example values and gives the mean, its standard error and a
seeded percentile-bootstrap confidence interval.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.vocab import position_index

Positions = int | Sequence[int] | Tensor | None


def _as_long(x: Any, what: str) -> Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ApexlensError(f"{what} must be integer token ids, got {type(x).__name__}") from None
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ApexlensError(f"{what} must be integer token ids, got dtype {t.dtype}")
    return t.long()


def all_finite(values: Tensor) -> bool:
    """Whether ``values`` holds no NaN or inf: its sum is finite (two operations), or, where
    that sum is not (a NaN or inf among the values, or an overflow of finite ones), every
    value is."""
    if values.is_floating_point() and math.isfinite(float(values.detach().sum())):
        return True
    return bool(torch.isfinite(values).all())


def check_finite(values: Tensor, what: str = "metric") -> Tensor:
    """Raise an :class:`ApexlensError` if ``values`` holds NaN or inf."""
    if not all_finite(values):
        raise ApexlensError(f"{what} returned NaN or inf")
    return values


class Metric(abc.ABC):
    """Base class: a per-example metric that declares the positions and tokens it reads."""

    name: str = "metric"
    positions: Positions = -1
    tokens: Int[Tensor, " n_tok"] | None = None

    def read_positions(self, batch: int, n_pos: int) -> Int[Tensor, "batch k"]:
        """Absolute positions read, one row per example."""
        return position_index(self.positions, batch, n_pos, self.name)

    @abc.abstractmethod
    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        """The metric of the logits at the read positions and columns (``*lead`` rows)."""

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        if logits.ndim != 3:
            raise ApexlensError(
                f"{self.name} expects logits [batch, pos, vocab], got {tuple(logits.shape)}"
            )
        batch, n_pos, _ = logits.shape
        idx = self.read_positions(batch, n_pos).to(logits.device)
        sel = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
        if self.tokens is not None:
            sel = sel[..., self.tokens.to(logits.device)]
        return check_finite(self.reduce(sel), self.name)


def _per_example(tokens: Tensor, batch_hint: int | None = None) -> Tensor:
    return tokens if tokens.ndim >= 1 else tokens[None]


class LogitDiff(Metric):
    """``logit[answer] - logit[wrong]`` at ``positions``, per example (mean over positions).

    ``answer_tokens`` and ``wrong_tokens`` are ``[batch]`` (or ``[batch, k]`` for ``k``
    positions per example); ints or lists work too.
    """

    name = "logit_diff"

    def __init__(self, answer_tokens: Any, wrong_tokens: Any, positions: Positions = -1):
        self.answer = _per_example(_as_long(answer_tokens, "answer_tokens"))
        self.wrong = _per_example(_as_long(wrong_tokens, "wrong_tokens"))
        if self.answer.shape != self.wrong.shape:
            raise ApexlensError(
                f"answer tokens {tuple(self.answer.shape)} and wrong tokens {tuple(self.wrong.shape)} "
                "must have the same shape"
            )
        self.positions = positions
        self.tokens, inverse = torch.unique(
            torch.cat([self.answer.flatten(), self.wrong.flatten()]), return_inverse=True
        )
        n = self.answer.numel()
        self._ai = inverse[:n].reshape(self.answer.shape)
        self._wi = inverse[n:].reshape(self.wrong.shape)

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        pair = selected.gather(-1, self._pairs(selected))  # [..., k, 2]: answer, wrong
        return (pair[..., 0] - pair[..., 1]).mean(-1)

    def _pairs(self, selected: Tensor) -> Int[Tensor, "*lead batch k 2"]:
        """The answer and wrong columns of every read logit row of ``selected``, built once
        per shape and device (the last few kept)."""
        shape, device = tuple(selected.shape[:-1]), selected.device
        memo: dict[Any, Tensor] = self.__dict__.setdefault("_pairs_memo", {})
        idx = memo.get((shape, device))
        if idx is not None:
            return idx
        batch, k = shape[-2], shape[-1]
        ai, wi = self._ai.to(device), self._wi.to(device)
        if ai.ndim == 1:
            if ai.shape[0] not in (1, batch):
                raise ApexlensError(f"{self.name}: {ai.shape[0]} answers for a batch of {batch}")
            ai, wi = (
                ai.expand(batch)[:, None].expand(batch, k),
                wi.expand(batch)[:, None].expand(batch, k),
            )
        idx = torch.stack([ai.expand(*shape), wi.expand(*shape)], -1)
        if len(memo) >= 8:
            memo.clear()
        memo[(shape, device)] = idx
        return idx


class LogitDiffRecovery(LogitDiff):
    """How much of the clean logit difference a patch keeps, per example:
    ``(patched - corrupted) / (clean - corrupted)`` (1 = clean behaviour, 0 = corrupted).

    ``clean_value`` / ``corrupted_value`` are per-example tensors or scalars (e.g. from
    ``LogitDiff(...)(clean_logits)``). Examples whose clean and corrupted values are equal
    have no behaviour to recover: an error names them.
    """

    name = "logit_diff_recovery"

    def __init__(
        self,
        answer_tokens: Any,
        wrong_tokens: Any,
        clean_value: Any,
        corrupted_value: Any,
        positions: Positions = -1,
    ):
        super().__init__(answer_tokens, wrong_tokens, positions)
        self.clean_value = torch.as_tensor(clean_value, dtype=torch.float64)
        self.corrupted_value = torch.as_tensor(corrupted_value, dtype=torch.float64)
        gap = self.clean_value - self.corrupted_value
        if (gap == 0).any():
            bad = (gap == 0).nonzero().flatten().tolist()
            raise ApexlensError(
                f"clean and corrupted logit differences are equal for examples {bad}: recovery is undefined"
            )

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        ld = super().reduce(selected)
        return recovery(ld, self.clean_value.to(ld), self.corrupted_value.to(ld))


def recovery(patched: Tensor, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """``(patched - corrupted) / (clean - corrupted)``."""
    clean_t = torch.as_tensor(clean, dtype=patched.dtype)
    corr_t = torch.as_tensor(corrupted, dtype=patched.dtype)
    gap = clean_t - corr_t
    if (gap == 0).any():
        raise ApexlensError("clean and corrupted values are equal: recovery is undefined")
    return (patched - corr_t) / gap


class _AgainstClean(Metric):
    """A metric comparing the logits with the clean run's at ``positions``."""

    def __init__(self, clean_logits: Float[Tensor, "batch pos vocab"], positions: Positions = -1):
        if clean_logits.ndim != 3:
            raise ApexlensError(
                f"clean_logits must be [batch, pos, vocab], got {tuple(clean_logits.shape)}"
            )
        self.positions = positions
        self.tokens = None
        idx = self.read_positions(clean_logits.shape[0], clean_logits.shape[1])
        self.clean = clean_logits.detach().gather(
            1, idx[..., None].expand(-1, -1, clean_logits.shape[-1])
        )

    def _clean_like(self, selected: Tensor) -> Tensor:
        ref = self.clean.to(selected)
        if ref.shape != selected.shape[-3:]:
            raise ApexlensError(
                f"{self.name}: logits {tuple(selected.shape[-3:])} do not match the clean run "
                f"{tuple(ref.shape)}"
            )
        return ref


class KLDivergence(_AgainstClean):
    """``KL(clean || patched)`` of the next-token distribution at ``positions``, per example
    (mean over positions). ``clean_logits``: ``[batch, pos, vocab]`` logits of the clean run."""

    name = "kl_divergence"

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        ref = F.log_softmax(self._clean_like(selected), dim=-1)
        lp = F.log_softmax(selected, dim=-1)
        return (ref.exp() * (ref - lp)).sum(-1).mean(-1)


class OutputSquaredError(_AgainstClean):
    """Squared distance of the outputs from the clean run's at ``positions``, per example
    (mean over positions and output columns). 0 on the clean run, larger = further away.

    The metric for models without a next-token distribution -- a single-logit output
    (``d_vocab_out = 1``, regression heads) -- where KL divergence is always 0.
    ``clean_logits``: ``[batch, pos, d_vocab_out]`` outputs of the clean run.
    """

    name = "output_squared_error"

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        return (selected - self._clean_like(selected)).pow(2).mean(-1).mean(-1)


class AnswerLogProb(Metric):
    """Log-probability of the answer token at ``positions``, per example."""

    name = "answer_logprob"

    def __init__(self, answer_tokens: Any, positions: Positions = -1):
        self.answer = _per_example(_as_long(answer_tokens, "answer_tokens"))
        self.positions = positions
        self.tokens = None

    def _answer(self, values: Float[Tensor, "*lead batch k n_tok"]) -> Float[Tensor, "*lead batch"]:
        """``values`` at each example's answer token, averaged over its positions."""
        batch, k = values.shape[-3], values.shape[-2]
        a = self.answer.to(values.device)
        a = a.expand(batch)[:, None].expand(batch, k) if a.ndim == 1 else a
        return values.gather(-1, a.expand(*values.shape[:-1])[..., None])[..., 0].mean(-1)

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        return self._answer(F.log_softmax(selected, dim=-1))


class AnswerProb(AnswerLogProb):
    """Softmax probability of the answer token at ``positions``, per example."""

    name = "answer_prob"

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        return self._answer(F.softmax(selected, dim=-1))


class FunctionMetric(Metric):
    """Wrap ``fn(selected[..., batch, k, n_tok]) -> [..., batch]`` as a declared metric."""

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        positions: Positions = None,
        tokens: Any = None,
        name: str = "function",
    ):
        self.fn, self.positions, self.name = fn, positions, name
        self.tokens = None if tokens is None else _as_long(tokens, "tokens")

    def reduce(
        self, selected: Float[Tensor, "*lead batch k n_tok"]
    ) -> Float[Tensor, "*lead batch"]:
        return self.fn(selected)


# ============================================================================ results
@dataclass(frozen=True)
class Scores:
    """Per-example values with their mean, standard error and bootstrap interval."""

    values: Float[Tensor, " batch"]

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.values)
        v = (v.detach() if v.requires_grad else v).flatten()
        object.__setattr__(self, "values", v)

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def mean(self) -> float:
        return float(self.values.double().mean())

    @property
    def sem(self) -> float:
        n = len(self)
        if n < 2:
            return float("nan")
        return float(self.values.double().std(unbiased=True) / n**0.5)

    def ci(self, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval of the mean (seeded, reproducible)."""
        if not 0 < level < 1:
            raise ApexlensError(f"level must be in (0, 1), got {level}")
        v = self.values.double()
        n = len(self)
        if n == 0:
            raise ApexlensError("no values")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (n_boot, n), generator=g)
        means = v[idx].mean(1)
        lo, hi = torch.quantile(
            means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        )
        return float(lo), float(hi)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"example": range(len(self)), "value": self.values.double().numpy()})


def scores_frame(scores: Mapping[str, Scores], level: float = 0.95) -> pd.DataFrame:
    """One row per named :class:`Scores`: mean, sem, bootstrap interval, n."""
    rows = []
    for name, s in scores.items():
        lo, hi = s.ci(level)
        rows.append(
            {"name": name, "mean": s.mean, "sem": s.sem, "ci_low": lo, "ci_high": hi, "n": len(s)}
        )
    return pd.DataFrame(rows)
