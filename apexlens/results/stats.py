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
