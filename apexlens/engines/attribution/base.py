"""What every edge-attribution method receives (:class:`Job`) and gives back.

A method turns a :class:`Job` -- the cached runs, the metric readout, the edge graph, the
ablated values and the edges to score as rows ``(sender, receiver, position or -1)`` -- into
one value per edge and example, ``[edge, batch]``: the change of the metric when that edge
alone is ablated (``exact``), or an estimate of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apexlens.runs.ablation import AblationValues
from apexlens.runs.cache import Runs
from apexlens.runs.readout import Readout
from apexlens.vocab.edges import EdgeIndex


@dataclass
class Job:
    """A resolved attribution question (see the module docstring)."""

    runs: Runs
    readout: Readout
    index: EdgeIndex
    abl: AblationValues
    table: Int[Tensor, "edge 3"]
    clean_values: Float[Tensor, " batch"]
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    _delta: Tensor | None = None

    @property
    def bk(self) -> Any:
        return self.runs.bk

    def delta(self) -> Float[Tensor, "sender batch pos d_model"]:
        """``ablated_s - out_s`` on the clean run, for every sender of the graph."""
        if self._delta is None:
            bk, c, abl, idx = self.bk, self.runs.clean, self.abl, self.index
            shape = c[bk.resid_pre(0)].shape
            out = torch.empty(len(idx.senders), *shape, dtype=bk.dtype, device=bk.device)
            if idx.split_embed:
                assert abl.tok is not None and abl.pos is not None
                out[0] = abl.tok - c["hook_embed"]
                out[1] = abl.pos - c["hook_pos_embed"].expand(shape)
            else:
                out[0] = abl.embed - c[bk.resid_pre(0)]
            for layer in range(bk.dims.n_layers):
                dz = abl.z[layer] - c[bk.z(layer)]
                out[idx.head_sender[layer]] = bk.head_outputs(layer, dz.expand_as(c[bk.z(layer)]))
                if layer in idx.mlp_sender:
                    out[idx.mlp_sender[layer]] = abl.mlp_out[layer] - c[bk.mlp_out(layer)]
            self._delta = out
        return self._delta


class Method(Protocol):
    """An edge-attribution method: its name, what its options mean, and the scores."""

    name: str
    exact: bool
    """Whether the scores are the true effects (else an approximation: say so in reports)."""

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options, checked (one clear error for a bad one), with defaults filled in."""
        ...

    def scores(self, job: Job) -> Float[Tensor, "edge batch"]:
        ...
