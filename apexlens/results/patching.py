"""Answers of path patching and activation patching: one row per sender or node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.results.io import Saveable
from apexlens.results.labels import node_fields
from apexlens.results.stats import ratio_interval
from apexlens.scoring import Scores

SUMMARY = [
    "sender", "value", "ci_low", "ci_high", "normalized", "normalized_low", "normalized_high",
    "sem",
]
"""The columns of ``summary()``."""


@dataclass
class PathPatchResult(Saveable):
    """Per-sender metric values of a path-patching sweep.

    ``to_frame()`` columns: ``sender``, ``layer``, ``head`` (None where not a head/MLP),
    ``value`` (mean metric with the sender patched), ``normalized`` (:meth:`normalized`),
    ``sem`` (standard error of ``value`` over examples), ``ci_low`` / ``ci_high`` (95%
    seeded bootstrap interval of ``value``), ``normalized_low`` / ``normalized_high`` (95%
    seeded bootstrap interval of ``normalized``: the ratio computed in every bootstrap
    sample, examples resampled together for patched, clean and corrupted values). With
    ``separate`` (one value per receiver, ``per_example`` ``[sender, receiver, batch]``), one
    row per sender and receiver, with a ``receiver`` column.
    """

    senders: list[str]
    receivers: list[str]
    per_example: Float[Tensor, "sender batch"]
    clean: Scores
    corrupted: Scores
    grid: tuple[int, ...] | None = None
    metric_name: str = "metric"
    via: list[str] = field(default_factory=list)
    separate: bool = False
    kind: ClassVar[str] = "path_patch"
    normalized_meaning: ClassVar[str] = "0 = no effect, -1 = the whole clean-corrupted difference"

    @property
    def values(self) -> Tensor:
        """Mean metric per sender; ``[n_layers, n_heads]`` when the senders are all heads
        (``[..., n_receivers]`` with :attr:`separate`)."""
        v = self.per_example.mean(-1)
        if not self.grid:
            return v
        return v.reshape(*self.grid, v.shape[1]) if self.separate else v.reshape(self.grid)

    def _gap(self) -> float:
        gap = self.clean.mean - self.corrupted.mean
        if gap == 0:
            raise ApexlensError("clean and corrupted metrics are equal; normalisation is undefined")
        return gap

    def normalized(self) -> Tensor:
        """``(patched - clean) / (clean - corrupted)``: 0 = no effect, -1 = the whole effect."""
        return (self.values - self.clean.mean) / self._gap()

    def _baseline(self) -> Scores:
        """What :meth:`normalized` subtracts: the clean metric."""
        return self.clean

    def normalized_ci(
        self, level: float = 0.95, n_boot: int = 1000, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval of :meth:`normalized` (shaped like it): the ratio is
        computed in each bootstrap sample, examples resampled together for the patched,
        clean and corrupted values (the same draws as the interval of ``value``)."""
        if not 0 < level < 1:
            raise ApexlensError(f"level must be in (0, 1), got {level}")
        self._gap()
        base = self._baseline().values.double().cpu()
        num = self.per_example.detach().double().cpu() - base
        den = self.clean.values.double().cpu() - self.corrupted.values.double().cpu()
        lo, hi = ratio_interval(num, den, level, n_boot, seed)
        shape = self.values.shape
        return lo.reshape(shape), hi.reshape(shape)

    def scores(self, sender: str | int, receiver: str | int | None = None) -> Scores:
        """Per-example values of a sender (and, with :attr:`separate`, a receiver)."""
        i = self.senders.index(sender) if isinstance(sender, str) else sender
        if not self.separate:
            return Scores(self.per_example[i])
        if receiver is None:
            raise ApexlensError("separate results have one value per receiver: name one")
        j = self.receivers.index(receiver) if isinstance(receiver, str) else receiver
        return Scores(self.per_example[i, j])

    def to_frame(self) -> pd.DataFrame:
        rows = []
        norm = self.normalized().reshape(len(self.senders), -1)
        n_lo, n_hi = (x.reshape(len(self.senders), -1) for x in self.normalized_ci())
        for i, s in enumerate(self.senders):
            layer, head = node_fields(s)
            for j, r in enumerate(self.receivers if self.separate else [None]):
                sc = self.scores(i, j if self.separate else None)
                lo, hi = sc.ci()
                row: dict[str, Any] = {"sender": s} if r is None else {"sender": s, "receiver": r}
                row.update(
                    {
                        "layer": layer,
                        "head": head,
                        "value": float(sc.mean),
                        "normalized": float(norm[i, j]),
                        "sem": float(sc.sem),
                        "ci_low": float(lo),
                        "ci_high": float(hi),
                        "normalized_low": float(n_lo[i, j]),
                        "normalized_high": float(n_hi[i, j]),
                    }
                )
                rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """:meth:`to_frame` without the layer and head columns: each value and normalised
        effect with its interval (and, with :attr:`separate`, its receiver)."""
        cols = [SUMMARY[0], "receiver", *SUMMARY[1:]] if self.separate else SUMMARY
        return self.to_frame()[cols]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.senders)} senders -> {self.receivers or 'outputs'}, "
            f"metric {self.metric_name}: clean {self.clean.mean:.4g}, corrupted "
            f"{self.corrupted.mean:.4g}; n={len(self.clean)})"
        )


@dataclass(repr=False)
class ActPatchResult(PathPatchResult):
    """Per-node metric values of activation patching: the corrupted run with one node's
    clean activation put back (TransformerLens' ``get_act_patch_*`` convention).

    ``normalized`` is ``(patched - corrupted) / (clean - corrupted)``: 0 = nothing
    restored, 1 = the clean behaviour fully restored. ``to_frame()`` has the columns of
    :class:`PathPatchResult` (``sender`` names the patched node).
    """

    kind: ClassVar[str] = "act_patch"
    normalized_meaning: ClassVar[str] = "0 = nothing restored, 1 = clean behaviour restored"

    def normalized(self) -> Tensor:
        """``(patched - corrupted) / (clean - corrupted)``: 0 = nothing restored, 1 = all."""
        return (self.values - self.corrupted.mean) / self._gap()

    def _baseline(self) -> Scores:
        return self.corrupted
