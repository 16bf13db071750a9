"""The ``apexlens`` command line: one module per command, listed in :data:`COMMANDS`.

Every subcommand has ``--help``. A bad argument (unknown model, bad node name, head out of
range, negative sigma, files of an earlier run in ``--out`` without ``--overwrite``...)
prints one line on stderr and exits with status 2; Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import re
import sys
from types import ModuleType

from apexlens.errors import ApexlensError
from apexlens.runs.shard import raised_on_every_rank
from apexlens.ui.cli import apex, demo, discover, models, path_patch, visualize, workbench
from apexlens.ui.cli.common import (
    Parser,
    check_out,
    check_overwrite,
    parse_sigmas,
    split_sites,
)
from apexlens.ui.cli.launch import run_command, speaks

COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "models": models,
    "path-patch": path_patch,
    "apex": apex,
    "discover": discover,
    "visualize": visualize,
    "workbench": workbench,
}
"""Command name -> its module (``add_parser(sub)``, ``run(args) -> exit status``)."""

__all__ = ["COMMANDS", "build_parser", "check_out", "main", "parse_sigmas", "split_sites"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="apexlens", description="Exact, fast path patching and APEX noise probing."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--sigmas -1,2`` -> ``--sigmas=-1,2``: argparse takes ``-1,2`` for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--sigmas" and i + 1 < len(argv) and re.match(r"-[\d.]", argv[i + 1]):
            out.append(f"--sigmas={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out



def main(argv: list[str] | None = None) -> int:
    """Run one command; an error is one line on stderr (exit 2), Ctrl-C one line (exit 130)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(_join_negative_values(argv))
        return run_command(args, COMMANDS[args.command].run, check=check_overwrite)
    except ApexlensError as e:
        if speaks() or not raised_on_every_rank(e):  # under torchrun: said once
            print(f"apexlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apexlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
