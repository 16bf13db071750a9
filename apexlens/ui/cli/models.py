"""``apexlens models``: the shipped toy models."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    sub.add_parser("models", help="list the shipped toy models")


def run(args: argparse.Namespace) -> int:
    from apexlens.toys.models import list_models, model_info

    for name in list_models():
        info = model_info(name)
        print(f"{name:20s} task={info['task']:10s} {info['description']}")
    return 0
