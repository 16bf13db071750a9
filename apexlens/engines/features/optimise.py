"""Feature visualization: the input that excites a feature most, in two named phases.

1. **Soft phase** (:func:`soft_phase`): per free position a distribution over the allowed
   tokens, ``softmax(theta / T)``, whose embedding ``probs @ E`` replaces the token
   embedding; Adam on ``theta`` with the temperature ``T`` annealed geometrically and an
   entropy penalty growing linearly, so the distributions harden towards tokens.
2. **Swap phase** (:func:`swap_round`, GCG-style, Zou et al. 2023): the gradient with respect
   to the one-hot input proposes ``top_k`` tokens per position; every proposed single swap
   is evaluated *exactly*; each restart keeps its best swap while it raises the activation.

Every activation reported is that of a discrete input, measured by a plain forward pass
(:meth:`Problem.exact`). The plan is checked at the boundary
(:func:`apexlens.api.features.visualize`); this module only runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.features.run import run_feature
from apexlens.model import Backend
from apexlens.runs.shard import Share
from apexlens.vocab.features import Feature


@dataclass(frozen=True)
class Plan:
    """A checked visualization problem: what to maximise and how."""

    feature: Feature
    n_pos: int
    read: int
    """The read position, as an index."""
    prefix: Int[Tensor, " k"]
    allowed: Int[Tensor, " allowed"]
    steps: int
    restarts: int
    seed: int
    lr: float
    init_scale: float
    temperature: tuple[float, float]
    entropy: float
    refine_steps: int
    top_k: int


class Problem:
    """A plan on a model: full token sequences from the free ids, soft inputs, exact values."""

    def __init__(self, bk: Backend, plan: Plan) -> None:
        self.bk, self.plan, self.model = bk, plan, bk.model
        device = bk.device
        self.E = bk.embedding_matrix()
        self.allowed = plan.allowed.to(device)
        self.fixed = plan.prefix.to(device)
        self.n_free = plan.n_pos - plan.prefix.numel()
        self.soft_E = self.E if plan.prefix.numel() else self.E[self.allowed]

    def tokens(self, free: Int[Tensor, "r free"]) -> Int[Tensor, "r pos"]:
        """Full sequences from indices into the allowed tokens."""
        return torch.cat([self.fixed.expand(free.shape[0], -1), self.allowed[free]], 1)

    def soft(self, probs: Float[Tensor, "r free allowed"]) -> Tensor:
        """``[r, n_pos, allowed]`` distributions, the prefix as one-hot rows."""
        k = self.plan.prefix.numel()
        if not k:
            return probs
        r, V = probs.shape[0], self.E.shape[0]
        onehot = torch.zeros(r, k, V, dtype=probs.dtype, device=probs.device)
        onehot[:, torch.arange(k), self.fixed] = 1
        rest = torch.zeros(r, self.n_free, V, dtype=probs.dtype, device=probs.device)
        rest[..., self.allowed] = probs
        return torch.cat([onehot, rest], 1)

    def value(self, free: Int[Tensor, "r free"], probs: Tensor) -> Float[Tensor, " r"]:
        """The feature at the read position under the soft input ``probs`` (differentiable)."""
        vals, _ = run_feature(
            self.model,
            self.plan.feature,
            self.tokens(free),
            soft=self.soft(probs),
            embed_matrix=self.soft_E,
        )
        return vals[:, self.plan.read]

    def exact(self, free: Int[Tensor, "r free"]) -> Float[Tensor, " r"]:
        """The feature of real token sequences, by a plain forward pass."""
        with torch.no_grad():
            vals = run_feature(self.model, self.plan.feature, self.tokens(free))[0]
        return vals[:, self.plan.read].detach().float().cpu()


def soft_phase(
    pb: Problem, theta0: Tensor, trajectory: list[Tensor], soft_traj: list[Tensor], bar: Any
) -> Tensor:
    """Adam on the soft input (module docstring, phase 1); returns the final ``theta``."""
    plan = pb.plan
    theta = theta0.to(device=pb.bk.device, dtype=pb.E.dtype).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=plan.lr)
    t0, t1 = plan.temperature
    for i in range(plan.steps):
        frac = i / max(plan.steps - 1, 1)
        temp = t0 * (t1 / t0) ** frac
        probs = torch.softmax(theta / temp, -1)
        ids = probs.argmax(-1)
        act = pb.value(ids, probs)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(-1)
        loss = -(act - plan.entropy * frac * ent).sum()
        opt.zero_grad()
        (grad,) = torch.autograd.grad(loss, [theta])
        theta.grad = grad
        opt.step()
        soft_traj.append(act.detach().float().cpu())
        trajectory.append(pb.exact(ids.detach()))
        bar.update(1)
    return theta.detach()


def swap_round(
    pb: Problem, ids: Int[Tensor, "r free"], current: Float[Tensor, " r"]
) -> tuple[Tensor, Tensor, bool]:
    """One GCG round (module docstring, phase 2): the one-hot gradient proposes ``top_k``
    tokens per free position; every single swap is evaluated exactly; each restart keeps its
    best swap if it improves."""
    r, n_free = ids.shape
    n_allowed = pb.allowed.numel()
    k = min(pb.plan.top_k, n_allowed)
    onehot = torch.zeros(r, n_free, n_allowed, dtype=pb.soft_E.dtype, device=ids.device)
    onehot.scatter_(2, ids[..., None], 1.0)
    onehot.requires_grad_(True)
    (grad,) = torch.autograd.grad(pb.value(ids, onehot).sum(), [onehot])
    grad = grad.masked_fill(onehot.detach() > 0, -math.inf)  # a swap changes the token
    cand = grad.topk(k, -1).indices  # [r, free, k]
    # every single swap: [r, free * k] candidate sequences
    cands = ids[:, None, :].repeat(1, n_free * k, 1)
    pos = torch.arange(n_free, device=ids.device).repeat_interleave(k)
    cands[:, torch.arange(n_free * k), pos] = cand.reshape(r, n_free * k)
    flat = cands.reshape(-1, n_free)
    scores = torch.cat([pb.exact(flat[i : i + 512]) for i in range(0, flat.shape[0], 512)])
    scores = scores.reshape(r, n_free * k)
    best, where = scores.max(1)
    better = best > current
    new_ids = ids.clone()
    new_ids[better] = cands[better, where[better]]
    new_current = torch.where(better, best, current)
    return new_ids, new_current, bool(better.any())


@dataclass
class Found:
    """What the two phases found, restarts in their original order."""

    tokens: Int[Tensor, "restarts pos"]
    activation: Float[Tensor, " restarts"]
    trajectory: Float[Tensor, "steps restarts"]
    soft_trajectory: Float[Tensor, "soft_steps restarts"]


def optimise(bk: Backend, plan: Plan, bar: Any) -> Found:
    """Run both phases (call it with gradients enabled, the model in eval mode).

    Every restart's starting point is drawn from the one generator, so under a shard each
    rank draws all of them and optimises its contiguous block of restarts; a restart's
    optimisation never depends on the others'."""
    pb = Problem(bk, plan)
    g = torch.Generator().manual_seed(plan.seed)
    n_allowed = plan.allowed.numel()
    theta0 = plan.init_scale * torch.randn(plan.restarts, pb.n_free, n_allowed, generator=g)
    ids0 = None
    if not plan.steps:
        ids0 = torch.randint(0, n_allowed, (plan.restarts, pb.n_free), generator=g)
    with Share("visualize", plan.restarts) as share:
        mine = share.block(plan.restarts)
        if len(mine):
            sl = slice(mine.start, mine.stop)
            found = _optimise_rows(pb, theta0[sl], None if ids0 is None else ids0[sl], bar)
            share.put(mine, found.tokens, "tokens")
            share.put(mine, found.activation, "activation")
            share.put(mine, found.trajectory.T, "trajectory")
            share.put(mine, found.soft_trajectory.T, "soft")
    tokens = share.fill(torch.empty(plan.restarts, plan.n_pos, dtype=torch.long), "tokens")
    activation = share.fill(torch.empty(plan.restarts), "activation")
    soft = share.fill(torch.empty(plan.restarts, plan.steps), "soft").T
    return Found(tokens, activation, _trajectories(share.parts("trajectory"), plan.restarts), soft)


def _trajectories(parts: list[tuple[Tensor, Tensor]], restarts: int) -> Tensor:
    """``[steps, restarts]`` from every rank's ``[its restarts, its steps]``: a rank whose
    restarts all stopped improving stopped early, and one process would have recorded their
    final values for the remaining rounds."""
    steps = max(v.shape[1] for _, v in parts)
    out = torch.empty(restarts, steps)
    for index, v in parts:
        out[index] = torch.cat([v, v[:, -1:].expand(-1, steps - v.shape[1])], 1)
    return out.T


def _optimise_rows(pb: Problem, theta0: Tensor, ids0: Tensor | None, bar: Any) -> Found:
    """Both phases for the restarts starting at ``theta0`` (or, without a soft phase, at
    ``ids0``)."""
    plan = pb.plan
    trajectory: list[Tensor] = []
    soft_traj: list[Tensor] = []
    if plan.steps:
        ids = soft_phase(pb, theta0, trajectory, soft_traj, bar).argmax(-1)
    else:
        assert ids0 is not None
        ids = ids0.to(pb.bk.device)
    current = pb.exact(ids)
    if not plan.steps:
        trajectory.append(current)
    for _ in range(plan.refine_steps):
        ids, current, improved = swap_round(pb, ids, current)
        trajectory.append(current.clone())
        bar.update(1)
        if not improved:
            break
    r = theta0.shape[0]
    soft = torch.stack(soft_traj) if soft_traj else torch.empty(0, r)
    return Found(pb.tokens(ids).cpu(), current, torch.stack(trajectory), soft)
