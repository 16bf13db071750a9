"""The answer of a circuit hypothesis: its metric, recovery and proportion explained."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from apexlens.errors import ApexlensError
from apexlens.results.io import Saveable
from apexlens.results.stats import ratio_interval
from apexlens.scoring import Scores

ABLATION_MEANING: dict[str, str] = {
    "resample": "resample ablation: every edge outside the hypothesis carries its value "
    "from the corrupted run, so recovery is the share of the clean-vs-corrupted difference "
    "that the hypothesis alone carries (the question path patching asks).",
    "mean": "mean ablation: every edge outside the hypothesis carries its mean over the "
    "reference inputs (default: the corrupted ones), so recovery asks how much of the "
    "behaviour the hypothesis carries against an average input; 'ablated' is every edge at "
    "its mean, not the corrupted run. Edges left out that carry what every input shares "
    "(positions, the prompt's format) keep only their average: the numbers can differ "
    "widely from resample ablation's for the same edges.",
    "zero": "zero ablation: every edge outside the hypothesis carries zero, an activation "
    "the model never sees, so recovery asks what the hypothesis does with everything else "
    "removed (off-distribution), not what share of the clean-vs-corrupted difference it "
    "carries; it can differ widely from resample ablation's for the same edges.",
}
"""What each ablation means for a circuit's numbers (results, reports and the README)."""

ABLATION_SHORT: dict[str, str] = {
    "resample": "the share of clean - corrupted the edges carry",
    "mean": "against an average input",
    "zero": "everything else zeroed, off-distribution",
}
"""The same in a few words, for the repr (``ablation_meaning`` says it in full)."""


@dataclass(repr=False)
class CircuitResult(Saveable):
    """The metric under a circuit hypothesis, with its recovery and proportion explained.

    Columns of ``to_frame()`` / ``summary()`` (one row):

    * ``n_edges`` -- edges in the hypothesis;
    * ``metric`` -- mean metric with every edge outside the hypothesis ablated;
    * ``clean`` / ``ablated`` -- mean metric of the clean run / with every edge ablated
      (for resample ablation: the corrupted run);
    * ``recovery`` -- ``(metric - ablated) / (clean - ablated)``: 1 = the hypothesis keeps
      all of the behaviour, 0 = none;
    * ``proportion_explained`` -- ``1 - aue / ate`` (Goldowsky-Dill et al. 2023), NaN where
      ``ate`` is 0 (a single-logit output has no distribution to compare: use recovery);
    * ``aue`` -- mean KL divergence from the clean next-token distribution to the
      hypothesis' (at the positions the metric reads);
    * ``ate`` -- the same to the fully ablated model's;
    * ``ablation`` -- what an edge outside the hypothesis carries: ``resample`` (the
      corrupted run's value), ``mean`` (the mean over reference inputs) or ``zero``
      (:attr:`ablation_meaning` says what that choice means for the numbers);
    * ``metric_low`` / ``metric_high``, ``recovery_low`` / ``recovery_high``,
      ``proportion_explained_low`` / ``proportion_explained_high`` -- 95% seeded percentile
      bootstrap intervals over the examples; a ratio (recovery, proportion explained) is
      computed in every bootstrap sample, its numerator and denominator resampled together.

    Everything is held as values (the per-example metric and KL divergences); nothing refers
    back to the model or its activations.
    """

    edges: list[tuple[str, str]]
    scores: Scores
    clean: Scores
    corrupted: Scores
    """The metric with every edge ablated (for resample ablation: the corrupted run)."""
    recovery: float
    ablation: str = "resample"
    kl_circuit: Scores | None = None
    """Per example: ``KL(clean || hypothesis)`` (the AUE's terms)."""
    kl_ablated: Scores | None = None
    """Per example: ``KL(clean || fully ablated)`` (the ATE's terms)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the result was computed on: model, metric, number of examples."""

    def _kls(self) -> tuple[float, float]:
        if self.kl_circuit is None or self.kl_ablated is None:
            raise ApexlensError("this CircuitResult has no KL information")
        return self.kl_circuit.mean, self.kl_ablated.mean

    @property
    def aue(self) -> float:
        return self._kls()[0]

    @property
    def ate(self) -> float:
        return self._kls()[1]

    @property
    def proportion_explained(self) -> float:
        aue, ate = self._kls()
        if ate > 0:
            return 1.0 - aue / ate
        warnings.warn(
            "proportion explained is undefined (NaN): ATE, the mean KL divergence from the clean "
            "outputs to the fully ablated ones, is 0 -- a single output (d_vocab_out = 1) has no "
            "next-token distribution, or ablation leaves the distribution unchanged. Use recovery "
            "with a metric that reads the output, e.g. apexlens.scoring.OutputSquaredError",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")

    @property
    def ablation_meaning(self) -> str:
        """What the ablation choice means for recovery and proportion explained."""
        return ABLATION_MEANING.get(self.ablation, f"{self.ablation} ablation")

    def recovery_ci(
        self, level: float = 0.95, n_boot: int = 1000, seed: int = 0
    ) -> tuple[float, float]:
        """Percentile bootstrap interval of :attr:`recovery`: ``(metric - ablated) / (clean -
        ablated)`` computed in every bootstrap sample of the examples (paired)."""
        m, c, a = (x.values.double().cpu() for x in (self.scores, self.clean, self.corrupted))
        lo, hi = ratio_interval(m - a, c - a, level, n_boot, seed)
        return float(lo), float(hi)

    def proportion_explained_ci(
        self, level: float = 0.95, n_boot: int = 1000, seed: int = 0
    ) -> tuple[float, float]:
        """Percentile bootstrap interval of :attr:`proportion_explained`, ``1 - aue / ate``
        computed in every bootstrap sample of the examples (NaN without KL information or
        where ``ate`` is 0)."""
        if self.kl_circuit is None or self.kl_ablated is None:
            return float("nan"), float("nan")
        lo, hi = ratio_interval(self.kl_circuit.values, self.kl_ablated.values, level, n_boot, seed)
        return 1.0 - float(hi), 1.0 - float(lo)

    def to_frame(self) -> pd.DataFrame:
        m_lo, m_hi = self.scores.ci()
        r_lo, r_hi = self.recovery_ci()
        p_lo, p_hi = self.proportion_explained_ci()
        return pd.DataFrame(
            [
                {
                    "n_edges": len(self.edges),
                    "metric": float(self.scores.mean),
                    "metric_low": m_lo,
                    "metric_high": m_hi,
                    "clean": float(self.clean.mean),
                    "ablated": float(self.corrupted.mean),
                    "recovery": self.recovery,
                    "recovery_low": r_lo,
                    "recovery_high": r_hi,
                    "proportion_explained": self.proportion_explained,
                    "proportion_explained_low": p_lo,
                    "proportion_explained_high": p_hi,
                    "aue": self.aue,
                    "ate": self.ate,
                    "ablation": self.ablation,
                }
            ]
        )

    def summary(self) -> pd.DataFrame:
        """``n_edges``, ``metric``, ``recovery`` and ``proportion_explained`` with their
        intervals, and ``ablation``."""
        return self.to_frame()[
            [
                "n_edges", "metric", "metric_low", "metric_high", "recovery", "recovery_low",
                "recovery_high", "proportion_explained", "proportion_explained_low",
                "proportion_explained_high", "ablation",
            ]
        ]

    def __repr__(self) -> str:
        lo, hi = self.recovery_ci()
        return (
            f"CircuitResult({len(self.edges)} edges, {self.ablation} ablation: metric "
            f"{self.scores.mean:.4g} (clean {self.clean.mean:.4g}, ablated "
            f"{self.corrupted.mean:.4g}), recovery {self.recovery:.3f} [95% CI {lo:.3f}, "
            f"{hi:.3f}]; n={len(self.scores)}: {ABLATION_SHORT.get(self.ablation, '')})"
        )

