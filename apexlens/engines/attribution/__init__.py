"""The edge-attribution engine: one score per edge and example, by a method from
:data:`METHODS`.

:data:`METHODS` is the one registry the API (:func:`apexlens.attribute_edges`), the command
line (``--method``) and validation all read: a new method is one class (the
:class:`~apexlens.engines.attribution.base.Method` protocol, in a file of its own) and one
row of :data:`~apexlens.engines.attribution.registry.METHOD_INFO`, the light table (no
torch) that the command line reads for its choices; the classes are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apexlens.engines.attribution.registry import METHOD_INFO, MethodInfo

if TYPE_CHECKING:
    from apexlens.engines.attribution.base import Job, Method

    METHODS: dict[str, Method]

__all__ = ["METHODS", "METHOD_INFO", "Job", "Method", "MethodInfo"]


def __getattr__(name: str) -> Any:
    """``METHODS`` (name -> method object, in :data:`METHOD_INFO`'s order), ``Job`` and
    ``Method``, imported on first use."""
    if name == "METHODS":
        from apexlens.engines.attribution import methods

        table = {n: getattr(methods, info.cls)() for n, info in METHOD_INFO.items()}
        globals()["METHODS"] = table
        return table
    if name in ("Job", "Method"):
        from apexlens.engines.attribution import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
