"""Statistics the results share: ranks, rank correlation, areas, entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def entropy(p: Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())



def ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), 0-based, float64."""
    x = x.double().cpu()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, len(x)
    # walk runs of equal values
    boundaries = torch.nonzero(sorted_x[1:] != sorted_x[:-1]).flatten().tolist() + [n - 1]
    for j in boundaries:
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either is
    constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``|scores|``; ties broken by edge order (stable)."""
    order = torch.argsort(-scores.abs().double().cpu(), stable=True)
    return order[:k]



def trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def bootstrap_weights(n: int, n_boot: int = 1000, seed: int = 0) -> Tensor:
    """``[n_boot, n]`` float64 resampling weights: row ``b`` counts how often each example is
    drawn in bootstrap sample ``b`` (the same draws as :meth:`apexlens.Scores.ci` with this
    seed), so ``values @ weights.T / n`` is every bootstrap sample's mean at once."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    w = torch.zeros(n_boot, n, dtype=torch.float64)
    return w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def percentile_interval(samples: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """The ``level`` percentile interval over the last axis (NaN samples left out; NaN
    where none is finite)."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = torch.nanquantile(samples.double(), q, dim=-1)
    return out[0], out[1]


def ratio_interval(
    numerator: Tensor,
    denominator: Tensor,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of ``mean(numerator) / mean(denominator)``, the ratio
    computed in every bootstrap sample (examples resampled together: numerator and
    denominator are paired per example). ``numerator``: ``[..., batch]``; ``denominator``:
    ``[batch]``. A sample whose denominator mean is 0 is left out."""
    n = numerator.shape[-1]
    w = bootstrap_weights(n, n_boot, seed) / n
    num = numerator.double().cpu() @ w.T
    den = denominator.double().cpu() @ w.T
    ratio = torch.where(den != 0, num / den, torch.full_like(num, float("nan")))
    return percentile_interval(ratio, level)
