"""Sharding across processes (``apexlens.sharded``), with real processes: ``torchrun`` with
the gloo backend on CPUs, 2 and 3 ranks, each rank running tests/distributed_worker.py.

Every question gives the single-process numbers: bit for bit, except where the split changes
a sum's order (EAP-IG's sum over its alphas, APEX's summed probabilities) or a batched
product's shape (many circuit hypotheses as rows), or where the machine's matrix products
depend on how many rows they hold (then every product a rank runs on its share): there to
1e-12 in float64. Faults on one
rank become one ApexlensError on every rank, and nothing hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")

REORDERED = {"evaluate_circuits", "faithfulness", "discover", "eap_ig", "apex", "apex_ids",
             "apex_bias"}
"""Questions whose sharded numbers add up in a different order (or shape) than one process's:
sums over a rank's share (EAP-IG's alphas, APEX's probabilities), circuits batched as rows."""


def torchrun(
    n: int, *args: str, timeout: float = 300, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).parents[1])
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def products_split_by_rows() -> bool:
    """Whether this machine's float64 matrix products give a row the same bits whatever the
    number of rows beside it (``(A @ B)[:k] == A[:k] @ B``), at the toy models' sizes, on one
    thread as the ranks run. Sharding gives each rank fewer rows per product; where the BLAS
    picks its kernel by the row count (MKL on AMD EPYC does: rows differ in the last bit),
    no reduction order is kept and the sharded numbers can only agree to rounding."""
    code = (
        "import torch\n"
        "torch.set_num_threads(1); g = torch.Generator().manual_seed(0)\n"
        "ok = True\n"
        "for m in (6, 12, 48, 96, 240):\n"
        "    for k, n in ((32, 64), (64, 32), (32, 128), (128, 32), (32, 8), (8, 32), (32, 40)):\n"
        "        a = torch.randn(m, k, dtype=torch.float64, generator=g)\n"
        "        b = torch.randn(k, n, dtype=torch.float64, generator=g)\n"
        "        ok &= all(torch.equal((a @ b)[:r], a[:r] @ b) for r in (1, m // 3, m // 2))\n"
        "print(ok)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_questions_and_faults(n, tmp_path):
    """Every question on 2 and 3 ranks; with 2, the faults after them. Every number within
    1e-12 (float64) of one process's; bit for bit where the split keeps every reduction's
    order: not in :data:`REORDERED`, and on a machine whose matrix products do not depend on
    the rows beside a row (:func:`products_split_by_rows`)."""
    torchrun(n, str(WORKER), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    assert all(rep == reports[0] for rep in reports)  # every rank holds the same answer
    report = reports[0]
    assert len(report) >= 19
    bitwise = products_split_by_rows()
    for key, got in report.items():
        name = key.split(":", 1)[1]
        assert got["max_abs"] <= 1e-12, (key, got)
        if bitwise and name not in REORDERED:
            assert got["equal"], (key, got)
    if not bitwise:  # not vacuous: the rows' values really differ here, within rounding
        assert any(not got["equal"] for got in report.values())
    if n == 2:
        check_faults(tmp_path)


def check_faults(tmp_path: Path) -> None:
    r0, r1 = (json.loads((tmp_path / f"faults{r}.json").read_text()) for r in range(2))
    for a, b in zip(r0[:3], r1[:3], strict=True):
        assert a["message"] == b["message"]  # one error, the same on every rank
        assert "failed on rank 1 of 2" in a["message"], a
        assert a["hooks_left"] == b["hooks_left"] == 0
    assert "ValueError: the metric broke on this shard" in r0[0]["message"]
    assert "returned NaN" in r0[1]["message"]
    assert "OutOfMemoryError" in r0[2]["message"]
    assert r0[3]["finite"] and r1[3]["finite"]  # the next question still works
    timeout = r0[4]
    assert "got no answer from every other rank within 3 s" in timeout["message"]
    assert timeout["seconds"] < 30 and timeout["hooks_left"] == 0


def test_command_line_under_torchrun(tmp_path):
    """``torchrun -m apexlens path-patch``: the same numbers as one process, written once,
    printed once; asked again into the same ``--out`` without ``--overwrite``, it refuses once
    (rank 0 checks, every rank stops) and leaves the files as they were."""
    from apexlens.ui.cli import main

    args = ["path-patch", "induction-2l", "--n", "6", "--senders", "heads:0",
            "--receivers", "1.3.k"]
    assert main([*args, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    # "--": torchrun would read apexlens' --n as an abbreviation of its own --nnodes
    done = torchrun(2, "-m", "apexlens", "--", *args, "--out", str(tmp_path / "many"))
    lines = done.stdout.splitlines()  # the table and the files, printed by rank 0 alone
    assert sum(ln.startswith("wrote ") for ln in lines) == 1
    assert sum(ln.split()[:2] == ["sender", "layer"] for ln in lines if ln.strip()) == 1
    one = json.loads((tmp_path / "one" / "path_patch.json").read_text())
    many = json.loads((tmp_path / "many" / "path_patch.json").read_text())
    assert many["provenance"]["options"]["out"] == str(tmp_path / "many")  # rank 0's
    one.pop("provenance"), many.pop("provenance")  # the time and --out differ
    assert one == many
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "path_patch.csv", "path_patch.html", "path_patch.json"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "many").iterdir()}
    again = torchrun(2, "-m", "apexlens", "--", *args, "--out", str(tmp_path / "many"), ok=False)
    assert again.returncode != 0
    assert again.stderr.count("already holds path_patch.csv") == 1, again.stderr[-3000:]
    assert "wrote " not in again.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "many").iterdir()} == before


def test_puts_travel_joined_in_order():
    """A rank's puts go into the exchange as few tensors (pickling is per tensor): runs of one
    row shape and dtype joined, other shapes kept apart, every row where it was put."""
    import torch

    from apexlens.runs.shard import _packed

    puts = [(torch.tensor([4]), torch.full((1, 3), 4.0)), (torch.tensor([0, 2]), torch.ones(2, 3)),
            (torch.tensor([1]), torch.zeros(1, 5)), (torch.tensor([3]), torch.full((1, 3), 3.0)),
            (torch.tensor([5]), torch.full((1, 3), 5, dtype=torch.float64))]
    packed = _packed(puts)
    assert [len(i) for i, _ in packed] == [3, 1, 1, 1]
    want, got = torch.zeros(6, 5), torch.zeros(6, 5)
    for (i, v), target in ((p, want) for p in puts):
        target[i, : v.shape[1]] = v.float()
    for i, v in packed:
        got[i, : v.shape[1]] = v.float()
    assert torch.equal(want, got)
    assert packed[0][1].dtype == torch.float32 and packed[-1][1].dtype == torch.float64
