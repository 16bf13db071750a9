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

:func:`optimise` can visualize *peer* features in the same batch (``peers``): each feature gets
its own block of ``restarts`` rows, started from the same seeded draw it would get alone, and
every row reads its own feature, so each block is the visualization that feature gets on its
own (restarts, rows and features never interact: Adam is elementwise, the losses add up, and
a restart whose best swap does not improve keeps its input). This is how
:func:`apexlens.fv_check` builds its within-model null at the cost of one batched run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.engines.features.run import read_rows
from apexlens.errors import ApexlensError
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
    """A plan on a model: full token sequences from the free ids, soft inputs, exact values.

    ``features``: the plan's feature and any peers, one block of ``restarts`` rows each
    (:attr:`owner` says which feature a row reads)."""

    def __init__(
        self, bk: Backend, plan: Plan, peers: tuple[Feature, ...] = (), per: int | None = None
    ) -> None:
        self.bk, self.plan, self.model = bk, plan, bk.model
        self.features = (plan.feature, *peers)
        self.owner = torch.arange(len(self.features)).repeat_interleave(per or plan.restarts)
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

    def value(
        self, free: Int[Tensor, "r free"], probs: Tensor, owner: Int[Tensor, " r"]
    ) -> Float[Tensor, " r"]:
        """Each row's feature (``owner``) at the read position under the soft input
        ``probs`` (differentiable)."""
        return read_rows(
            self.model, self.features, owner, self.tokens(free), self.plan.read,
            soft=self.soft(probs), embed_matrix=self.soft_E,
        ).values

    def exact(self, free: Int[Tensor, "r free"], owner: Int[Tensor, " r"]) -> Float[Tensor, " r"]:
        """Each row's feature of real token sequences, by a plain forward pass."""
        with torch.no_grad():
            vals = read_rows(
                self.model, self.features, owner, self.tokens(free), self.plan.read
            ).values
        return vals.detach().float().cpu()


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
        act = pb.value(ids, probs, pb.owner)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(-1)
        loss = -(act - plan.entropy * frac * ent).sum()
        opt.zero_grad()
        (grad,) = torch.autograd.grad(loss, [theta])
        theta.grad = grad
        opt.step()
        soft_traj.append(act.detach().float().cpu())
        trajectory.append(pb.exact(ids.detach(), pb.owner))
        bar.update(1)
    return theta.detach()


def swap_round(
    pb: Problem, ids: Int[Tensor, "r free"], current: Float[Tensor, " r"], active: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One GCG round (module docstring, phase 2) for the ``active`` restarts: the one-hot
    gradient proposes ``top_k`` tokens per free position; every single swap is evaluated
    exactly; each restart keeps its best swap if it improves. Returns the inputs, their
    values and which restarts improved: only those can improve next round (a restart that
    did not keeps its input, so it would get the same proposals and the same scores)."""
    rows = active.nonzero().flatten()
    sub, owner = ids[rows], pb.owner[rows.cpu()]
    r, n_free = sub.shape
    n_allowed = pb.allowed.numel()
    k = min(pb.plan.top_k, n_allowed)
    onehot = torch.zeros(r, n_free, n_allowed, dtype=pb.soft_E.dtype, device=ids.device)
    onehot.scatter_(2, sub[..., None], 1.0)
    onehot.requires_grad_(True)
    (grad,) = torch.autograd.grad(pb.value(sub, onehot, owner).sum(), [onehot])
    grad = grad.masked_fill(onehot.detach() > 0, -math.inf)  # a swap changes the token
    cand = grad.topk(k, -1).indices  # [r, free, k]
    # every single swap: [r, free * k] candidate sequences
    cands = sub[:, None, :].repeat(1, n_free * k, 1)
    pos = torch.arange(n_free, device=ids.device).repeat_interleave(k)
    cands[:, torch.arange(n_free * k), pos] = cand.reshape(r, n_free * k)
    flat = cands.reshape(-1, n_free)
    who = owner.repeat_interleave(n_free * k)
    scores = torch.cat(
        [pb.exact(flat[i : i + 512], who[i : i + 512]) for i in range(0, flat.shape[0], 512)]
    )
    best, where = scores.reshape(r, n_free * k).max(1)
    better = best > current[rows.cpu()]
    new_ids, new_current = ids.clone(), current.clone()
    up = rows[better.to(rows.device)]
    new_ids[up] = cands[better.to(cands.device), where[better].to(cands.device)]
    new_current[up.cpu()] = best[better]
    improved = torch.zeros_like(active)
    improved[up] = True
    return new_ids, new_current, improved


def swap_phase(
    pb: Problem, ids: Int[Tensor, "r free"], current: Float[Tensor, " r"],
    trajectory: list[Tensor], bar: Any,
) -> tuple[Tensor, Tensor]:
    """Rounds of :func:`swap_round` until no restart improves (``refine_steps`` at most)."""
    active = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(pb.plan.refine_steps):
        ids, current, active = swap_round(pb, ids, current, active)
        trajectory.append(current.clone())
        bar.update(1)
        if not bool(active.any()):
            break
    return ids, current


@dataclass
class Found:
    """What the two phases found, restarts in their original order."""

    tokens: Int[Tensor, "restarts pos"]
    activation: Float[Tensor, " restarts"]
    trajectory: Float[Tensor, "steps restarts"]
    soft_trajectory: Float[Tensor, "soft_steps restarts"]


def optimise(bk: Backend, plan: Plan, bar: Any, peers: tuple[Feature, ...] = ()) -> Found:
    """Run both phases (call it with gradients enabled, the model in eval mode).

    ``peers``: features visualized in the same batch (module docstring); the rows of
    :class:`Found` are then ``restarts`` per feature, the plan's feature first, every one
    optimised in this process. Without peers, every restart's starting point is drawn from
    the one generator, so under a shard each rank draws all of them and optimises its
    contiguous block of restarts; a restart's optimisation never depends on the others'."""
    g = torch.Generator().manual_seed(plan.seed)
    n_allowed, n_free = plan.allowed.numel(), plan.n_pos - plan.prefix.numel()
    theta0 = plan.init_scale * torch.randn(plan.restarts, n_free, n_allowed, generator=g)
    ids0 = None
    if not plan.steps:
        ids0 = torch.randint(0, n_allowed, (plan.restarts, n_free), generator=g)
    if peers:
        n = 1 + len(peers)
        return _optimise_rows(
            bk, plan, peers, theta0.repeat(n, 1, 1), None if ids0 is None else ids0.repeat(n, 1),
            bar,
        )
    with Share("visualize", plan.restarts) as share:
        mine = share.block(plan.restarts)
        if len(mine):
            sl = slice(mine.start, mine.stop)
            found = _optimise_rows(bk, plan, (), theta0[sl], None if ids0 is None else ids0[sl],
                                   bar)
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


def _optimise_rows(
    bk: Backend, plan: Plan, peers: tuple[Feature, ...], theta0: Tensor, ids0: Tensor | None,
    bar: Any,
) -> Found:
    """Both phases for the rows starting at ``theta0`` (or, without a soft phase, at
    ``ids0``): the same number of rows per feature, the plan's feature first."""
    pb = Problem(bk, plan, peers, per=theta0.shape[0] // (1 + len(peers)))
    trajectory: list[Tensor] = []
    soft_traj: list[Tensor] = []
    if plan.steps:
        ids = soft_phase(pb, theta0, trajectory, soft_traj, bar).argmax(-1)
    else:
        assert ids0 is not None
        ids = ids0.to(bk.device)
    current = pb.exact(ids, pb.owner)
    if not plan.steps:
        trajectory.append(current)
    ids, current = swap_phase(pb, ids, current, trajectory, bar)
    soft = torch.stack(soft_traj) if soft_traj else torch.empty(0, ids.shape[0])
    return Found(pb.tokens(ids).cpu(), current, torch.stack(trajectory), soft)


def climb(
    bk: Backend,
    plan: Plan,
    starts: Int[Tensor, "n pos"],
    bar: Any,
    peers: tuple[Feature, ...] = (),
) -> Found:
    """The swap phase alone, started from given inputs (``starts``: the same number of rows
    per feature, the plan's feature first, then each peer's): how high the optimiser climbs
    from there (no soft phase; ``plan.refine_steps`` rounds at most). Start tokens outside
    the allowed vocabulary become the first allowed token; the prefix is the plan's."""
    n_feat = 1 + len(peers)
    if starts.shape[0] % n_feat:
        raise ApexlensError("climb: starts must hold the same number of rows per feature")
    pb = Problem(bk, plan, peers, per=starts.shape[0] // n_feat)
    lookup = torch.zeros(int(max(int(starts.max()), int(plan.allowed.max()))) + 1, dtype=torch.long)
    lookup[plan.allowed] = torch.arange(plan.allowed.numel())
    ids = lookup[starts[:, plan.prefix.numel() :].cpu()].to(bk.device)
    current = pb.exact(ids, pb.owner)
    trajectory = [current]
    ids, current = swap_phase(pb, ids, current, trajectory, bar)
    empty = torch.empty(0, ids.shape[0])
    return Found(pb.tokens(ids).cpu(), current, torch.stack(trajectory), empty)
