"""Sharding across processes: 2 ranks x 1 thread against 1 rank x 1 thread, same questions.

Every question is asked on an ``apexlens.Experiment`` whose clean and corrupted runs are
already cached (every rank caches them itself: that part is not split, and is timed apart as
``setup``), then timed as the median of a few calls:

* ``heads->logits``: ``exp.path_patch("all-heads")`` on the GPT-2-small shape
  (``random_gpt2_small``, float32), batch 32 x 64: 144 sender rows, split by rows;
* ``random-half circuit``: ``exp.evaluate_circuit`` of a seeded random half of every edge, same
  model and batch (one hypothesis: its 32 examples are split), after a first one;
* ``exact edge scores``: ``exp.attribute_edges(method="exact")`` on ``induction-2l`` (every
  edge a row), its induction task, batch 32.

Throughput ratio = time on 1 rank / time on 2 ranks (2.0 = perfect). Printed beside them,
the machine's ceiling at that moment: two independent processes of the same float32 matmuls
against one (on a machine whose cores other jobs share, below 2.0; sharding cannot beat it). Each launch is a
``torchrun --standalone`` of this file with ``--worker``; the 1-rank and 2-rank launches
alternate (1, 2, pair, 1, 2, pair) and each ratio uses the median of its launches. The
*pair* is two independent one-rank processes started together, each asking every question
whole: their time over one process alone is what this machine gives a second process on
that very question (on a 2-vCPU virtual machine whose vCPUs may share a physical core, far
less than 2), printed as each question's ceiling beside the throughput. ``bytes/call``: what
one rank receives in each exchange of the call (from ``ShardPlan.traffic``: the pickled
results of the other ranks, plus the per-question status exchange).

    python benchmarks/bench_distributed.py            # ~25 minutes on 2 quiet cores
    python benchmarks/bench_distributed.py --quick    # batch 8 x 64, one launch each
    python benchmarks/bench_distributed.py --rounds 1 --repeats 2 --cost-batch 8  # ~8 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()


def _time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(batch: int, repeats: int) -> None:
    """One rank: the questions, timed; rank 0 prints a JSON line."""
    import torch.distributed as dist

    import apexlens

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict[str, Any] = {"world": dist.get_world_size()}
    g = torch.Generator().manual_seed(0)
    model = apexlens.random_gpt2_small(seed=0)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, 64), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, 64), generator=g)
    metric = apexlens.LogitDiff(clean[:, -1], corrupted[:, -1])
    edges = apexlens.full_graph(model)
    keep = torch.rand(len(edges), generator=g) < 0.5
    half = [e for e, k in zip(edges, keep.tolist(), strict=True) if k]
    ind = apexlens.load_model("induction-2l")
    task = apexlens.get_task("induction").batch(32, seed=0)
    with apexlens.sharded(timeout=3600) as shard:
        t = time.perf_counter()
        exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
        out["setup"] = time.perf_counter() - t
        exp.evaluate_circuit(half)  # the first circuit builds the index and working memory
        ind_exp = apexlens.Experiment(ind, task.clean_tokens, task.corrupted_tokens,
                                      metric=task.logit_diff())
        ind_exp.attribute_edges(method="exact")
        questions = {
            "heads->logits": lambda: exp.path_patch("all-heads"),
            "random-half circuit": lambda: exp.evaluate_circuit(half),
            "exact edge scores": lambda: ind_exp.attribute_edges(method="exact"),
        }
        for name, ask in questions.items():
            shard.traffic.clear()
            ask()
            out[f"{name} bytes"] = [list(x) for x in shard.traffic]
            out[name] = _time(ask, repeats)
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def launch(n: int, batch: int, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", str(HERE), "--worker", "--batch", str(batch),
           "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def launch_pair(batch: int, repeats: int) -> dict[str, Any]:
    """Two independent one-rank processes at once, each asking every question whole: what
    this machine gives a second process on *these* questions (each its own world of one)."""
    cmd = [sys.executable, str(HERE), "--worker", "--batch", str(batch), "--repeats", str(repeats)]
    procs = []
    for i in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + 17 * i + os.getpid() % 97))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    results = []
    for proc in procs:
        out, err = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(out[-2000:] + err[-4000:])
        results.append(json.loads(lines[-1][len("RESULT "):]))
    # each question's time under contention: the slower of the two processes
    return {k: max(r[k] for r in results) if isinstance(results[0][k], float) else results[0][k]
            for k in results[0]}


def _matmuls() -> float:
    """Seconds of 40 float32 products [1152, 768] x [768, 3072] on one thread."""
    torch.set_num_threads(1)
    a, b = torch.randn(1152, 768), torch.randn(768, 3072)
    t = time.perf_counter()
    for _ in range(40):
        a @ b
    return time.perf_counter() - t


def ceiling() -> float:
    """What this machine gives a second process right now: the throughput of two independent
    processes of the same matmuls over one (2.0: two free cores). Sharding cannot beat it."""
    code = f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); import bench_distributed as b; print(b._matmuls())"
    alone = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    both = max(float(p.communicate()[0]) for p in pair)
    return 2 * alone / both


# ---------------------------------------------------------------------------- extrapolation
LLAMA3_8B = dict(n_layers=32, d_model=4096, n_heads=32, d_head=128, n_key_value_heads=8,
                 d_mlp=14336, d_vocab=128256, gated_mlp=True, normalization_type="RMS",
                 positional_embedding_type="rotary", act_fn="silu")
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                  act_fn="gelu_new", normalization_type="LN")
GPU_FORWARD_S = {"GPT-2 small": 0.51, "Llama-3-8B": 2.6}
"""Assumed seconds of one plain forward of 1,000 prompts x 64 tokens on one H100 (not
measured here): GPT-2 small from the README's H100 table (128 x 256 tokens in 257 ms, float32,
TransformerLens' unfused ops: 7.8 us a token); Llama-3-8B from its FLOPs (2 x 8.0e9 per token)
at 40% of the H100's dense bf16 peak (989 TFLOP/s)."""


def graph_work(shape: dict[str, Any]) -> tuple[int, float]:
    """Edges of the full graph and the forwards their exact scores run (each edge: the layers
    from its receiver on, over n_layers: the work of ``exact_scores``)."""
    from transformer_lens import HookedTransformerConfig

    from apexlens.model.dims import dims_of
    from apexlens.vocab.edges import EdgeIndex

    cfg = HookedTransformerConfig(n_ctx=64, device="cpu", **shape)
    index = EdgeIndex(dims_of(cfg))
    n_layers = cfg.n_layers
    forwards = 0.0
    for _, r in index.edge_list():
        start = n_layers if r.kind == "logits" else r.layer + (1 if r.kind == "mlp" else 0)
        forwards += (n_layers - start) / n_layers
    return len(index.edge_list()), forwards


def per_edge_cost(batch: int, n_edges: int = 64) -> float:
    """Measured on this CPU, one thread: seconds of ``exact`` scores for a seeded sample of
    GPT-2-small edges, over the forwards they run x the seconds of one plain forward (1.0: an
    edge costs exactly the layers it runs)."""
    import apexlens
    from apexlens.model.dims import dims_of
    from apexlens.vocab.edges import EdgeIndex

    torch.set_num_threads(1)
    model = apexlens.random_gpt2_small(seed=0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, 64), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, 64), generator=g)
    exp = apexlens.Experiment(model, clean, corrupted,
                              metric=apexlens.LogitDiff(clean[:, -1], corrupted[:, -1]))
    edges = EdgeIndex(dims_of(model.cfg)).edge_list()
    pick = torch.randperm(len(edges), generator=g)[:n_edges].tolist()
    sample = [(edges[i][0].name, edges[i][1].name) for i in pick]
    n = model.cfg.n_layers
    runs = sum((n - (n if r.kind == "logits" else r.layer + (r.kind == "mlp"))) / n
               for _, r in (edges[i] for i in pick))
    with torch.no_grad():
        fwd = _time(lambda: model(clean), 3)
    exact = _time(lambda: exp.attribute_edges(method="exact", edges=sample), 2)
    return exact / (runs * fwd)


def extrapolate(cost: float) -> None:
    print(f"exact scores of every edge, 1,000 prompts x 64 tokens, H100s (per-edge cost "
          f"{cost:.2f}x the layers it runs, measured above on the CPU; forward times assumed)")
    for name, shape in (("GPT-2 small", GPT2_SMALL), ("Llama-3-8B", LLAMA3_8B)):
        n_edges, forwards = graph_work(shape)
        gpu_s = forwards * cost * GPU_FORWARD_S[name]
        line = f"  {name:12s} {n_edges:>10,} edges, {forwards:>10,.0f} forwards of work:"
        for gpus in (8, 64):
            line += f"  {gpus} GPUs {gpu_s / gpus / 3600:8.2f} h"
        print(line)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="launches of each rank count")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cost-batch", type=int, default=None,
                        help="batch of the per-edge cost measurement (default: --batch)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.batch, args.repeats)
        return {}
    if args.quick:
        args.batch, args.rounds, args.repeats = 8, 1, 1
    cost = per_edge_cost(args.cost_batch or args.batch)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: [], 0: []}  # 0: the independent pair
    for _ in range(args.rounds):
        for n in (1, 2, 0):
            runs[n].append(launch_pair(args.batch, args.repeats) if n == 0
                           else launch(n, args.batch, args.repeats))
    print(f"sharding, 2 ranks x 1 thread vs 1 rank x 1 thread (GPT-2-small shape at batch "
          f"{args.batch} x 64; induction-2l at 32), load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; the machine's ceiling now (two independent matmul "
          f"processes over one): x{ceiling():.2f}")
    print("  ceiling = the same question's ceiling: 2 x (1 rank alone) / (each of two independent "
          "1-rank processes asking it whole at once); efficiency = throughput / ceiling")
    ratios: dict[str, float] = {}
    for name in ("setup", "heads->logits", "random-half circuit", "exact edge scores"):
        one = statistics.median(r[name] for r in runs[1])
        two = statistics.median(r[name] for r in runs[2])
        pair = statistics.median(r[name] for r in runs[0])
        ratios[name] = one / two
        ratios[f"{name} ceiling"] = 2 * one / pair
        line = (f"  {name:22s} 1 rank {one:8.3f} s   2 ranks {two:8.3f} s   throughput "
                f"x{one / two:.2f}   ceiling x{2 * one / pair:.2f}   efficiency "
                f"{(one / two) / (2 * one / pair):.0%}")
        if f"{name} bytes" in runs[2][0]:
            per = runs[2][0][f"{name} bytes"]
            line += "   bytes/call: " + ", ".join(f"{d} {b:,}" for d, b in per)
        print(line)
    extrapolate(cost)
    return ratios


if __name__ == "__main__":
    main()
