"""Token input, checked once: one wording for every entry point."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import Backend


def describe(t: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def check_tokens(bk: Backend, tokens: Any, name: str = "tokens") -> Int[Tensor, "batch pos"]:
    """Token ids ``[batch, pos]`` checked against the model, as ``long`` on its device.

    Raises one :class:`ApexlensError` naming the problem: not an integer tensor (floats,
    bools, uint8 are refused: a bool or byte tensor is almost always a mask), not 2-D, no
    rows, no positions, ids outside the vocabulary, or more positions than the context.
    """
    ok_dtypes = (torch.int64, torch.int32, torch.int16)
    if not isinstance(tokens, Tensor) or tokens.dtype not in ok_dtypes or tokens.ndim != 2:
        raise ApexlensError(
            f"{name} must be an integer tensor [batch, pos] of token ids (int64/int32), got "
            f"{describe(tokens)}"
        )
    if tokens.device.type == "meta":
        raise ApexlensError(
            f"{name} are on the meta device: they have a shape but no token ids; pass real "
            "token ids (e.g. on the CPU or the model's device)"
        )
    if tokens.shape[0] == 0:
        raise ApexlensError(
            f"{name} has no rows (shape {tuple(tokens.shape)}): give at least one example"
        )
    if tokens.shape[1] == 0:
        raise ApexlensError(
            f"{name} has no positions (shape {tuple(tokens.shape)}): sequences are empty"
        )
    d_vocab = bk.dims.d_vocab_in
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        raise ApexlensError(
            f"{name} holds token ids outside the vocabulary 0..{d_vocab - 1} (found {lo}..{hi})"
        )
    if tokens.shape[1] > bk.dims.n_ctx:
        raise ApexlensError(
            f"{name} has {tokens.shape[1]} positions; the model's context n_ctx is {bk.dims.n_ctx}"
        )
    return tokens.long().to(bk.device)


def check_pair(
    bk: Backend, clean: Any, corrupted: Any
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Clean and corrupted tokens, each checked, of the same shape."""
    c = check_tokens(bk, clean, "clean_tokens")
    k = check_tokens(bk, corrupted, "corrupted_tokens")
    if c.shape != k.shape:
        raise ApexlensError(
            f"clean tokens {tuple(c.shape)} and corrupted tokens {tuple(k.shape)} must have the "
            "same shape"
        )
    return c, k
