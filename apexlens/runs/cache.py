"""Cached runs: the activations whole forward passes left behind, and the memory budget.

Every engine works on top of whole forward passes that happen once: the clean run and,
where there is one, the corrupted run (:class:`Run`, :func:`cached_run`), held with the
batch's named positions and the memory budget in :class:`Runs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.model import Backend, edits
from apexlens.model.devices import free_bytes
from apexlens.runs.readout import Readout
from apexlens.runs.rows import rows_per_chunk
from apexlens.vocab.nodes import Node
from apexlens.vocab.positions import position_mask


def cache_names(bk: Backend) -> list[str]:
    """The activations every engine reads from a cached run."""
    names = [bk.resid_pre(0), *bk.split_embed_hooks()]
    for layer in range(bk.dims.n_layers):
        names += [bk.resid_pre(layer), bk.z(layer), *(bk.qkv(layer, c) for c in "qkv")]
        if bk.dims.has_mlps:
            names += [bk.mlp_in_resid(layer), bk.mlp_out(layer)]
    return list(dict.fromkeys(names))



@dataclass
class Run:
    """What one forward pass left behind: activations by hook name and the final residual."""

    acts: dict[str, Tensor]
    final: Float[Tensor, "batch pos d_model"]

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]

    def resid(self, layer: int, bk: Backend) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering block ``layer`` (``n_layers``: the final one)."""
        return self.final if layer >= bk.dims.n_layers else self.acts[bk.resid_pre(layer)]


def cached_run(
    bk: Backend, tokens: Int[Tensor, "batch pos"], names: Iterable[str] | None = None
) -> Run:
    """Run ``tokens`` once and keep what the engines read (:func:`cache_names`)."""
    final, acts = bk.run_with_cache(
        tokens.to(bk.device), cache_names(bk) if names is None else names, logits=False
    )
    return Run(acts, final)


def run_from(bk: Backend, resid0: Float[Tensor, "batch pos d_model"], names: Iterable[str]) -> Run:
    """A :class:`Run` of the model from a given residual stream entering block 0."""
    acts: dict[str, Tensor] = {}
    hooks = [(n, edits.save(acts, n)) for n in dict.fromkeys(names) if n != bk.resid_pre(0)]
    final = bk.run_layers(resid0, 0, None, hooks)
    acts[bk.resid_pre(0)] = resid0.detach().clone()
    return Run(acts, final)


@dataclass
class Runs:
    """The cached clean (and corrupted) run of an experiment, with its named positions."""

    bk: Backend
    clean: Run
    corrupted: Run | None
    batch: int
    n_pos: int
    named_positions: Mapping[str, Any] = field(default_factory=dict)
    memory_budget: int = 0
    scratch: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Working memory an engine reuses from one call on these runs to the next (the
    circuit engine's sender buffer, at most about :attr:`memory_budget`), kept on the CPU
    only: there fresh memory of hundreds of MB costs more in page faults than the products
    that fill it; CUDA's caching allocator reuses its memory by itself. The engines use it
    while holding the model's lock. It goes with the runs (an Experiment keeps it while it
    lives)."""

    def __post_init__(self) -> None:
        if not self.memory_budget:
            self.memory_budget = default_budget(self.bk, self.batch, self.n_pos)

    def mask(self, node: Node) -> Bool[Tensor, "batch pos"] | None:
        """Where ``node`` acts (``None``: every position)."""
        return position_mask(node, self.batch, self.n_pos, self.named_positions, self.bk.device)

    def rows_per_chunk(
        self, n_rows: int, n_tok: int, attention: bool, readout: Readout | None = None
    ) -> int:
        """Rows per chunk so one chunk's working set stays within the memory budget.

        ``n_tok`` is the number of token positions a row carries; ``attention`` whether the
        rows run through attention (its scores grow with the square of the sequence); a
        ``readout`` adds the logits it computes per row (:meth:`Readout.bytes_per_row`).
        """
        extra = 0 if readout is None else readout.bytes_per_row()
        return rows_per_chunk(
            self.bk, self.memory_budget, n_rows, self.batch, self.n_pos, n_tok, attention, extra
        )


def default_budget(bk: Backend, batch: int, n_pos: int) -> int:
    """Half of what a plain ``run_with_cache`` of the batch holds; for a batch whose cache is
    small next to the model (a quarter of its weights), up to three quarters of it (peaks
    stay under one ``run_with_cache``); at least 16 MiB. Small batches chunk at a loss:
    each chunk streams every weight once (GPT-2 medium at 8 x 16 ran a random-half circuit
    in two chunks at 2.07x one forward, in one at 1.78x).

    Never more than half of the memory free on the model's device now (:func:`free_share`),
    so a large batch is chunked instead of running out of memory."""
    d = bk.dims
    n_tok = batch * n_pos
    per_layer = n_tok * (12 * d.d_model + 2 * bk.dims.d_mlp) + 2 * batch * d.n_heads * n_pos**2
    cache = (d.n_layers * per_layer + n_tok * d.d_vocab) * bk.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in bk.model.parameters())
    budget = max(16 * 2**20, cache // 2, min(3 * cache // 4, weights // 4))
    free = free_share(bk.device)
    return budget if free is None else max(16 * 2**20, min(budget, free // 2))


def free_share(device: torch.device) -> int | None:
    """This process's share of the memory free on ``device`` (``None``: unknown): all of a
    GPU's; on the CPU, processes started together on one machine (``torchrun``'s
    ``LOCAL_WORLD_SIZE``) split what the machine has free."""
    free = free_bytes(device)
    if free is None or device.type != "cpu":
        return free
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return free // local
