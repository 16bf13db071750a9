"""``apexlens demo``: the demo on the shipped toy models, written as an HTML report."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run the demo on the shipped toy models (offline) and write an HTML report"
    )
    from apexlens.ui.cli.common import add_overwrite

    p.add_argument(
        "--out",
        default="apexlens-report",
        help="output directory for report.html, created if needed (default: apexlens-report)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr (default: show it)"
    )
    add_overwrite(p)


def run(args: argparse.Namespace) -> int:
    from apexlens.ui.demo import run_demo

    run_demo(args.out, progress=not args.no_progress)
    return 0
