"""How the cost of exact path patching and circuit evaluation scales with the work.

For each model shape and (batch, sequence) cell, measured side by side in one run:

* ``fwd``: one plain forward pass (logits), the unit;
* ``heads->logits / 2 fwd``: ``path_patch(all heads -> logits)`` from scratch (its clean and
  corrupted runs included) over two plain forwards;
* ``flops``: the same ratio in FLOPs for any exact method: the two runs without the
  unembedding plus, per sender, every later MLP at the read position (attention frozen).
  apexlens does exactly these FLOPs (``torch.utils.flop_counter`` counts 4.41x two forwards
  for GPT-2 medium at 8 x 16, the formula's number), but it is a floor on *work*, not on
  *time*: the senders' MLP passes are large batched products (every sender of every example
  at once), which run at a much higher FLOP rate than a plain forward's small products
  (``fwd GF/s``, with TransformerLens' unfused ops), so the measured time ratio can be below it;
* ``circuit warm / fwd``: one circuit hypothesis (half of all edges) on cached runs over one
  forward; ``cold``: the same from scratch (clean + corrupted runs included: >= 3 forwards);
* ``mem``: peak extra memory of the warm circuit evaluation over a plain ``run_with_cache``.

    python benchmarks/bench_scaling.py            # the default grid (~10 minutes on 2 cores)
    python benchmarks/bench_scaling.py --full     # also batch 128 x 256 (an hour on a CPU)
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


def build(shape: str) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **SHAPES[shape], n_ctx=1024, d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN", seed=0
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def data(batch: int, n_pos: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    from apexlens import LogitDiff

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, VOCAB, (batch, n_pos), generator=g)
    corrupted = torch.randint(0, VOCAB, (batch, n_pos), generator=g)
    answers = torch.randint(0, VOCAB, (2, batch), generator=g)
    return clean, corrupted, LogitDiff(answers[0], answers[1])


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


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
    with torch.no_grad():
        model(clean)
        t_fwd = timed(lambda: model(clean), repeat=2)
    t_hl = timed(
        lambda: apexlens.path_patch(model, clean, corrupted, senders="all-heads", metric=metric)
    )
    half = apexlens.full_graph(model)[::2]
    t0 = time.perf_counter()
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    t_runs = time.perf_counter() - t0
    exp.evaluate_circuit(half[:1])  # builds the edge index once per Experiment
    t_warm = timed(lambda: exp.evaluate_circuit(half))
    return {
        "fwd_s": t_fwd,
        "hl_vs_2fwd": t_hl / (2 * t_fwd),
        "floor": flop_floor(shape, n_pos),
        "fwd_gflops": forward_flops(shape, batch, n_pos) / t_fwd / 1e9,
        "circuit_warm_vs_fwd": t_warm / t_fwd,
        "circuit_cold_vs_fwd": (t_runs + t_warm) / t_fwd,
    }


MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
from bench_scaling import build, data
import apexlens
def mem(key):
    for line in open("/proc/self/status"):
        if line.startswith(key): return int(line.split()[1]) * 1024
shape, batch, n_pos, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = build(shape); clean, corrupted, metric = data(batch, n_pos)
exp = apexlens.Experiment(model, clean, corrupted, metric=metric) if what == "circuit" else None
half = apexlens.full_graph(model)[::2]
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
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    grid = DEFAULT_GRID + (FULL_EXTRA if args.full else [])
    print("exact path patching / circuits vs plain forwards (CPU, float32)")
    print(
        f"{'shape':12s} {'batch':>5s} {'seq':>4s} {'fwd':>8s} {'fwd GF/s':>8s} {'heads->logits':>14s} {'flops':>6s}"
        f" {'circuit warm':>13s} {'cold':>6s} {'mem':>6s}"
    )
    rows = []
    for shape, batch, n_pos in grid:
        r = cell(shape, batch, n_pos)
        r["mem_vs_cache"] = float("nan") if args.no_memory else memory(shape, batch, n_pos)
        r.update(shape=shape, batch=batch, n_pos=n_pos)
        rows.append(r)
        print(
            f"{shape:12s} {batch:5d} {n_pos:4d} {r['fwd_s'] * 1e3:6.0f}ms {r['fwd_gflops']:8.0f}"
            f" {r['hl_vs_2fwd']:10.2f}x 2f"
            f" {r['floor']:5.2f}x {r['circuit_warm_vs_fwd']:10.2f}x 1f {r['circuit_cold_vs_fwd']:5.2f}x"
            f" {r['mem_vs_cache']:5.2f}x",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
