"""Escape noise as a measurement (:class:`EscapeNoise`) and the comparison of two models'
escape-noise distributions (:class:`EscapeComparison`).

**Definition.** Draw ``d`` of sample ``i`` is a ray ``sigma -> sigma * xi[i, d]`` (the same
standard-normal direction at every sigma). Its *first escape* ``e[i, d]`` is the smallest
sigma at which the prediction differs from the clean one. The **escape noise** of sample
``i`` is the median of ``e[i, .]`` over noise directions: the noise level at which half of
the directions have moved the prediction. It is monotone by construction; when no draw comes
back to the clean token after leaving it, it equals "the smallest sigma at which at most half
of the draws still predict the clean token".

**Precision and interval.** Each ray's first escape is bracketed, ``lo < e <= hi``, to
``hi <= lo * (1 + rtol)``; a sample's value is the geometric middle of its median ray's
bracket, so it is within a factor ``sqrt(1 + rtol)`` of the median of the rays' first
escapes. ``[low, high]`` is a distribution-free interval for the *population* median (over
all noise directions): the order statistics ``(e_(l), e_(u))`` with ranks from
``Bin(n_draws, 1/2)`` cover it with probability ``>= confidence``; each bound is widened to
the outer end of its bracket, so the search precision is inside it.

**Censoring.** ``censored``: more than half of the rays never escape up to ``sigma_hi`` (the
value is ``inf``; ``high`` is ``inf`` whenever the upper order statistic is censored).
``left_censored``: the median ray escaped already at ``sigma_lo`` (the value ``sigma_lo`` is
an upper bound). Censored samples rank above every measured one in :meth:`compare` and
:meth:`correlations` (rank statistics), and are counted in :meth:`summary`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.results.io import Saveable
from apexlens.results.labels import TokenLabels, labels_of
from apexlens.results.stats import auc_ci, median_ci_ranks, spearman_ci


@dataclass
class EscapeNoise(Saveable):
    """Per-sample escape noise with an interval (module docstring); one row per sample in
    :meth:`to_frame`, the distribution in :meth:`summary`."""

    values: Float[Tensor, " n_samples"]
    low: Float[Tensor, " n_samples"]
    high: Float[Tensor, " n_samples"]
    censored: Bool[Tensor, " n_samples"]
    left_censored: Bool[Tensor, " n_samples"]
    first_low: Float[Tensor, "n_draws n_samples"]
    """Every ray's bracket ``first_low < e <= first_high`` (``inf``: never escaped)."""
    first_high: Float[Tensor, "n_draws n_samples"]
    escape_token: Int[Tensor, "n_draws n_samples"]
    """What each ray's prediction escaped to (``-1``: it never escaped)."""
    clean_predictions: Int[Tensor, " n_samples"]
    clean_runner_up: Int[Tensor, " n_samples"]
    clean_margin: Float[Tensor, " n_samples"]
    """Clean logit of the top-1 token minus that of the top-2 token."""
    prompt_tokens: Int[Tensor, "n_samples pos"]
    sample_position: Int[Tensor, " n_samples"]
    d_vocab: int
    sigma_lo: float
    sigma_hi: float
    rtol: float
    confidence: float
    n_forwards: int
    n_degenerate: int
    sites: tuple[str, ...]
    relative: bool
    seed: int
    clean_loss: Float[Tensor, " n_samples"] | None = None
    """Cross-entropy of the clean prediction against ``labels`` (when given)."""
    token_labels: TokenLabels | None = field(default=None, repr=False)

    @property
    def n_samples(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_draws(self) -> int:
        return int(self.first_high.shape[0])

    @classmethod
    def from_rays(
        cls, lo: Tensor, hi: Tensor, token: Tensor, confidence: float, **fields: object
    ) -> EscapeNoise:
        """The per-sample values and intervals of the module docstring from every ray's
        bracket ``lo < e <= hi`` (``[n_draws, n_samples]``)."""
        k_draws = hi.shape[0]
        point = torch.where(
            torch.isfinite(hi), torch.sqrt(lo.clamp_min(1e-300) * hi), torch.full_like(hi, math.inf)
        )
        point = torch.where((lo == 0) & torch.isfinite(hi), hi, point)
        # e_d lies in (lo_d, hi_d], so the j-th smallest e lies between the j-th smallest lo
        # and the j-th smallest hi: sort each on its own
        s_point, s_lo, s_hi = (x.sort(dim=0).values for x in (point, lo, hi))
        k = (k_draws + 1) // 2  # the lower median
        lower, upper = median_ci_ranks(k_draws, confidence)
        n = hi.shape[1]
        low = s_lo[lower - 1] if lower >= 1 else torch.zeros(n, dtype=torch.float64)
        high = s_hi[upper - 1] if upper <= k_draws else torch.full((n,), math.inf, dtype=torch.float64)
        values = s_point[k - 1]
        return cls(
            values=values, low=low, high=high, censored=~torch.isfinite(values),
            left_censored=s_lo[k - 1] == 0, first_low=lo, first_high=hi, escape_token=token,
            confidence=confidence, **fields,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ tables
    def to_frame(self) -> pd.DataFrame:
        """One row per sample: ``escape_noise`` (inf: censored) with ``low`` / ``high``,
        ``censored``, ``left_censored``, the clean prediction (+ label), its runner-up,
        ``margin``, ``loss`` (if labels were given) and where the median ray escaped to."""
        k = (self.n_draws + 1) // 2
        point = torch.where(torch.isfinite(self.first_high), self.first_high, math.inf)
        median_ray = point.argsort(dim=0, stable=True)[k - 1]
        to = self.escape_token.gather(0, median_ray[None])[0]
        frame = pd.DataFrame(
            {
                "sample": range(self.n_samples),
                "escape_noise": self.values.tolist(),
                "low": self.low.tolist(),
                "high": self.high.tolist(),
                "censored": self.censored.tolist(),
                "left_censored": self.left_censored.tolist(),
                "clean_prediction": self.clean_predictions.tolist(),
                "clean_label": labels_of(self.clean_predictions, self.token_labels),
                "runner_up": self.clean_runner_up.tolist(),
                "margin": self.clean_margin.tolist(),
                "escapes_to": to.tolist(),
            }
        )
        if self.clean_loss is not None:
            frame.insert(frame.columns.get_loc("margin") + 1, "loss", self.clean_loss.tolist())
        return frame

    def summary(self) -> pd.DataFrame:
        """The distribution in one row: samples, draws, median / quartiles of the escape
        noise (censored samples count as ``inf``), censored shares, the relative width of the
        intervals, forwards per sample."""
        v = self.values[torch.isfinite(self.values)]
        width = ((self.high - self.low) / self.values)[torch.isfinite(self.high) & ~self.censored]
        q = self.values.quantile(
            torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), interpolation="lower"
        )  # censored samples are inf: no interpolation between inf and a number
        return pd.DataFrame(
            [
                {
                    "samples": self.n_samples,
                    "draws": self.n_draws,
                    "median": float(q[1]),
                    "q25": float(q[0]),
                    "q75": float(q[2]),
                    "min": float(v.min()) if len(v) else math.nan,
                    "censored": float(self.censored.double().mean()),
                    "left_censored": float(self.left_censored.double().mean()),
                    "median_rel_width": float(width.median()) if len(width) else math.nan,
                    "forwards_per_sample": self.n_forwards / max(self.n_samples, 1),
                    "degenerate": self.n_degenerate,
                }
            ]
        )

    # ------------------------------------------------------------------ analyses
    def correlations(
        self,
        measures: Mapping[str, Tensor] | None = None,
        *,
        n_boot: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Spearman rank correlation of the escape noise with per-sample regularity measures,
        each with a percentile bootstrap interval: the clean ``margin``, the clean ``loss``
        (when labels were given) and any ``measures`` (name -> ``[n_samples]``, e.g. a
        learning-speed C-score proxy)."""
        items: dict[str, Tensor] = {"margin": self.clean_margin}
        if self.clean_loss is not None:
            items["loss"] = self.clean_loss
        for name, m in (measures or {}).items():
            m = torch.as_tensor(m, dtype=torch.float64).flatten()
            if len(m) != self.n_samples:
                raise ApexlensError(
                    f"measure {name!r} has {len(m)} values for {self.n_samples} samples"
                )
            items[name] = m
        rows = []
        for name, m in items.items():
            rho, lo, hi = spearman_ci(self.values, m, n_boot, confidence, seed)
            rows.append(dict(measure=name, spearman=rho, low=lo, high=hi, n=self.n_samples))
        return pd.DataFrame(rows)

    def compare(
        self,
        other: EscapeNoise,
        names: tuple[str, str] = ("a", "b"),
        *,
        n_boot: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> EscapeComparison:
        """Do this model's samples withstand more noise than ``other``'s? The AUC
        ``P(escape here > escape there)`` (ties half) with a bootstrap interval."""
        a, lo, hi = auc_ci(self.values, other.values, n_boot, confidence, seed)
        return EscapeComparison(
            names=names, auc=a, low=lo, high=hi, confidence=confidence,
            n=(self.n_samples, other.n_samples),
            medians=(float(self.values.median()), float(other.values.median())),
            censored=(float(self.censored.double().mean()), float(other.censored.double().mean())),
        )

    def destinations(
        self,
        classes: Tensor | list[int] | None = None,
        targets: Mapping[str, Tensor] | None = None,
    ) -> pd.DataFrame:
        """Where predictions go when they escape: the share of escaped rays whose first
        escape lands on the clean runner-up, on a token of the prompt, outside ``classes``
        (the tokens the model is trained to answer, when given), or on the per-sample tokens
        of ``targets`` (e.g. ``{"true label": labels}``), each against ``chance``: the share
        if the escape went to a uniformly random other token (of ``classes``), and
        ``enrichment = share / chance``."""
        esc = self.escape_token
        hit = esc >= 0
        allowed = None
        if classes is not None:
            allowed = torch.zeros(self.d_vocab, dtype=torch.bool)
            allowed[torch.as_tensor(classes, dtype=torch.long)] = True
        n_other = self._n_other(allowed)
        cats: dict[str, tuple[Tensor, Tensor]] = {
            "clean runner-up": (
                esc == self.clean_runner_up[None],
                self._is_allowed(self.clean_runner_up, allowed).double() / n_other,
            ),
            "a token of the prompt": (self._in_prompt(esc), self._prompt_chance(allowed, n_other)),
        }
        if allowed is not None:
            outside = ~allowed[esc.clamp_min(0)]
            cats["outside classes"] = (outside, torch.zeros(self.n_samples, dtype=torch.float64))
        for name, t in (targets or {}).items():
            t = torch.as_tensor(t, dtype=torch.long).flatten()
            differs = (t != self.clean_predictions).double()
            cats[name] = (esc == t[None], differs * self._is_allowed(t, allowed).double() / n_other)
        rows = []
        for name, (mask, chance) in cats.items():
            share = float((mask & hit).sum()) / max(int(hit.sum()), 1)
            ch = float((chance[None].expand_as(esc)[hit]).mean()) if hit.any() else math.nan
            rows.append(dict(destination=name, share=share, chance=ch,
                             enrichment=share / ch if ch and ch > 0 else math.nan,
                             escaped_rays=int(hit.sum())))
        return pd.DataFrame(rows)

    def _n_other(self, allowed: Tensor | None) -> Tensor:
        """Per sample: how many tokens an escape could go to (allowed, not the clean one)."""
        if allowed is None:
            return torch.full((self.n_samples,), float(max(self.d_vocab - 1, 1)), dtype=torch.float64)
        inside = self._is_allowed(self.clean_predictions, allowed).double()
        return (float(allowed.sum()) - inside).clamp_min(1.0)

    @staticmethod
    def _is_allowed(tokens: Tensor, allowed: Tensor | None) -> Tensor:
        return torch.ones(len(tokens), dtype=torch.bool) if allowed is None else allowed[tokens]

    def _in_prompt(self, esc: Tensor) -> Tensor:
        """``[n_draws, n_samples]``: whether each escape token occurs in its prompt."""
        return (esc[..., None] == self.prompt_tokens[None]).any(dim=-1)

    def _prompt_chance(self, allowed: Tensor | None, n_other: Tensor) -> Tensor:
        out = torch.zeros(self.n_samples, dtype=torch.float64)
        for i in range(self.n_samples):
            toks = torch.unique(self.prompt_tokens[i])
            toks = toks[toks != self.clean_predictions[i]]
            out[i] = float(self._is_allowed(toks, allowed).sum()) / float(n_other[i])
        return out


@dataclass
class EscapeComparison(Saveable):
    """Two escape-noise distributions compared: ``auc = P(escape of a > escape of b)``
    (ties half; censored samples count as ``inf``) with a percentile bootstrap interval at
    ``confidence`` (both groups resampled). ``low > 0.5``: model a's samples withstand more
    noise."""

    names: tuple[str, str]
    auc: float
    low: float
    high: float
    confidence: float
    n: tuple[int, int]
    medians: tuple[float, float]
    censored: tuple[float, float]

    @property
    def separates(self) -> bool:
        """Whether the interval excludes 0.5."""
        return self.low > 0.5 or self.high < 0.5

    def to_frame(self) -> pd.DataFrame:
        """One row: ``a``, ``b``, ``auc``, ``low``, ``high``, the sample counts, the median
        escape noise and censored share of each."""
        a, b = self.names
        return pd.DataFrame(
            [
                {
                    "a": a, "b": b, "auc": self.auc, "low": self.low, "high": self.high,
                    "n_a": self.n[0], "n_b": self.n[1], "median_a": self.medians[0],
                    "median_b": self.medians[1], "censored_a": self.censored[0],
                    "censored_b": self.censored[1],
                }
            ]
        )

    def summary(self) -> pd.DataFrame:
        return self.to_frame()
