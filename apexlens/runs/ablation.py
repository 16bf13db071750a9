"""What an ablated edge carries: the corrupted run's value (``"resample"``), a mean over
reference inputs (``"mean"``), or zero (``"zero"``), for every sender of the edge graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import Backend
from apexlens.runs.cache import Run, cached_run
from apexlens.runs.tokens import check_tokens
from apexlens.vocab.specs import Ablation


@dataclass
class AblationValues:
    """What each sender outputs when an edge from it is ablated."""

    embed: Float[Tensor, "batch pos d_model"]
    z: list[Float[Tensor, "batch pos head d_head"]]
    mlp_out: list[Float[Tensor, "batch pos d_model"]]
    tok: Float[Tensor, "batch pos d_model"] | None = None
    """``hook_embed`` / ``hook_pos_embed`` values, for edge graphs that split ``embed``."""
    pos: Float[Tensor, "batch pos d_model"] | None = None

    def _map(self, f: Callable[[Tensor], Tensor]) -> AblationValues:
        """``f`` on every per-example value (values shared by every example, a leading
        axis of 1, and missing ones stay as they are)."""
        g = lambda x: x if x is None or x.shape[0] == 1 else f(x)  # noqa: E731
        return AblationValues(
            g(self.embed), [g(z) for z in self.z], [g(m) for m in self.mlp_out], g(self.tok),
            g(self.pos),
        )

    def tiled(self, rows: int) -> AblationValues:
        """The same values for ``rows`` copies of the batch stacked along the batch axis."""
        return self._map(lambda x: x.repeat(rows, *([1] * (x.ndim - 1))))

    def rows(self, sl: slice) -> AblationValues:
        """The values for examples ``sl`` (values shared by every example stay as they are)."""
        return self._map(lambda x: x[sl])


def ablation_values(
    bk: Backend, ablation: Ablation, corrupted: Run | None, reference: Run | None
) -> AblationValues:
    """The ablated sender outputs, with ``tok`` / ``pos`` where the runs recorded the split
    embedding (``hook_embed`` / ``hook_pos_embed``)."""
    out = _ablation_values(bk, ablation, corrupted, reference)
    ref = corrupted if ablation == "resample" else reference if reference is not None else corrupted
    if ref is not None and "hook_embed" in ref.acts and "hook_pos_embed" in ref.acts:
        tok = ref["hook_embed"]
        pos = ref["hook_pos_embed"].expand_as(tok)
        if ablation == "mean":
            tok, pos = tok.mean(0, keepdim=True), pos.mean(0, keepdim=True)
        elif ablation == "zero":
            tok, pos = torch.zeros_like(tok[:1]), torch.zeros_like(pos[:1])
        out.tok, out.pos = tok, pos
    return out


def _ablation_values(
    bk: Backend, ablation: Ablation, corrupted: Run | None, reference: Run | None
) -> AblationValues:
    n = bk.dims.n_layers
    if ablation == "resample":
        if corrupted is None:
            raise ApexlensError("resample ablation needs corrupted tokens")
        run = corrupted
        return AblationValues(
            run[bk.resid_pre(0)],
            [run[bk.z(la)] for la in range(n)],
            [run[bk.mlp_out(la)] for la in range(n)] if bk.dims.has_mlps else [],
        )
    if ablation == "mean":
        ref = reference if reference is not None else corrupted
        if ref is None:
            raise ApexlensError("mean ablation needs reference tokens")
        m = lambda t: t.mean(0, keepdim=True)
        return AblationValues(
            m(ref[bk.resid_pre(0)]),
            [m(ref[bk.z(la)]) for la in range(n)],
            [m(ref[bk.mlp_out(la)]) for la in range(n)] if bk.dims.has_mlps else [],
        )
    if ablation == "zero":
        ref = corrupted if corrupted is not None else reference
        assert ref is not None
        z = lambda t: torch.zeros_like(t[:1])
        return AblationValues(
            z(ref[bk.resid_pre(0)]),
            [z(ref[bk.z(la)]) for la in range(n)],
            [z(ref[bk.mlp_out(la)]) for la in range(n)] if bk.dims.has_mlps else [],
        )
    raise ApexlensError(f"ablation must be 'resample', 'mean' or 'zero', got {ablation!r}")




def ablation_for(
    bk: Any, ablation: Ablation, corrupted: Run | None, reference_tokens: Any, n_pos: int
) -> AblationValues:
    """What an ablated edge carries (``reference_tokens``: checked, run once, for ``"mean"``)."""
    reference = None
    if reference_tokens is not None:
        ref = check_tokens(bk, reference_tokens, "reference_tokens")
        if ref.shape[1] != n_pos:
            raise ApexlensError(
                f"reference tokens must be [n, {n_pos}] like the clean tokens, got "
                f"{tuple(ref.shape)}"
            )
        reference = cached_run(bk, ref)
    return ablation_values(bk, ablation, corrupted, reference)
