"""What every command shares: one-line errors, ``--out`` checks, argument splitting, the
model and task of a command."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        where = self.prog[len("apexlens ") :] if self.prog.startswith("apexlens ") else ""
        raise ApexlensError(f"{where}: {message}" if where else message)


def split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def split_sites(text: str) -> list[str]:
    """Split ``--sites`` on commas, except before a layer number: ``"z:0,1,embed"`` ->
    ``["z:0,1", "embed"]`` (a piece that is an integer continues the preset before it)."""
    out: list[str] = []
    for piece in split(text):
        if out and ":" in out[-1] and re.fullmatch(r"-?\d+", piece):
            out[-1] += f",{piece}"
        else:
            out.append(piece)
    return out


def parse_sigmas(text: str) -> list[float]:
    """``--sigmas``: comma-separated numbers, each >= 0, strictly increasing."""
    try:
        sigmas = [float(s) for s in split(text)]
    except ValueError:
        raise ApexlensError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not sigmas:
        raise ApexlensError("--sigmas: give at least one noise level")
    bad = [s for s in sigmas if not s >= 0]
    if bad:
        raise ApexlensError(
            f"--sigmas: every sigma must be >= 0 (a standard deviation), got {bad[0]:g}"
        )
    if any(b <= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise ApexlensError(f"--sigmas must be strictly increasing, got {text!r}")
    return sigmas


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot take the outputs, before anything is computed."""
    if out.exists() and not out.is_dir():
        raise ApexlensError(f"--out {out} is a file, not a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ApexlensError(f"--out {out}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ApexlensError(
            f"--out {out}: cannot write there ({e.strerror or type(e).__name__} in {existing})"
        ) from None


OUTPUTS: dict[str, tuple[str, ...]] = {
    "demo": ("report.html",),
    "path-patch": ("path_patch.csv", "path_patch.json", "path_patch.html"),
    "apex": ("apex.csv", "apex_bias.csv", "apex.json", "apex.html"),
    "discover": (
        "edge_scores.csv",
        "faithfulness.csv",
        "circuit.csv",
        "circuit.json",
        "discover.json",
        "discover.html",
    ),
    "visualize": ("fv.csv", "natural_top.csv", "check.csv", "visualize.json", "visualize.html"),
}
"""The files each command writes into ``--out`` (a test runs each command and compares)."""


def check_overwrite(args: argparse.Namespace) -> None:
    """Refuse to replace files a command would write into an existing ``--out`` unless
    ``--overwrite`` is given (before anything is computed)."""
    out = getattr(args, "out", None)
    if out is None or getattr(args, "overwrite", False):
        return
    there = [name for name in OUTPUTS.get(args.command, ()) if (Path(out) / name).exists()]
    if there:
        raise ApexlensError(
            f"--out {out} already holds {', '.join(there)}: pass --overwrite to replace "
            "them, or choose another --out"
        )


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in --out (default: refuse)",
    )


def say(args: argparse.Namespace, text: str) -> None:
    if not args.no_progress:
        print(text, file=sys.stderr, flush=True)


def model_and_task(args: argparse.Namespace) -> tuple[Any, Any]:
    from apexlens.toys.models import (
        check_task_fits,
        close_to_toy,
        list_models,
        load_model,
        model_info,
        official_name,
    )
    from apexlens.toys.tasks import get_task

    close_to_toy(args.model)  # a misspelt toy name: "did you mean ...?", before anything else
    toy = args.model in list_models()
    task_name = args.task or (model_info(args.model)["task"] if toy else None)
    if task_name is None:
        official_name(args.model)  # an unknown name is diagnosed as that, not as a task
        raise ApexlensError(
            f"model {args.model!r} has no default task: pass --task (e.g. --task ioi)"
        )
    if toy and task_name != model_info(args.model)["task"]:  # before loading anything
        check_task_fits(get_task(task_name), None, args.model)
    model = load_model(args.model, backend=args.backend)
    kwargs = {"tokenizer": model.tokenizer} if task_name == "ioi" else {}
    task = get_task(task_name, **kwargs)
    check_task_fits(task, model, args.model)
    return model, task



def provenance(args: argparse.Namespace, files: list[str] | None = None) -> dict[str, Any]:
    """What every output of a command records: the command and every option as parsed (model,
    task, prompts, seed...), the package versions and the time, and the files it wrote (the
    CSV tables among them cannot carry it themselves)."""
    from apexlens.results import provenance as versions

    options = {k: v for k, v in sorted(vars(args).items()) if not callable(v)}
    out: dict[str, Any] = {"command": f"apexlens {args.command}", "options": options}
    out.update(versions())
    if files:
        out["files"] = files
    return out


def write_json(path: Path, doc: dict[str, Any], args: argparse.Namespace, files: list[str]) -> None:
    """``doc`` as JSON with a ``provenance`` block first (:func:`provenance`)."""
    import json

    path.write_text(
        json.dumps({"provenance": provenance(args, files), **doc}, indent=2, default=str)
    )


def add_common(p: argparse.ArgumentParser) -> None:
    """The arguments every model command takes."""
    p.add_argument(
        "model",
        help="a shipped toy model (see `apexlens models`) or a TransformerLens name, e.g. gpt2",
    )
    p.add_argument(
        "--task",
        help="task name: induction, modadd, backdoor, ioi (default: the toy model's own task; "
        "required for other models)",
    )
    p.add_argument("--n", type=int, default=32, help="number of prompts (default: 32)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the prompts and of any sampling (default: 0)"
    )
    p.add_argument(
        "--backend",
        choices=["hooked", "bridge"],
        default=None,
        help="model class (default: HookedTransformer where TransformerLens has it, else "
        "TransformerBridge)",
    )
    p.add_argument(
        "--out",
        default="apexlens-out",
        help="output directory, created if needed (default: apexlens-out; checked before "
        "anything is computed)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars or messages on stderr (default: show them)",
    )
    add_overwrite(p)
