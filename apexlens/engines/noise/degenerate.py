"""Degenerate noisy passes: outputs that are numerical artefacts, not predictions.

A noisy pass is *degenerate* at a scored position -- left out of every share, counted, warned
about, never read as concentration -- when any of these holds:

=====  =================  ===============================================================
code   name               test
=====  =================  ===============================================================
1      ``nonfinite``      a logit is NaN or +-inf
2      ``norm_overflow``  a normalisation's scale (``hook_scale``) is not finite or is 0
                          anywhere in the row, or the mean square of the final residual
                          stream at the position overflows (what ``ln_final`` divides by).
                          In float32 LayerNorm's variance overflows once activations reach
                          ~1e19: the scale becomes inf, ``x / scale`` exactly 0, and the
                          norm outputs its bias -- finite logits, identical for every draw
                          and prompt: a fake 100% "concentration"
3      ``constant``       ``max - min`` of the logits ``<= 1e-6 * max(1, max |logit|)``
4      ``tie``            the top two logits are exactly equal (``argmax`` would pick the
                          lower id: a bias made by the tie-break, not by the model)
=====  =================  ===============================================================
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

CODES = {0: "ok", 1: "nonfinite", 2: "norm_overflow", 3: "constant", 4: "tie"}
"""Degeneracy code -> name (0: a usable prediction)."""

CONSTANT_RTOL = 1e-6


def overflowed(x: Float[Tensor, "... d_model"]) -> Bool[Tensor, "..."]:
    """Whether a norm dividing by the root mean square of ``x`` (last axis) would overflow:
    the mean square computed in ``x``'s precision (at least float32, as TransformerLens'
    norms do) is not finite, or ``x`` itself is not."""
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return ~torch.isfinite(wide.pow(2).mean(dim=-1)) | ~torch.isfinite(wide).all(dim=-1)


def classify(
    logits: Float[Tensor, "... vocab"], norm_bad: Bool[Tensor, "..."] | None = None
) -> Tensor:
    """The degeneracy code (module docstring) of every row of ``logits``; ``norm_bad``: rows
    whose normalisation overflowed (code 2). Later rules win: nonfinite over the others."""
    code = torch.zeros(logits.shape[:-1], dtype=torch.uint8, device=logits.device)
    finite = torch.isfinite(logits).all(dim=-1)
    safe = torch.where(finite[..., None], logits, torch.zeros_like(logits)).double()
    top = safe.topk(min(2, safe.shape[-1]), dim=-1).values
    span = top[..., 0] - safe.min(dim=-1).values
    scale = safe.abs().max(dim=-1).values.clamp_min(1.0)
    code[top[..., 0] == top[..., -1]] = 4
    code[span <= CONSTANT_RTOL * scale] = 3
    if norm_bad is not None:
        code[norm_bad.to(code.device)] = 2
    code[~finite] = 1
    return code
