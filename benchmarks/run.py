"""Run every apexlens benchmark and print the ratios, each measured side by side in one run.

python benchmarks/run.py [--quick] [--backend hooked|bridge]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_apex  # noqa: E402
import bench_patching  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="hooked", choices=["hooked", "bridge"])
    args = parser.parse_args()
    extra = ["--quick"] if args.quick else []
    bench_patching.main(extra + ["--backend", args.backend])
    bench_apex.main([])


if __name__ == "__main__":
    main()
