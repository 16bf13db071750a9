"""Integer indices for device tensors, made once.

Indexing a GPU tensor with a Python list builds the index on the CPU and copies it over on
every call, and each such copy waits for the GPU's queue to drain: a forward pass with a few
hundred of them spends more time waiting than computing. :func:`index_on` gives a slice for a
contiguous run of integers (no index tensor at all) and otherwise one tensor per (integers,
device), cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from jaxtyping import Int
from torch import Tensor


def index_on(
    ints: Sequence[int] | Tensor, device: torch.device
) -> slice | Int[Tensor, " k"]:
    """``ints`` as an index on ``device``: a slice when they are a contiguous increasing run,
    else a cached ``long`` tensor (an index that already is a tensor is used as it is)."""
    if isinstance(ints, Tensor):
        return ints
    t = tuple(int(i) for i in ints)
    if t and t == tuple(range(t[0], t[0] + len(t))):
        return slice(t[0], t[0] + len(t))
    return _tensor(t, torch.device(device))


@lru_cache(maxsize=4096)
def _tensor(ints: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(ints, dtype=torch.long, device=device)
