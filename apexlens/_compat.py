"""Old module paths, kept working: ``import apexlens.graph`` is ``apexlens.vocab``, and so on.

apexlens was one flat folder before its layers became folders (``model/``, ``vocab/``,
``runs/``, ``engines/``, ``results/``, ``api/``, ``ui/``, ``toys/``). Code written against
the old paths (``from apexlens.graph import full_graph``, ``apexlens.plotting_discovery``,
``import apexlens.training``) still runs: each old name below is an alias of the
module that holds its contents now -- the *same* module object, not a copy.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

ALIASES: dict[str, str] = {
    "graph": "apexlens.vocab",
    "backend": "apexlens.model",
    "bridge": "apexlens.model.convert",
    "plotting": "apexlens.ui.plotting",
    "plotting_discovery": "apexlens.ui.plotting_discovery",
    "plotting_fv": "apexlens.ui.plotting_fv",
    "report": "apexlens.ui.report",
    "cli": "apexlens.ui.cli",
    "models": "apexlens.toys.models",
    "training": "apexlens.toys.training",
    "tokenizer": "apexlens.toys.tokenizer",
    "tasks": "apexlens.toys.tasks",
}
"""Old submodule name (under ``apexlens.``) -> the module that holds it now."""


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the target module was imported (and run) by create_module."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        head, _, leaf = fullname.partition(".")
        if head != "apexlens" or leaf not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(ALIASES[leaf]))


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
