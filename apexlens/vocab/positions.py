"""Positions: where a node acts (``"9.9.q@-1"``, ``"0.1@3,4"``, ``"@end"``) and where an edge does.

A node restricted to positions acts only there; a name (``"end"``) is looked up in the
``positions`` mapping handed to a question (a task batch's ``named_positions``). Negative
positions count from the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.vocab.nodes import Node


def position_mask(
    node: Node,
    batch: int,
    n_pos: int,
    named: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Bool[Tensor, "batch pos"] | None:
    """The ``[batch, pos]`` mask of the positions ``node`` is restricted to (None: all)."""
    p = node.positions
    if p is None:
        return None
    if isinstance(p, str):
        if named is None or p not in named:
            known = ", ".join(sorted(named)) if named else "none were given"
            raise ApexlensError(f"node {node} names positions {p!r}, which are unknown ({known})")
        p = named[p]
    idx = position_index(p, batch, n_pos, f"node {node}", device)
    mask = torch.zeros(batch, n_pos, dtype=torch.bool, device=device)
    mask.scatter_(1, idx, True)
    return mask


def position_index(
    positions: Any, batch: int, n_pos: int, what: str, device: torch.device | str = "cpu"
) -> Int[Tensor, "batch k"]:
    """Absolute positions ``[batch, k]`` from ``None`` (all), an int, a list/tuple (the same
    for every example), a ``[batch]`` tensor (one per example) or a ``[batch, k]`` tensor.
    Negative positions count from the end. ``what`` names the caller in error messages."""
    if positions is None:
        return torch.arange(n_pos, device=device).expand(batch, n_pos)
    idx = torch.as_tensor(positions, device=device).long()
    if idx.ndim == 0:
        idx = idx.expand(batch)[:, None]
    elif idx.ndim == 1 and not isinstance(positions, Tensor):
        idx = idx[None, :].expand(batch, -1)
    elif idx.ndim == 1:
        if idx.shape[0] != batch:
            raise ApexlensError(
                f"{what}: a 1-D position tensor needs one position per example (a batch of "
                f"{batch}), got {idx.shape[0]}"
            )
        idx = idx[:, None]
    elif idx.ndim != 2 or idx.shape[0] != batch:
        raise ApexlensError(
            f"{what}: positions must be an int, a list, [batch] or [batch, k]; got shape "
            f"{tuple(idx.shape)}"
        )
    if ((idx < -n_pos) | (idx >= n_pos)).any():
        raise ApexlensError(f"{what}: positions out of range for sequences of length {n_pos}")
    return idx % n_pos



def shared_positions(positions: Any, n_pos: int, what: str) -> Int[Tensor, " k"]:
    """Sorted, de-duplicated absolute positions that are the same for every example (ints,
    negative from the end), via :func:`position_index`."""
    raw = [positions] if isinstance(positions, int) else positions
    if isinstance(raw, Tensor):
        raw = raw.tolist() if raw.ndim <= 1 and not raw.is_floating_point() else raw
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ApexlensError(f"{what} must be an int or a non-empty list of ints, got {positions!r}")
    for p in raw:
        if isinstance(p, bool) or not isinstance(p, int):
            raise ApexlensError(f"{what} must be integers, got {p!r}")
    idx = position_index(list(raw), 1, n_pos, what)[0]
    return torch.unique(idx)


def edge_positions(
    s: Node, r: Node, n_pos: int | None, named: Mapping[str, Any] | None = None
) -> tuple[int, ...] | None:
    """The positions a (possibly position-aware) edge ``s -> r`` acts at; ``None``: all.

    **Semantics.** A sender writes its output at position ``p`` into the residual stream at
    ``p``; a receiver (a head's q/k/v input, an MLP, the logits) reads the residual stream at
    its own position ``q``. So a direct edge connects ``s@p`` to ``r@q`` only when ``p == q``:
    the edge ``"0.1@3" -> "1.3.k@3"`` carries what head 0.1 wrote at position 3 into the key
    of head 1.3 at position 3. Moving information between positions is what attention does
    *inside* a head (its k/v at ``p`` -> its output at ``q >= p``), which is not an edge.
    Positions given on one side apply to both; given on both sides they must be the same
    set. Negative positions count from the end; a name must resolve to the same positions
    for every example.
    """
    ps, pr = s.positions, r.positions
    if ps is None and pr is None:
        return None
    if n_pos is None:
        raise ApexlensError(
            f"edge {s} -> {r} names positions; evaluate it on tokens (evaluate_circuit / an "
            "Experiment), where the sequence length is known"
        )
    sides = [_abs_positions(p, n_pos, named, f"edge {s} -> {r}") for p in (ps, pr) if p is not None]
    if len(sides) == 2 and sides[0] != sides[1]:
        raise ApexlensError(
            f"edge {s} -> {r} joins different positions: a sender's output at position p reaches a "
            "receiver's input only at the same position p (the residual stream is per position; "
            "moving between positions happens inside an attention head, not along an edge). "
            f"Write the edge at one position, e.g. {s.name}@{sides[1][0]} -> {r.name}@{sides[1][0]}"
        )
    return sides[0]


def _abs_positions(
    p: Any, n_pos: int, named: Mapping[str, Any] | None, what: str
) -> tuple[int, ...]:
    if isinstance(p, str):
        if named is None or p not in named:
            known = ", ".join(sorted(named)) if named else "none were given"
            raise ApexlensError(f"{what}: unknown position name {p!r} ({known})")
        p = named[p]
    per_example = isinstance(p, Tensor) and p.ndim >= 1
    t = torch.as_tensor(p).long().cpu()
    if per_example:  # [batch] or [batch, k]: one row per example, all rows the same
        rows = t.reshape(t.shape[0], -1)
        if not bool((rows == rows[:1]).all()):
            raise ApexlensError(
                f"{what}: position-aware edges need the same positions for every example; "
                "the named positions differ between examples"
            )
        t = rows[0]
    vals = t.flatten().tolist()
    if any(not -n_pos <= x < n_pos for x in vals):
        raise ApexlensError(
            f"{what}: positions {vals} out of range for sequences of length {n_pos}"
        )
    return tuple(sorted({x % n_pos for x in vals}))
