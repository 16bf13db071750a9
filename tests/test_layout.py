"""The package's shape, as rules that cannot drift: imports point down the layers, engines
never import each other, only ``model/`` touches the model's modules, no import cycles, size
limits, and one error type. Read from the source (AST), nothing imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "apexlens"

LAYERS: dict[str, set[str]] = {
    # layer -> the layers it may import (besides itself)
    "errors": set(),
    "model": {"errors"},
    "vocab": {"errors", "model"},
    "scoring": {"errors", "vocab"},
    "runs": {"errors", "model", "vocab", "scoring"},
    "engines": {"errors", "model", "vocab", "scoring", "runs"},
    "results": {"errors", "vocab", "scoring"},
    "reference": {"errors", "model", "vocab"},
    "api": {"errors", "model", "vocab", "scoring", "runs", "engines", "results"},
    "toys": {"errors", "model", "vocab", "scoring", "runs", "results", "api"},
    "ui": {"errors", "model", "vocab", "scoring", "runs", "engines", "results", "api", "toys",
           "__init__"},
    "_compat": set(),
    "__init__": {"errors", "model", "vocab", "scoring", "runs", "engines", "results", "api",
                 "toys", "ui", "_compat", "reference"},
    "__main__": {"ui"},
}
"""Lowest first: errors -> model -> vocab -> scoring -> runs -> engines -> results -> api ->
toys, ui (the user interface reads the public API, ``apexlens`` itself). ``reference`` (the slow loops every fast path is tested against) may use only the
model adapter's hooks and the vocabulary: never the engines or the runs it checks."""

MODEL_TOUCHERS = {
    "reference.py": "the reference loops call the model's own modules, independently of model/",
    "toys/training.py": "training scripts optimise a model's parameters directly",
}
"""Modules outside model/ allowed to touch a model's internals, and why."""

LONG_FUNCTIONS = {
    "reference.py:naive_path_patch": "the naive loop is the definition written out: the freeze "
    "pass and the patch pass in one place, so that it stays obviously correct",
}
"""Functions allowed over 150 lines, and why."""


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(ROOT.rglob("*.py")):
        yield ".".join(("apexlens", *path.relative_to(ROOT).with_suffix("").parts)), path


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """apexlens modules imported by ``path`` (module-level and inside functions; not under
    ``TYPE_CHECKING``), with line numbers."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("apexlens")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.startswith("apexlens"):
                known = {m for m, _ in modules()}
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
                out += [(m, node.lineno) for m in subs] or [(base, node.lineno)]
    return out


def test_imports_point_down_the_layers():
    bad = []
    for module, path in modules():
        mine = layer_of(module)
        for target, line in imports(path, module):
            theirs = layer_of(target)
            if theirs != mine and theirs not in LAYERS[mine]:
                bad.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_engines_never_import_each_other():
    bad = []
    for module, path in modules():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] != "engines" or parts[2] == "__init__":
            continue
        for target, line in imports(path, module):
            tparts = target.split(".")
            if len(tparts) >= 3 and tparts[1] == "engines" and tparts[2] != parts[2]:
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports(p, m)} for m, p in modules()}
    graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_only_model_touches_the_model():
    bad = []
    for _, path in modules():
        rel = str(path.relative_to(ROOT))
        if rel.startswith("model/") or rel in MODEL_TOUCHERS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""
                ]
                if any(n.split(".")[0] == "transformer_lens" for n in names):
                    bad.append(f"{rel}:{node.lineno} imports transformer_lens")
            if isinstance(node, ast.Attribute) and node.attr in ("blocks", "cfg", "hook_dict"):
                bad.append(f"{rel}:{node.lineno} reads .{node.attr}")
    assert not bad, "\n".join(bad)


def _spans(tree: ast.AST) -> Iterator[tuple[str, ast.AST, int]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node, (node.end_lineno or node.lineno) - node.lineno + 1


def test_sizes():
    bad = []
    for _, path in modules():
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        if len(text.splitlines()) > 700:
            bad.append(f"{rel}: module of {len(text.splitlines())} lines (max 700)")
        for name, node, n in _spans(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and n > 300:
                bad.append(f"{rel}:{name}: class of {n} lines (max 300)")
            if not isinstance(node, ast.ClassDef) and n > 150 and f"{rel}:{name}" not in LONG_FUNCTIONS:
                bad.append(f"{rel}:{name}: function of {n} lines (max 150)")
    assert not bad, "\n".join(bad)


FOREIGN = {"ValueError", "KeyError", "TypeError", "NotImplementedError", "RuntimeError",
           "IndexError", "AssertionError", "Exception", "SystemExit"}


def test_one_error_type():
    """Outside toys/ training scripts, apexlens raises ApexlensError only (an internal
    exception class used to stop a pass early is caught where it is raised), catches no
    bare ``Exception``, and decides nothing by matching an error's text."""
    bad = []
    for _, path in modules():
        rel = str(path.relative_to(ROOT))
        if rel in ("toys/training.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = exc.id if isinstance(exc, ast.Name) else getattr(exc, "attr", "")
                if name in FOREIGN and not (rel == "__init__.py" and name == "AttributeError"):
                    bad.append(f"{rel}:{node.lineno} raises {name}")
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                caught = ast.unparse(node.type)
                if caught in ("Exception", "BaseException"):
                    bad.append(f"{rel}:{node.lineno} catches {caught}")
            if isinstance(node, ast.Compare) and "str(err)" in ast.unparse(node) + "":
                bad.append(f"{rel}:{node.lineno} decides by an error's text")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["graph", "plotting", "plotting_discovery", "tasks", "models"])
def test_old_module_paths_still_import(name):
    import importlib

    import apexlens
    from apexlens._compat import ALIASES

    old = importlib.import_module(f"apexlens.{name}")
    assert old is importlib.import_module(ALIASES[name]) is getattr(apexlens, name)
