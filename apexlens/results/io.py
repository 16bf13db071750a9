"""Results you can keep: ``result.save(path)`` and ``Type.load(path)`` (or
:func:`apexlens.load_result`), plain JSON plus safetensors -- no pickle, nothing executed on
load.

``save("out/ioi")`` writes ``out/ioi.json`` (the result's type, every field that is not a
tensor, and a provenance block: apexlens, torch and TransformerLens versions, the time, and
whatever the result records about its model, metric, seed) and, when the result holds
tensors, ``out/ioi.safetensors`` beside it. Loading rebuilds the same dataclass with equal
values (tests round-trip every result type).

Fields are encoded by type: tensors go to the safetensors file (by a key; the JSON names
it), :class:`~apexlens.scoring.Scores` as its per-example values, DataFrames as records,
nested results, features and tuples as tagged JSON objects. A callable ``token_labels`` is
saved as the labels of the token ids the result mentions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.scoring import Scores
from apexlens.vocab.features import Feature
from apexlens.vocab.specs import provenance

FORMAT = "apexlens.result"
VERSION = 1


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def tensor(self, t: Tensor, key: str) -> dict[str, Any]:
        name = key
        i = 1
        while name in self.tensors:
            i += 1
            name = f"{key}.{i}"
        self.tensors[name] = t.detach().cpu().contiguous()
        return {"__tensor__": name}

    def value(self, v: Any, key: str) -> Any:
        if isinstance(v, Tensor):
            return self.tensor(v, key)
        if isinstance(v, Scores):
            return {"__scores__": self.tensor(v.values, key)["__tensor__"]}
        if isinstance(v, pd.DataFrame):
            rows = [[_plain(x) for x in row] for row in v.astype(object).values.tolist()]
            return {
                "__frame__": {
                    "columns": [str(c) for c in v.columns],
                    "dtypes": [str(d) for d in v.dtypes],
                    "data": self.value(rows, key),
                }
            }
        if isinstance(v, Feature):
            return {"__feature__": self.fields(v, key)}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {"__result__": type(v).__name__, "fields": self.fields(v, key)}
        if isinstance(v, tuple):
            return {"__tuple__": [self.value(x, f"{key}.{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.value(x, f"{key}.{i}") for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            items = [[self.value(k, key), self.value(x, f"{key}.{i}")] for i, (k, x) in
                     enumerate(v.items())]
            return {"__map__": items}
        if isinstance(v, float) and not math.isfinite(v):
            return {"__float__": repr(v)}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise ApexlensError(f"cannot save field {key!r} of type {type(v).__name__}")

    def fields(self, obj: Any, prefix: str) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init or f.metadata.get("save") is False:
                continue
            v = getattr(obj, f.name)
            if f.name == "token_labels" and v is not None:
                v = _label_table(obj, v)
            out[f.name] = self.value(v, f"{prefix}.{f.name}" if prefix else f.name)
        return out


def _plain(x: Any) -> Any:
    """A table cell as a plain Python value (NumPy scalars unwrapped)."""
    return x.item() if hasattr(x, "item") and not isinstance(x, (list, dict, str)) else x


def _label_table(obj: Any, labels: Any) -> dict[int, str]:
    """A callable or sequence of token labels as ``{id: label}`` for the ids ``obj`` names."""
    ids: set[int] = set()
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor) and not v.is_floating_point() and f.name != "sample_position":
            ids.update(int(t) for t in v.flatten().tolist() if t >= 0)
    if hasattr(obj, "d_vocab") and obj.d_vocab <= 4096:
        ids.update(range(obj.d_vocab))
    ordered = torch.tensor(sorted(ids), dtype=torch.long)
    if callable(labels):
        names = [str(x) for x in labels(ordered)]
    else:
        names = [str(labels[int(i)]) for i in ordered]
    return dict(zip(ordered.tolist(), names, strict=True))


def save(result: Any, path: str | Path) -> Path:
    """Write ``result`` to ``path.json`` (+ ``path.safetensors``); returns the JSON path."""
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        raise ApexlensError(f"only apexlens results can be saved, got {type(result).__name__}")
    from safetensors.torch import save_file

    enc = _Encoder()
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "type": type(result).__name__,
        "provenance": provenance(),
        "fields": enc.fields(result, ""),
    }
    js, st = _paths(path)
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(doc, indent=1, allow_nan=False))
    if enc.tensors:
        save_file(enc.tensors, str(st))
    elif st.exists():
        st.unlink()
    return js


class _Decoder:
    def __init__(self, tensors: Mapping[str, Tensor], types: Mapping[str, type]) -> None:
        self.tensors, self.types = tensors, types

    def value(self, v: Any) -> Any:
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return self.tensors[v["__tensor__"]]
        if "__scores__" in v:
            return Scores(self.tensors[v["__scores__"]])
        if "__frame__" in v:
            f = v["__frame__"]
            frame = pd.DataFrame(self.value(f["data"]), columns=f["columns"])
            return frame.astype(dict(zip(f["columns"], f["dtypes"], strict=True)))
        if "__feature__" in v:
            return Feature(**self.fields(v["__feature__"]))
        if "__result__" in v:
            cls = self.types.get(v["__result__"])
            if cls is None:
                raise ApexlensError(f"unknown result type {v['__result__']!r} in the file")
            return cls(**self.fields(v["fields"]))
        if "__tuple__" in v:
            return tuple(self.value(x) for x in v["__tuple__"])
        if "__map__" in v:
            return {self.value(k): self.value(x) for k, x in v["__map__"]}
        if "__float__" in v:
            return float(v["__float__"])
        return {k: self.value(x) for k, x in v.items()}

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: self.value(x) for k, x in raw.items()}
        if isinstance(out.get("token_labels"), dict):
            out["token_labels"] = _Labels(out["token_labels"])
        return out


class _Labels:
    """Token labels read back from a file: ``labels(ids)`` (ids it does not know: the id)."""

    def __init__(self, table: Mapping[Any, str]) -> None:
        self.table = {int(k): v for k, v in table.items()}

    def __call__(self, ids: Tensor) -> list[str]:
        return [self.table.get(int(i), str(int(i))) for i in ids.flatten().tolist()]


def load(path: str | Path, types: Mapping[str, type], expect: type | None = None) -> Any:
    """Read a result written by :func:`save` (``types``: result class by name)."""
    js, st = _paths(path)
    if not js.exists():
        raise ApexlensError(f"no saved result at {js}")
    try:
        doc = json.loads(js.read_text())
    except json.JSONDecodeError as err:
        raise ApexlensError(f"{js} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ApexlensError(f"{js} is not an apexlens result file (no format {FORMAT!r})")
    if doc.get("version", 0) > VERSION:
        raise ApexlensError(f"{js} was written by a newer apexlens (format {doc['version']})")
    tensors: dict[str, Tensor] = {}
    if st.exists():
        from safetensors.torch import load_file

        tensors = load_file(str(st))
    cls = types.get(str(doc.get("type")))
    if cls is None:
        raise ApexlensError(f"{js} holds an unknown result type {doc.get('type')!r}")
    if expect is not None and not issubclass(cls, expect):
        raise ApexlensError(f"{js} holds a {cls.__name__}, not a {expect.__name__}")
    dec = _Decoder(tensors, types)
    return cls(**dec.fields(doc["fields"]))


class Saveable:
    """``save(path)`` / ``load(path)`` for a result dataclass (see the module docstring)."""

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path.json`` (+ ``path.safetensors``); returns the JSON path."""
        return save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a result of this type written by :meth:`save`."""
        return load(path, result_types(), expect=cls)


def result_types() -> dict[str, type]:
    """Every result class, by name: the subclasses of :class:`Saveable` (found by type, as
    einops finds its backends; nothing registers itself)."""
    out: dict[str, type] = {}
    todo: list[type] = [Saveable]
    while todo:
        cls = todo.pop()
        for sub in list[type](cls.__subclasses__()):
            out[sub.__name__] = sub
            todo.append(sub)
    return out


def load_result(path: str | Path) -> Any:
    """Read any result written by ``result.save(path)``."""
    return load(path, result_types())
