"""Circuit files the workbench reads: an apexlens circuit JSON (the format
``Circuit.save`` writes, read by :func:`apexlens.ui.workbench.engine.circuit_from_json`) and
an EAP-IG / MIB graph JSON (its edges marked ``in_graph``, node names mapped onto apexlens').

Parsed with ``json.loads`` only (never unpickled), size-limited; a bad file raises one
:class:`ApexlensError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apexlens import ApexlensError
from apexlens.ui.workbench import engine
from apexlens.ui.workbench.names import SEP

MAX_JSON_BYTES = 20_000_000
_MIB_HEAD = re.compile(r"^a(\d+)\.h(\d+)(?:<([qkv])>)?$")
_MIB_MLP = re.compile(r"^m(\d+)$")


@dataclass(frozen=True)
class CircuitFile:
    """What a circuit file names: its edges (apexlens spellings), what kind of file it was
    and, for an apexlens circuit, the ablation it was saved with."""

    edges: list[tuple[str, str]]
    kind: str
    ablation: str | None


def read_circuit(text: str | bytes, filename: str = "JSON") -> CircuitFile:
    """The edges of an apexlens circuit JSON or an EAP-IG / MIB graph JSON (module docstring)."""
    if len(text) > MAX_JSON_BYTES:
        raise ApexlensError(f"{filename}: larger than {MAX_JSON_BYTES // 1_000_000} MB")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApexlensError(
            f"{filename} is not valid JSON (line {e.lineno}, column {e.colno}): it is neither "
            "an apexlens circuit nor a MIB graph"
        ) from None
    except UnicodeDecodeError:
        raise ApexlensError(
            f"{filename} is not valid JSON: it is neither an apexlens circuit nor a MIB graph"
        ) from None
    if isinstance(obj, dict) and "format" in obj:
        pairs, ablation = engine.circuit_from_json(obj)
        return CircuitFile(pairs, "circuit", ablation)
    if isinstance(obj, dict) and isinstance(obj.get("edges"), dict):
        return CircuitFile(mib_edges(obj), "MIB graph", None)
    raise ApexlensError(
        f"{filename}: not a circuit file -- expected an apexlens circuit "
        '({"format": "apexlens.circuit", "version": 1, "edges": [["0.1", "1.3.k"], ...]}) '
        'or an EAP-IG/MIB graph ({"edges": {"a0.h1->a1.h3<k>": {"in_graph": true, ...}}})'
    )


def mib_node(name: str) -> str:
    """An EAP-IG / MIB graph node name in apexlens' spelling: ``input`` -> ``embed``,
    ``aL.hH`` -> ``L.H``, ``aL.hH<q>`` -> ``L.H.q``, ``mL`` -> ``mL``, ``logits``."""
    if name == "input":
        return "embed"
    if name == "logits":
        return "logits"
    m = _MIB_HEAD.fullmatch(name)
    if m:
        return f"{m[1]}.{m[2]}" + (f".{m[3]}" if m[3] else "")
    m = _MIB_MLP.fullmatch(name)
    if m:
        return f"m{m[1]}"
    raise ApexlensError(
        f"MIB graph: node {name!r} has no apexlens equivalent (known: input, logits, aL.hH, "
        "aL.hH<q|k|v>, mL)"
    )


def mib_edges(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The edges marked ``in_graph`` of an EAP-IG / MIB graph JSON, in apexlens' names."""
    out: list[tuple[str, str]] = []
    marked = False
    for key, value in obj["edges"].items():
        if not isinstance(key, str) or SEP not in key:
            raise ApexlensError(f"MIB graph: edge {key!r} is not 'SENDER->RECEIVER'")
        s, r = key.split(SEP, 1)
        sender, receiver = mib_node(s), mib_node(r)
        if isinstance(value, Mapping) and "in_graph" in value:
            marked = True
            if value["in_graph"] is True:
                out.append((sender, receiver))
    if not marked:
        raise ApexlensError("MIB graph: no edge carries 'in_graph', so it names no circuit")
    return out
