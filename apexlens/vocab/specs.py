"""What a user asks for, as plain values: a path patch (:class:`Paths`) or a circuit
hypothesis (:class:`Circuit`) for :func:`apexlens.patched`, and the option vocabularies
(:data:`MLPMode`, :data:`Ablation`). Imports nothing of apexlens but the node vocabulary, so
engines, results and the façade can all use it."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from apexlens.errors import ApexlensError
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


CIRCUIT_FORMAT = "apexlens.circuit"
CIRCUIT_VERSION = 1


def provenance() -> dict[str, Any]:
    """Versions and time: what every saved circuit, result and command output records."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "apexlens": version("apexlens"),
        "torch": torch.__version__,
        "transformer_lens": version("transformer-lens"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Circuit:
    """A circuit hypothesis: the kept edges and how every other edge is ablated, for
    :func:`apexlens.patched` and ``evaluate_circuit(circuit.edges, ablation=...)``.

    ``save(path)`` writes it as JSON, one edge per line::

        {"format": "apexlens.circuit", "version": 1, "ablation": "resample",
         "edges": [["embed", "0.1.v"], ["0.1", "1.3.k"], ...], "provenance": {...}}

    and ``Circuit.load(path)`` reads it back (checked; ``provenance`` -- versions and time --
    is informational and may be absent).
    """

    edges: tuple[tuple[Any, Any], ...]
    ablation: Ablation = "resample"

    def __init__(self, edges: Iterable[tuple[Any, Any]], ablation: Ablation = "resample"):
        if ablation not in get_args(Ablation):
            raise ApexlensError(
                f"ablation must be one of {', '.join(get_args(Ablation))}, got {ablation!r}"
            )
        object.__setattr__(self, "edges", tuple(tuple(e) for e in edges))
        object.__setattr__(self, "ablation", ablation)

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """The edges: a Circuit goes wherever an edge list does."""
        return iter(self.edges)

    def to_json(self) -> str:
        """The circuit as ``apexlens.circuit`` JSON text (one edge per line)."""
        lines = ",\n".join(f"  {json.dumps([str(s), str(r)])}" for s, r in self.edges)
        head = {"format": CIRCUIT_FORMAT, "version": CIRCUIT_VERSION, "ablation": self.ablation}
        body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items())
        edges = f"[\n{lines}\n ]" if lines else "[]"
        prov = json.dumps(provenance())
        return f"{{\n{body},\n \"edges\": {edges},\n \"provenance\": {prov}\n}}\n"

    @classmethod
    def from_json(cls, doc: str | dict[str, Any], where: str = "circuit") -> Circuit:
        """A circuit from ``apexlens.circuit`` JSON (text or parsed), checked."""
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as err:
                raise ApexlensError(f"{where} is not valid JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != CIRCUIT_FORMAT:
            raise ApexlensError(
                f"{where} is not an apexlens circuit (expected \"format\": "
                f"\"{CIRCUIT_FORMAT}\"; results are read by apexlens.load_result)"
            )
        if doc.get("version") != CIRCUIT_VERSION:
            raise ApexlensError(
                f"{where}: circuit format version {doc.get('version')!r} is not supported "
                f"(this apexlens reads version {CIRCUIT_VERSION})"
            )
        edges = doc.get("edges")
        if not isinstance(edges, list):
            raise ApexlensError(f"{where}: 'edges' must be a list of [sender, receiver]")
        for i, pair in enumerate(edges):
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise ApexlensError(
                    f"{where}: edge {i} is {pair!r}, expected [sender, receiver] (two strings)"
                )
        return cls([(s, r) for s, r in edges], ablation=doc.get("ablation", "resample"))

    def save(self, path: str | Path) -> Path:
        """Write the circuit to ``path`` (``.json`` added when missing); returns the path."""
        p = Path(path)
        p = p if p.suffix == ".json" else p.with_name(p.name + ".json")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json(), encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit written by :meth:`save` (``.json`` added when missing)."""
        p = Path(path)
        if not p.exists() and p.suffix != ".json":
            p = p.with_name(p.name + ".json")
        if not p.exists():
            raise ApexlensError(f"no circuit file at {p}")
        return cls.from_json(p.read_text(encoding="utf-8"), where=str(p))
