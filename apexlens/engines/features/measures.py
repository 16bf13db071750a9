"""The statistics of :func:`apexlens.fv_check` and its calibrated p-value.

Per feature, four measures of how unlike its natural top examples the visualization (FV) is,
each larger = more unusual:

* ``activation`` -- how far the FV's activation lies above the natural maximum, in units of
  the natural spread: ``(fv - natural max) / (natural max - natural median)``;
* ``natural_start`` -- how far above what the visualization's own swap phase reaches when it
  starts from the natural top contexts, same units: an honest maximum does not depend much on
  where the search starts; a slingshot shapes the region the optimiser starts in;
* ``mechanism`` -- the Mahalanobis distance of the FV's attribution *shares* (gradient x
  activation per upstream component, over the sum of their absolute values) from the natural
  top examples' (Ledoit-Wolf covariance), as ``log`` of its ratio to the median of the same
  distance of each natural example from the others (leave-one-out);
* ``representation`` -- the same for the unit-normalised residual stream the feature reads.

**Calibration: a within-model null.** An FV is the argmax over all inputs, not a draw from the
natural examples, so even honest FVs lie beyond every natural example far more often than a
leave-one-out rank would allow. Instead the same statistics are computed for *peer* features
(same kind, same layer, visualized by the same procedure). If the checked feature is not
manipulated, it is exchangeable with its peers, and so is the whole computation below:

1. per measure, each feature's rank p-value among all ``n`` features (itself included):
   ``p_m(j) = #{i : s_m(i) >= s_m(j)} / n``;
2. per feature, the Cauchy combination (Liu & Xie 2020) of its ``p_m``:
   ``t(j) = mean_m tan((1/2 - p_m(j)) pi)``;
3. the checked feature's p-value: ``#{i : t(i) >= t(0)} / n``.

Step 3 is a rank among exchangeable values, so ``P(p <= alpha) <= alpha`` for any ``alpha``
whatever the dependence between the measures; its smallest possible value is ``1 / n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.engines.features.evidence import Evidence

MEASURES = ("activation", "natural_start", "mechanism", "representation")
_EPS = 1e-3


def ledoit_wolf(X: Float[Tensor, "n d"]) -> Float[Tensor, "d d"]:
    """Ledoit-Wolf covariance of the rows of ``X``: the sample covariance shrunk towards
    ``mu I`` by the optimal weight (Ledoit & Wolf 2004)."""
    n, p = X.shape
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    eye = torch.eye(p, dtype=X.dtype)
    mu = float(torch.trace(S)) / p
    d2 = float(((S - mu * eye) ** 2).sum())
    sq = (Xc * Xc).sum(1)
    b2 = float((sq**2 - 2 * ((Xc @ S) * Xc).sum(1)).sum() + n * (S * S).sum()) / n**2
    lam = min(b2, d2) / d2 if d2 > 0 else 1.0
    return (1 - lam) * S + lam * mu * eye + 1e-9 * max(mu, 1e-12) * eye


def mahalanobis(x: Float[Tensor, " d"], R: Float[Tensor, "n d"]) -> float:
    """Distance of ``x`` from the rows of ``R`` under their Ledoit-Wolf covariance."""
    d = x - R.mean(0)
    return math.sqrt(max(float(d @ torch.linalg.solve(ledoit_wolf(R), d)), 0.0))


def leave_one_out(x: Float[Tensor, " d"], R: Float[Tensor, "n d"]) -> tuple[float, Tensor]:
    """``x``'s distance from all rows of ``R``, and each row's from the others."""
    idx = torch.arange(R.shape[0])
    null = torch.tensor([mahalanobis(R[i], R[idx != i]) for i in idx.tolist()], dtype=R.dtype)
    return mahalanobis(x, R), null


def _shares(x: Tensor) -> Tensor:
    return x / x.abs().sum(-1, keepdim=True).clamp_min(1e-30)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _log_ratio(s: float, null: Tensor) -> float:
    return math.log((s + _EPS) / (float(null.median()) + _EPS))


def statistics(ev: Evidence) -> dict[str, float]:
    """The four measures of one feature (module docstring), plus the leave-one-out distances
    behind the last two (``mechanism_distance``, ``mechanism_null_median``, ...)."""
    spread = max(ev.natural_max - ev.natural_median, 1e-12)
    out = {
        "activation": (ev.fv_activation - ev.natural_max) / spread,
        "natural_start": (ev.fv_activation - ev.start_activation) / spread,
    }
    for name, x, X in (
        ("mechanism", _shares(ev.fv_attribution), _shares(ev.natural_attribution)),
        ("representation", _unit(ev.fv_resid), _unit(ev.natural_resid)),
    ):
        s, null = leave_one_out(x.double(), X.double())
        out[name] = _log_ratio(s, null)
        out[f"{name}_distance"] = s
        out[f"{name}_null_median"] = float(null.median())
    return out


def rank_p(scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Each value's rank p-value among all: ``#{i : s_i >= s_j} / n`` (larger = unusual)."""
    return (scores[None, :] >= scores[:, None]).double().mean(1)


def cauchy(p: Float[Tensor, "n m"]) -> Float[Tensor, " n"]:
    """The Cauchy combination statistic of each row's p-values (larger = more unusual)."""
    return torch.tan((0.5 - p.clamp(1e-15, 1 - 1e-15)) * math.pi).mean(-1)


def cauchy_p(t: float) -> float:
    """The p-value the Cauchy combination ``t`` stands for (exact for independent p-values,
    asymptotically valid under dependence); shown for reference, not used to decide."""
    return min(1.0, max(0.0, 0.5 - math.atan(t) / math.pi))


def peer_test(
    stats: Float[Tensor, "n measure"], measures: Sequence[int] | None = None
) -> tuple[Float[Tensor, " measure"], float, Float[Tensor, "n measure"]]:
    """The within-model test of row 0 against the other rows (module docstring): per-measure
    rank p-values of row 0, its combined p-value, and every row's per-measure p-values.
    ``measures``: the columns that enter the combination (default: all)."""
    p = torch.stack([rank_p(stats[:, m]) for m in range(stats.shape[1])], 1)
    use = list(range(stats.shape[1])) if measures is None else list(measures)
    t = cauchy(p[:, use])
    return p[0], float((t >= t[0]).double().mean()), p
