"""How the cost of exact path patching and circuit evaluation scales with the work.

For each model shape and (batch, sequence) cell, measured side by side in one run (each ratio
over a plain forward timed right before and right after it):

* ``fwd``: one plain forward pass (logits), the unit (the median of those timings);
* ``heads->logits / 2 fwd``: ``path_patch(all heads -> logits)`` from scratch (its clean and
  corrupted runs included) over two plain forwards;
* ``flops``: the same ratio in FLOPs for any exact method: the two runs without the
  unembedding plus, per sender, every later MLP at the read position (attention frozen).
  apexlens does exactly these FLOPs (``torch.utils.flop_counter`` counts 4.41x two forwards
  for GPT-2 medium at 8 x 16, the formula's number), but it is a floor on *work*, not on
  *time*: the senders' MLP passes are large batched products (every sender of every example
  at once), which run at a much higher FLOP rate than a plain forward's small products
  (``fwd GF/s``, with TransformerLens' unfused ops), so the measured time ratio can be below it;
* ``frozen``: heads->logits with ``mlps="frozen"`` (direct paths only: no sender passes
  through later MLPs, so no per-sender work beyond a projection), over two forwards;
* ``circuit warm / fwd``: one circuit hypothesis (a seeded random half of all edges) on an
  ``Experiment``'s cached runs, after a first one (which builds the edge index and, on the
  CPU, the working memory later hypotheses reuse), over one forward; ``cold``: one
  top-level ``evaluate_circuit`` call from scratch (clean + corrupted runs, edge index and
  fresh memory included);
* ``mem``: peak extra memory of the first circuit on cached runs (its working memory
  included) over a plain ``run_with_cache`` of the same batch.

    python benchmarks/bench_scaling.py            # the default grid (~20 minutes on 2 cores)
    python benchmarks/bench_scaling.py --full     # also batch 128 x 256 (an hour on a CPU)
    python benchmarks/bench_scaling.py --device cuda --full   # on a GPU (memory: CUDA peak)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, d_head=64, d_mlp=4096),
}
DEFAULT_GRID = [
    ("gpt2-small", 8, 16),
    ("gpt2-small", 128, 16),
    ("gpt2-small", 8, 256),
    ("gpt2-small", 32, 128),
    ("gpt2-medium", 8, 16),
    ("gpt2-medium", 32, 64),
]
FULL_EXTRA = [("gpt2-small", 128, 256)]
VOCAB = 50257


DEVICE = "cpu"


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape: str) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **SHAPES[shape],
        n_ctx=1024,
        d_vocab=VOCAB,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model.to(DEVICE) if DEVICE != "cpu" else model


def data(batch: int, n_pos: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    from apexlens import LogitDiff

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, VOCAB, (batch, n_pos), generator=g).to(DEVICE)
    corrupted = torch.randint(0, VOCAB, (batch, n_pos), generator=g).to(DEVICE)
    answers = torch.randint(0, VOCAB, (2, batch), generator=g).to(DEVICE)
    return clean, corrupted, LogitDiff(answers[0], answers[1])


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    out = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def random_half(model: Any) -> list[Any]:
    """A seeded random half of all edges: the worst case for a circuit (each receiver head
    excludes its own set of senders, so no two share an input)."""
    import apexlens

    g = apexlens.full_graph(model)
    pick = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[: len(g) // 2]
    return [g[i] for i in sorted(pick.tolist())]


def flop_floor(shape: str, n_pos: int) -> float:
    """heads->logits over two forwards, in FLOPs, for any exact method (see the docstring)."""
    s = SHAPES[shape]
    d, m, n_layers, n_heads = s["d_model"], s["d_mlp"], s["n_layers"], s["n_heads"]
    layer = 8 * d * d + 4 * d * m  # attention projections + MLP, per token
    fwd = n_pos * (n_layers * layer + 2 * d * VOCAB)
    runs = 2 * n_pos * n_layers * layer
    mlp_after = sum(n_layers - la for la in range(n_layers)) * n_heads * 4 * d * m
    return (runs + mlp_after) / (2 * fwd)


def forward_flops(shape: str, batch: int, n_pos: int) -> float:
    """The matrix-product FLOPs of one plain forward (attention scores included)."""
    s = SHAPES[shape]
    d, m, n_layers = s["d_model"], s["d_mlp"], s["n_layers"]
    per_tok = n_layers * (8 * d * d + 4 * d * m + 4 * n_pos * d) + 2 * d * VOCAB
    return batch * n_pos * per_tok


def cell(shape: str, batch: int, n_pos: int) -> dict[str, float]:
    import apexlens

    model = build(shape)
    clean, corrupted, metric = data(batch, n_pos)
    repeat = 3 if DEVICE.startswith("cuda") else 1
    fwds: list[float] = []

    def forward() -> float:
        with torch.no_grad():
            t = timed(lambda: model(clean), repeat)
        fwds.append(t)
        return t

    def vs_forward(fn: Callable[[], Any]) -> float:
        """``fn``'s time over a plain forward's, the forward timed right before and right
        after it (the machine's speed drifts by 15% over minutes; side by side, it cancels)."""
        before = forward()
        t = timed(fn, repeat)
        return t / ((before + forward()) / 2)

    def heads_to_logits(mlps: str) -> Any:
        return apexlens.path_patch(
            model, clean, corrupted, senders="all-heads", metric=metric, mlps=mlps
        )

    forward()  # warm-up
    if repeat > 1:  # warm-up (CUDA kernels, allocator)
        heads_to_logits("live")
    hl = vs_forward(lambda: heads_to_logits("live")) / 2
    frozen = vs_forward(lambda: heads_to_logits("frozen")) / 2
    half = random_half(model)
    # cold: one top-level call, everything from scratch (runs, edge index, fresh memory)
    cold = vs_forward(
        lambda: apexlens.evaluate_circuit(model, clean, corrupted, half, metric=metric)
    )
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    exp.evaluate_circuit(half)  # the first hypothesis builds the edge index and working memory
    warm = vs_forward(lambda: exp.evaluate_circuit(half))  # every later one costs this
    t_fwd = statistics.median(fwds[1:])
    mem = float("nan")
    if DEVICE.startswith("cuda"):  # peak CUDA memory: circuit over run_with_cache, both warm
        mem = cuda_memory(model, clean, lambda: exp.evaluate_circuit(half))
    return {
        "frozen_vs_2fwd": frozen,
        "mem_vs_cache": mem,
        "fwd_s": t_fwd,
        "hl_vs_2fwd": hl,
        "floor": flop_floor(shape, n_pos),
        "fwd_gflops": forward_flops(shape, batch, n_pos) / t_fwd / 1e9,
        "circuit_warm_vs_fwd": warm,
        "circuit_cold_vs_fwd": cold,
    }


def cuda_memory(model: Any, clean: torch.Tensor, circuit: Callable[[], Any]) -> float:
    def peak(fn: Callable[[], Any]) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        cache = peak(lambda: model.run_with_cache(clean))
    return peak(circuit) / max(cache, 1)


MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
from bench_scaling import build, data, random_half
import apexlens
def mem(key):
    for line in open("/proc/self/status"):
        if line.startswith(key): return int(line.split()[1]) * 1024
shape, batch, n_pos, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = build(shape); clean, corrupted, metric = data(batch, n_pos)
exp = apexlens.Experiment(model, clean, corrupted, metric=metric) if what == "circuit" else None
half = random_half(model)
with torch.no_grad(): model(clean[:1])
base = mem("VmRSS"); open("/proc/self/clear_refs", "w").write("5")
if what == "cache":
    with torch.no_grad(): _, cache = model.run_with_cache(clean)
else:
    exp.evaluate_circuit(half)
print(json.dumps(mem("VmHWM") - base))
"""


def memory(shape: str, batch: int, n_pos: int) -> float:
    res = {}
    for what in ("cache", "circuit"):
        p = subprocess.run(
            [sys.executable, "-c", MEM_SCRIPT, shape, str(batch), str(n_pos), what],
            capture_output=True,
            text=True,
            check=True,
        )
        res[what] = json.loads(p.stdout.strip().splitlines()[-1])
    return res["circuit"] / max(res["cache"], 1)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="also batch 128 x 256")
    parser.add_argument("--quick", action="store_true", help="only GPT-2 small at 8 x 16")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    torch.manual_seed(0)
    grid = DEFAULT_GRID[:1] if args.quick else DEFAULT_GRID + (FULL_EXTRA if args.full else [])
    where = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "CPU"
    print(f"exact path patching / circuits vs plain forwards ({where}, float32)")
    print(
        f"{'shape':12s} {'batch':>5s} {'seq':>4s} {'fwd':>8s} {'fwd GF/s':>8s} {'heads->logits':>14s} {'flops':>6s}"
        f" {'frozen':>7s} {'circuit warm':>13s} {'cold':>6s} {'mem':>6s}"
    )
    rows = []
    for shape, batch, n_pos in grid:
        r = cell(shape, batch, n_pos)
        if not (args.no_memory or DEVICE.startswith("cuda")):
            r["mem_vs_cache"] = memory(shape, batch, n_pos)
        r.update(shape=shape, batch=batch, n_pos=n_pos)
        rows.append(r)
        print(
            f"{shape:12s} {batch:5d} {n_pos:4d} {r['fwd_s'] * 1e3:6.0f}ms {r['fwd_gflops']:8.0f}"
            f" {r['hl_vs_2fwd']:10.2f}x 2f"
            f" {r['floor']:5.2f}x {r['frozen_vs_2fwd']:6.2f}x {r['circuit_warm_vs_fwd']:10.2f}x 1f {r['circuit_cold_vs_fwd']:5.2f}x"
            f" {r['mem_vs_cache']:5.2f}x",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
