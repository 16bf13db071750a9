"""Commands under ``torchrun``: ``torchrun --nproc_per_node N -m apexlens <command> ...``.

Launched by torchrun with ``WORLD_SIZE > 1`` (the user's explicit choice of several
processes), a command joins the process group (gloo: apexlens exchanges its results over gloo
on CPUs and GPUs alike; on GPUs each process takes the GPU of its ``LOCAL_RANK``) and runs
inside :func:`apexlens.sharded`, so every question it asks is split across the processes.
Rank 0 alone writes ``--out`` and prints: the other ranks run the same command with their
output going to a temporary folder that is removed afterwards and their stdout and progress
silenced. Every rank computes everything before rank 0 writes anything, so a failure on any
rank leaves no half-written output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator

from apexlens.errors import ApexlensError
from apexlens.runs.shard import Guard, launched_by_torchrun, sharded


@contextlib.contextmanager
def _process_group() -> Iterator[int]:
    """Join torchrun's process group for the block; yields this process's rank."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo")
        except (RuntimeError, ValueError) as err:
            raise ApexlensError(f"cannot join torchrun's process group: {err}") from None
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def speaks() -> bool:
    """Whether this process prints: not one of torchrun's processes, or its rank 0."""
    return not launched_by_torchrun() or os.environ.get("RANK", "0") == "0"


def run_command(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], int],
    check: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """``check(args)`` then ``run(args)``, sharded across torchrun's processes when launched
    by torchrun (there rank 0 alone checks ``--out``, the folder it writes, and a refusal
    there is raised on every rank alike)."""
    if not launched_by_torchrun():
        if check is not None:
            check(args)
        return int(run(args))
    with _process_group() as rank, sharded():
        with Guard("checking --out"):
            if rank == 0 and check is not None:
                check(args)
        if rank == 0:
            return int(run(args))
        with tempfile.TemporaryDirectory(prefix=f"apexlens-rank{rank}-") as scratch:
            if hasattr(args, "out"):
                args.out = scratch
            if hasattr(args, "no_progress"):
                args.no_progress = True
            with contextlib.redirect_stdout(io.StringIO()):
                return int(run(args))
