"""What a task is: a way to make clean/corrupted batches with answer and wrong tokens.

A *task* knows a behaviour of a model and how to break it. ``task.batch(n, seed=...)``
returns a :class:`TaskBatch`: clean prompts that show the behaviour, corrupted prompts of
the same shape that do not, the token the model should predict (``answer_tokens``), the
token it would predict on the corrupted prompt or another plausible wrong one
(``wrong_tokens``), and the position whose next-token prediction is scored. Named
positions (e.g. ``"S1"``, ``"IO"``, ``"end"`` for IOI) go in ``named_positions`` so path
patching can restrict senders or receivers to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Int
from torch import Tensor

from apexlens.errors import ApexlensError


@dataclass
class TaskBatch:
    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, " batch"]
    wrong_tokens: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"]
    """Where the answer is predicted: the metric reads the logits at these positions."""
    named_positions: dict[str, Int[Tensor, " batch"]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise ApexlensError(
                f"clean tokens {tuple(self.clean_tokens.shape)} and corrupted tokens "
                f"{tuple(self.corrupted_tokens.shape)} must have the same shape"
            )
        n = self.clean_tokens.shape[0]
        for name in ("answer_tokens", "wrong_tokens", "positions"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ApexlensError(f"{name} must have shape ({n},), got {tuple(t.shape)}")

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])

    def logit_diff(self):  # -> apexlens.scoring.LogitDiff
        """The task's logit-difference metric: answer minus wrong logit at ``positions``."""
        from apexlens.scoring import LogitDiff

        return LogitDiff(self.answer_tokens, self.wrong_tokens, positions=self.positions)

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(
            self.clean_tokens.to(device),
            self.corrupted_tokens.to(device),
            self.answer_tokens.to(device),
            self.wrong_tokens.to(device),
            self.positions.to(device),
            {k: v.to(device) for k, v in self.named_positions.items()},
        )


def batch_generator(n: object, seed: object) -> torch.Generator:
    """The seeded generator of a task's ``batch(n, seed=...)``, after checking both."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ApexlensError(f"n (the number of prompts) must be an int >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ApexlensError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


@runtime_checkable
class Task(Protocol):
    name: str

    def batch(self, n: int, *, seed: int = 0) -> TaskBatch: ...

    def token_labels(self, tokens: Int[Tensor, " pos"]) -> list[str]: ...
