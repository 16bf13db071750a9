"""The answer of a circuit hypothesis: its metric, recovery and proportion explained."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from apexlens.errors import ApexlensError
from apexlens.results.io import Saveable
from apexlens.scoring import Scores


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
      corrupted run's value), ``mean`` (the mean over reference inputs) or ``zero``.

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

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "n_edges": len(self.edges),
                    "metric": float(self.scores.mean),
                    "clean": float(self.clean.mean),
                    "ablated": float(self.corrupted.mean),
                    "recovery": self.recovery,
                    "proportion_explained": self.proportion_explained,
                    "aue": self.aue,
                    "ate": self.ate,
                    "ablation": self.ablation,
                }
            ]
        )

    def summary(self) -> pd.DataFrame:
        """``n_edges``, ``metric``, ``recovery``, ``proportion_explained``."""
        return self.to_frame()[["n_edges", "metric", "recovery", "proportion_explained"]]

    def __repr__(self) -> str:
        return (
            f"CircuitResult({len(self.edges)} edges, {self.ablation} ablation: metric "
            f"{self.scores.mean:.4g} (clean {self.clean.mean:.4g}, ablated "
            f"{self.corrupted.mean:.4g}), recovery {self.recovery:.3f}; n={len(self.scores)})"
        )

