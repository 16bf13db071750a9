"""Where each noise direction first moves a prediction: an adaptive search along rays.

Draw ``d`` of example ``i`` is the ray ``sigma -> sigma * xi[i, d]`` (common random numbers:
the same ``xi`` at every sigma). Its *first escape* is
``e[i, d] = inf { sigma : argmax of the noisy logits != the clean prediction }``.

Search, per ray:

1. a geometric scan ``sigma_lo * ratio**j`` up to the first point ``>= sigma_hi``; only rays
   that have not escaped yet are run at the next point;
2. bisection in ``log sigma`` inside the first escaped bracket ``(lo, hi]`` until
   ``hi <= lo * (1 + rtol)``.

A ray escaped already at ``sigma_lo`` has the bracket ``(0, sigma_lo]``; one that never
escapes has ``(last scan point, inf)``. A degenerate pass (:mod:`degenerate`) is not a
prediction: it counts as "not escaped" and is counted. Within one scan bracket the bisection
finds *a* crossing: an escape that returns to the clean token before the next scan point
can be missed (rare at ``ratio = 2``; the tests measure it against a fine grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.noise.sweep import CleanPass, NoisePlan, noisy_logits, rows_per_pass
from apexlens.model import Backend
from apexlens.runs.rows import progress_bar, row_chunks
from apexlens.runs.shard import Share


@dataclass(frozen=True, kw_only=True)
class EscapePlan(NoisePlan):
    """A resolved escape-noise search (module docstring)."""

    sigma_lo: float
    sigma_hi: float
    ratio: float = 2.0
    rtol: float = 0.02

    @property
    def scan(self) -> list[float]:
        """The scan points: ``sigma_lo * ratio**j`` up to the first one ``>= sigma_hi``."""
        steps = math.ceil(math.log(self.sigma_hi / self.sigma_lo) / math.log(self.ratio) - 1e-9)
        return [self.sigma_lo * self.ratio**j for j in range(max(steps, 0) + 1)]

    @property
    def halvings(self) -> int:
        """Bisection steps that narrow a scan bracket to ``1 + rtol``."""
        return max(0, math.ceil(math.log2(math.log(self.ratio) / math.log1p(self.rtol))))


@dataclass
class Rays:
    """Every ray's first-escape bracket ``lo < e <= hi``, ``[n_draws, batch]``."""

    lo: Float[Tensor, "n_draws batch"]
    hi: Float[Tensor, "n_draws batch"]
    """``inf``: never escaped up to the last scan point."""
    token: Int[Tensor, "n_draws batch"]
    """The prediction at ``hi`` (where the ray has escaped to); ``-1`` if none."""
    n_forwards: int
    n_degenerate: int


def first_escapes(
    bk: Backend,
    tokens: Int[Tensor, "batch pos"],
    plan: EscapePlan,
    clean: CleanPass,
    progress: bool = False,
) -> Rays:
    """The search of the module docstring for every (draw, example) ray of ``plan`` (one
    scored position per example). Under a shard, each rank searches a contiguous block of
    the rays (a ray's search depends on its own passes alone) and the brackets are gathered."""
    n = tokens.shape[0]
    clean_pred = clean.logits_at[:, 0].argmax(dim=-1).cpu()
    ray_ex = torch.arange(n).repeat(plan.n_draws)
    ray_draw = torch.arange(plan.n_draws).repeat_interleave(n)
    n_rays = len(ray_ex)
    lo = torch.zeros(n_rays, dtype=torch.float64)
    hi = torch.full((n_rays,), math.inf, dtype=torch.float64)
    token = torch.full((n_rays,), -1, dtype=torch.long)
    per_pass = rows_per_pass(bk, plan, clean, tokens.shape[1], n_rays)
    count = {"forwards": 0, "degenerate": 0}
    with Share("escape noise", n_rays) as share:
        mine = share.block(n_rays)
        bound = len(mine) * (len(plan.scan) + plan.halvings)
        with progress_bar(bound, "escape noise", progress, unit="forward") as bar:

            def escaped(idx: Tensor, sigma: Tensor) -> Tensor:
                """Run rays ``idx`` at ``sigma``; record escapes; whether each escaped."""
                out = torch.empty(len(idx), dtype=torch.bool)
                for chunk in row_chunks(range(len(idx)), per_pass, desc="", progress=False):
                    j = torch.arange(chunk[0], chunk[-1] + 1)
                    rays = idx[j]
                    logits, code = noisy_logits(
                        bk, tokens, plan, clean, ray_ex[rays], ray_draw[rays], sigma[j]
                    )
                    pred = logits[:, 0].argmax(dim=-1).cpu()
                    ok = code[:, 0].cpu() == 0
                    hit = ok & (pred != clean_pred[ray_ex[rays]])
                    out[j] = hit
                    hi[rays[hit]], token[rays[hit]] = sigma[j][hit], pred[hit]
                    lo[rays[~hit]] = sigma[j][~hit]
                    count["forwards"] += len(j)
                    count["degenerate"] += int((~ok).sum())
                    bar.update(len(j))
                return out

            active = torch.zeros(n_rays, dtype=torch.bool)
            active[mine.start : mine.stop] = True  # this rank's rays
            for s in plan.scan:
                idx = torch.nonzero(active).flatten()
                if not len(idx):
                    break
                active[idx[escaped(idx, torch.full((len(idx),), s, dtype=torch.float64))]] = False
            first = torch.isfinite(hi) & (hi <= plan.scan[0])
            lo[first] = 0.0  # escaped at the first scan point: (0, sigma_lo]
            while True:
                idx = torch.nonzero(torch.isfinite(hi) & (lo > 0) & (hi > lo * (1 + plan.rtol)))
                idx = idx.flatten()
                if not len(idx):
                    break
                escaped(idx, torch.sqrt(lo[idx] * hi[idx]))
        share.put(mine, torch.stack([lo[mine.start : mine.stop], hi[mine.start : mine.stop]], 1), "bracket")
        share.put(mine, token[mine.start : mine.stop].clone(), "token")
        share.add(torch.tensor([count["forwards"], count["degenerate"]]), "count")
    bracket = share.fill(torch.stack([lo, hi], 1), "bracket")
    lo, hi, token = bracket[:, 0].contiguous(), bracket[:, 1].contiguous(), share.fill(token, "token")
    forwards, degenerate = (int(c) for c in share.sum("count"))
    shape = (plan.n_draws, n)
    return Rays(lo.view(shape), hi.view(shape), token.view(shape), forwards, degenerate)
