"""What a user asks for, as plain values: a path patch (:class:`Paths`) or a circuit
hypothesis (:class:`Circuit`) for :func:`apexlens.patched`, and the option vocabularies
(:data:`MLPMode`, :data:`Ablation`). Imports nothing of apexlens but the node vocabulary, so
engines, results and the façade can all use it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from apexlens.vocab.nodes import NodeSpec

MLPMode = Literal["live", "frozen"]
"""``"live"``: MLPs on a path recompute (IOI/ARENA); ``"frozen"``: direct paths only."""

Ablation = Literal["resample", "mean", "zero"]
"""What an edge outside a circuit carries: the corrupted run's value, a mean, or zero."""

EdgeSpec = Iterable[tuple[Any, Any]]


@dataclass(frozen=True)
class Paths:
    """A path-patching spec for :func:`apexlens.patched`: senders patched jointly along their
    paths to the receivers."""

    senders: NodeSpec
    receivers: NodeSpec = "logits"
    mlps: MLPMode = "live"


@dataclass(frozen=True)
class Circuit:
    """A circuit-hypothesis spec for :func:`apexlens.patched`: the kept edges and how every
    other edge is ablated."""

    edges: tuple[tuple[Any, Any], ...]
    ablation: Ablation = "resample"

    def __init__(self, edges: Iterable[tuple[Any, Any]], ablation: Ablation = "resample"):
        object.__setattr__(self, "edges", tuple(tuple(e) for e in edges))
        object.__setattr__(self, "ablation", ablation)
