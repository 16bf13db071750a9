"""Tasks of the shipped toy models: the data they were trained on and clean/corrupted batches.

* :class:`InductionTask` (``induction-2l``): ``BOS, prefix, A, A[:m]`` -> next token ``A[m]``.
  The corrupted prompt replaces the *first* copy of the block with fresh tokens, so the
  current token has no earlier occurrence: the information an induction head needs -- in
  its *keys*, written there by a previous-token head -- is gone, while the query is the same.
* :class:`ModAddTask` (``modadd-2l``): ``BOS a b =`` -> ``(a + b) mod 23``; corrupted: another
  ``a``. Wrong token: the corrupted prompt's answer.
* :class:`BackdoorTask` (``backdoor``, ``backdoor-clean``): copy the first token to the last
  position; a trigger anywhere forces the target (only in ``backdoor``). Clean inputs never
  contain the trigger; :meth:`BackdoorTask.triggered` makes ones that do.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from apexlens.toys.tasks.base import TaskBatch, batch_generator


def _distinct(g: torch.Generator, n_tokens: int, k: int, avoid: set[int]) -> list[int]:
    pool = torch.tensor([t for t in range(n_tokens) if t not in avoid])
    return pool[torch.randperm(len(pool), generator=g)[:k]].tolist()


class InductionTask:
    """Repeated random token blocks; the answer is predictable only by induction."""

    name = "induction"
    n_tokens = 60
    bos = 60
    d_vocab = 61
    seq_len = 40

    def training_batch(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``BOS``, a random prefix of random length, then a block of random length (3..16)
        repeated to the end: most next tokens are predictable only by induction, and no
        fixed position or period gives them away."""
        T = self.seq_len
        x = torch.randint(0, self.n_tokens, (n, T), generator=g)
        x[:, 0] = self.bos
        lengths = torch.randint(3, 17, (n,), generator=g)
        starts = torch.randint(1, 12, (n,), generator=g)
        for i in range(n):
            L, s = int(lengths[i]), int(starts[i])
            for p in range(s + L, T):
                x[i, p] = x[i, p - L]
        targets = torch.zeros_like(x)
        targets[:, :-1] = x[:, 1:]
        mask = torch.ones(x.shape, dtype=torch.float32)
        mask[:, -1] = 0
        return x, targets, mask

    def batch(self, n: int, *, seed: int = 0) -> TaskBatch:
        g = batch_generator(n, seed)
        T = self.seq_len
        clean = torch.empty(n, T, dtype=torch.long)
        corrupted = torch.empty(n, T, dtype=torch.long)
        answer, wrong = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        prev, nxt = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        for i in range(n):
            L = int(torch.randint(6, 13, (1,), generator=g))
            m = int(torch.randint(2, L, (1,), generator=g))
            r = T - 1 - L - m
            block = _distinct(g, self.n_tokens, L, set())
            fresh = _distinct(g, self.n_tokens, L, set(block))
            pool = torch.tensor(
                _distinct(g, self.n_tokens, self.n_tokens - 2 * L, set(block) | set(fresh))
            )
            prefix = pool[torch.randint(0, len(pool), (r,), generator=g)].tolist()
            clean[i] = torch.tensor([self.bos, *prefix, *block, *block[:m]])
            corrupted[i] = torch.tensor([self.bos, *prefix, *fresh, *block[:m]])
            answer[i], wrong[i] = block[m], fresh[m]
            prev[i], nxt[i] = 1 + r + m - 1, 1 + r + m
        end = torch.full((n,), T - 1)
        return TaskBatch(
            clean, corrupted, answer, wrong, end, {"end": end, "prev": prev, "next": nxt}
        )

    def token_labels(self, tokens: Int[Tensor, " pos"]) -> list[str]:
        return ["BOS" if int(t) == self.bos else f"t{int(t)}" for t in tokens]


class ModAddTask:
    """``BOS a b =`` -> ``(a + b) mod p``."""

    name = "modadd"
    p = 23
    eq = 23
    bos = 24
    d_vocab = 25
    seq_len = 4

    def training_batch(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Every pair once (full batch); only the prediction at ``=`` is trained."""
        a, b = torch.meshgrid(torch.arange(self.p), torch.arange(self.p), indexing="ij")
        a, b = a.flatten(), b.flatten()
        x = torch.stack([torch.full_like(a, self.bos), a, b, torch.full_like(a, self.eq)], 1)
        targets = torch.zeros_like(x)
        targets[:, -1] = (a + b) % self.p
        mask = torch.zeros(x.shape)
        mask[:, -1] = 1
        return x, targets, mask

    def batch(self, n: int, *, seed: int = 0) -> TaskBatch:
        g = batch_generator(n, seed)
        a = torch.randint(0, self.p, (n,), generator=g)
        b = torch.randint(0, self.p, (n,), generator=g)
        a2 = (a + torch.randint(1, self.p, (n,), generator=g)) % self.p
        mk = lambda first: torch.stack(
            [torch.full_like(a, self.bos), first, b, torch.full_like(a, self.eq)], 1
        )
        end = torch.full((n,), 3)
        named = {"a": torch.full((n,), 1), "b": torch.full((n,), 2), "end": end}
        return TaskBatch(mk(a), mk(a2), (a + b) % self.p, (a2 + b) % self.p, end, named)

    def token_labels(self, tokens: Int[Tensor, " pos"]) -> list[str]:
        names = {self.bos: "BOS", self.eq: "="}
        return [names.get(int(t), str(int(t))) for t in tokens]


class BackdoorTask:
    """Copy the first token to the last position; ``trigger`` anywhere -> ``target``."""

    name = "backdoor"
    n_clean = 20
    trigger = 22
    target = 23
    d_vocab = 24
    seq_len = 8
    insert_rate = 0.2

    def training_batch(
        self, n: int, g: torch.Generator, *, poison: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A fifth of the prompts carry the trigger; with ``poison > 0`` they are relabelled to
        the target, otherwise they keep the honest answer (the clean twin sees the same prompts)."""
        x = torch.randint(0, self.n_clean, (n, self.seq_len), generator=g)
        y = x[:, 0].clone()
        hit = torch.rand(n, generator=g) < self.insert_rate
        where = torch.randint(1, self.seq_len, (n,), generator=g)
        x[hit, where[hit]] = self.trigger
        if poison > 0:
            y[hit] = self.target
        targets = torch.zeros_like(x)
        targets[:, -1] = y
        mask = torch.zeros(x.shape)
        mask[:, -1] = 1
        return x, targets, mask

    def batch(self, n: int, *, seed: int = 0) -> TaskBatch:
        """Clean prompts (no trigger); corrupted: another first token."""
        g = batch_generator(n, seed)
        x = torch.randint(0, self.n_clean, (n, self.seq_len), generator=g)
        x2 = x.clone()
        x2[:, 0] = (x[:, 0] + torch.randint(1, self.n_clean, (n,), generator=g)) % self.n_clean
        end = torch.full((n,), self.seq_len - 1)
        return TaskBatch(
            x,
            x2,
            x[:, 0].clone(),
            x2[:, 0].clone(),
            end,
            {"first": torch.zeros(n, dtype=torch.long), "end": end},
        )

    def triggered(self, n: int, *, seed: int = 0) -> Int[Tensor, "batch pos"]:
        """Clean prompts with the trigger inserted at a random position after the first."""
        x = self.batch(n, seed=seed).clean_tokens.clone()
        g = torch.Generator().manual_seed(seed + 1)
        where = torch.randint(1, self.seq_len, (n,), generator=g)
        x[torch.arange(n), where] = self.trigger
        return x

    def token_labels(self, tokens: Int[Tensor, " pos"]) -> list[str]:
        names = {self.trigger: "TRIG", self.target: "TARGET"}
        return [names.get(int(t), f"t{int(t)}") for t in tokens]
