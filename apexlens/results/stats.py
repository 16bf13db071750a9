"""Statistics the results share: ranks, rank correlation, areas, entropy, and the tests and
intervals of APEX (normal tails, binomial order statistics, cluster standard errors, AUC,
bootstrap intervals)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


# ------------------------------------------------------------------ tests and intervals
Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile."""


def norm_sf(z: float) -> float:
    """``P(Z > z)`` for a standard normal ``Z``."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def norm_quantile(p: float) -> float:
    """The standard normal's ``p``-quantile (bisection on :func:`norm_sf`; exact to 1e-12)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - norm_sf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def binom_cdf(k: int, n: int, p: float = 0.5) -> float:
    """``P(B <= k)`` for ``B ~ Bin(n, p)`` (log-space terms: exact for large ``n`` too)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
        for j in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int]:
    """1-based ranks ``(l, u)`` such that the order statistics ``X_(l) <= X_(u)`` of ``n``
    i.i.d. continuous draws cover their median with probability ``>= confidence``
    (distribution-free: ``P(X_(l) > median) = P(Bin(n, 1/2) <= l - 1)``). ``l = 0`` /
    ``u = n + 1``: too few draws, the interval is unbounded on that side."""
    alpha = 1.0 - confidence
    lower = 0
    while lower + 1 <= n and binom_cdf(lower, n) <= alpha / 2:
        lower += 1
    return lower, n + 1 - lower


def cluster_mean_se(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over clusters (axis 0) and its standard error ``sd / sqrt(n)``: clusters (prompts)
    are independent, the draws inside one are not, so the cluster is the unit. One cluster:
    the SE is NaN."""
    v = values.double()
    n = v.shape[0]
    mean = v.mean(dim=0)
    if n < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, v.std(dim=0, unbiased=True) / math.sqrt(n)


def mean_ranks(x: Tensor, among: Tensor | None = None) -> Tensor:
    """1-based average ranks of ``x`` among the values ``among`` (default ``x``); ties share
    their mean rank; ``inf`` ranks last."""
    ref = (x if among is None else among).double().sort().values
    xd = x.double()
    less = torch.searchsorted(ref, xd, right=False)
    leq = torch.searchsorted(ref, xd, right=True)
    return (less + 1 + leq).double() / 2


def auc(pos: Tensor, neg: Tensor) -> float:
    """``P(pos > neg) + P(pos = neg) / 2`` (Mann-Whitney), from average ranks."""
    both = torch.cat([pos.double(), neg.double()])
    r = mean_ranks(pos, both).sum()
    n1, n0 = len(pos), len(neg)
    return float((r - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap(
    stat: Callable[[Tensor], float],
    n: int,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(idx)`` over resamples ``idx`` of ``range(n)``
    (seeded); NaN replicates are dropped."""
    g = torch.Generator().manual_seed(seed)
    reps = torch.tensor([stat(torch.randint(0, n, (n,), generator=g)) for _ in range(n_boot)])
    reps = reps[~torch.isnan(reps)]
    if not len(reps):
        return float("nan"), float("nan")
    a = (1.0 - confidence) / 2
    return float(reps.quantile(a)), float(reps.quantile(1 - a))


def auc_ci(
    pos: Tensor, neg: Tensor, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """:func:`auc` with a percentile bootstrap interval (both groups resampled)."""
    g = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(n_boot):
        a = pos[torch.randint(0, len(pos), (len(pos),), generator=g)]
        b = neg[torch.randint(0, len(neg), (len(neg),), generator=g)]
        reps.append(auc(a, b))
    r = torch.tensor(reps)
    q = (1.0 - confidence) / 2
    return auc(pos, neg), float(r.quantile(q)), float(r.quantile(1 - q))


def spearman_ci(
    a: Tensor, b: Tensor, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """:func:`spearman` with a percentile bootstrap interval over the pairs."""

    def rho(idx: Tensor) -> float:
        ra, rb = mean_ranks(a[idx]), mean_ranks(b[idx])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        den = float(ra.norm() * rb.norm())
        return float((ra * rb).sum()) / den if den > 0 else float("nan")

    lo, hi = bootstrap(rho, len(a), n_boot, confidence, seed)
    return spearman(a, b), lo, hi


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
