"""Path-patching speed and memory: apexlens vs the naive per-sender loop, side by side.

Random-init GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257),
batch 8 x 16 tokens, float32, CPU. Every ratio is measured in this one run.
``--arch llama``: the same width, Llama-shaped (grouped-query attention with 4 KV heads,
rotary, RMSNorm, gated SiLU MLP with d_mlp 2048).

    python benchmarks/bench_patching.py                 # everything (a few minutes)
    python benchmarks/bench_patching.py --quick         # naive loops on every 4th sender, scaled
    python benchmarks/bench_patching.py --quick --arch llama
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

BATCH, N_POS = 8, 16
RECEIVERS_HH = ["9.9.q", "9.6.q", "10.0.q"]


def gpt2_shaped(seed: int = 0) -> Any:
    from apexlens.toys.models import random_gpt2_small

    return random_gpt2_small(seed=seed)


def llama_shaped(seed: int = 0) -> Any:
    """GPT-2-small width, Llama architecture: GQA (12 query / 4 KV heads), rotary, RMS, gated MLP."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        n_ctx=1024,
        d_head=64,
        n_heads=12,
        n_key_value_heads=4,
        d_mlp=2048,
        d_vocab=50257,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=64,
        seed=seed,
        dtype=torch.float32,
        device="cpu",
    )
    return HookedTransformer(cfg).eval()


ARCHS = {"gpt2": gpt2_shaped, "llama": llama_shaped}


def data(model: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    from apexlens.scoring import LogitDiff

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (BATCH, N_POS), generator=g)
    corrupted = torch.randint(0, 50257, (BATCH, N_POS), generator=g)
    answer = torch.randint(0, 50257, (BATCH,), generator=g)
    wrong = torch.randint(0, 50257, (BATCH,), generator=g)
    return clean, corrupted, LogitDiff(answer, wrong, positions=-1)


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(quick: bool, backend: str = "hooked", arch: str = "gpt2") -> dict[str, float]:
    from transformer_lens import patching as tl_patching

    import apexlens
    from apexlens.reference import naive_act_patch, naive_path_patch

    model = ARCHS[arch]()
    if backend == "bridge":
        from apexlens.model.convert import to_bridge

        model = to_bridge(model)
    clean, corrupted, metric = data(model)
    out: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(3):  # warm-up: the first passes of a fresh process are several x slower
            model(clean)
        apexlens.path_patch(
            model, clean, corrupted, senders="0.0", receivers="logits", metric=metric
        )
        t_fwd = timed(lambda: model(clean), repeat=5)
    out["forward_s"] = t_fwd
    step = 4 if quick else 1
    heads = [f"{la}.{h}" for la in range(12) for h in range(12)]
    sample = heads[::step]

    # heads -> logits
    t_fast = timed(
        lambda: apexlens.path_patch(
            model, clean, corrupted, senders="all-heads", receivers="logits", metric=metric
        )
    )
    t_naive = (
        timed(
            lambda: naive_path_patch(
                model, clean, corrupted, senders=sample, receivers="logits", metric=metric
            )
        )
        * step
    )
    out.update(
        hl_fast_s=t_fast,
        hl_naive_s=t_naive,
        hl_speedup=t_naive / t_fast,
        hl_vs_two_forwards=t_fast / (2 * t_fwd),
    )

    # the same with a plain function metric, as code ported from ARENA / TransformerLens has
    answer, wrong = metric.answer, metric.wrong

    def plain_metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[..., -1, :]
        lead = last.shape[:-2]
        a = last.gather(-1, answer.expand(*lead, -1)[..., None])[..., 0]
        w = last.gather(-1, wrong.expand(*lead, -1)[..., None])[..., 0]
        return a - w

    t_plain = timed(
        lambda: apexlens.path_patch(
            model, clean, corrupted, senders="all-heads", receivers="logits", metric=plain_metric
        )
    )
    out.update(hl_plain_s=t_plain, hl_plain_vs_metric=t_plain / t_fast)

    # heads -> heads (name-mover-style queries in layers 9-10)
    for mlps in ("live", "frozen"):
        t_fast = timed(
            lambda: apexlens.path_patch(
                model,
                clean,
                corrupted,
                senders="all-heads",
                receivers=RECEIVERS_HH,
                metric=metric,
                mlps=mlps,  # noqa: B023 - called at once
            )
        )
        t_naive = (
            timed(
                lambda: naive_path_patch(
                    model,
                    clean,
                    corrupted,
                    senders=sample,
                    receivers=RECEIVERS_HH,
                    metric=metric,
                    mlps=mlps,  # noqa: B023 - called at once
                )
            )
            * step
        )
        out.update(
            {
                f"hh_{mlps}_fast_s": t_fast,
                f"hh_{mlps}_naive_s": t_naive,
                f"hh_{mlps}_speedup": t_naive / t_fast,
            }
        )

    # circuit evaluation over the full edge graph
    edges = apexlens.full_graph(model)
    half = edges[::2]
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    t_warm = timed(lambda: exp.evaluate_circuit(half), repeat=3)
    t_cold = timed(lambda: apexlens.evaluate_circuit(model, clean, corrupted, half, metric=metric))
    out.update(
        n_edges=float(len(edges)),
        circuit_warm_s=t_warm,
        circuit_warm_vs_forward=t_warm / t_fwd,
        circuit_cold_s=t_cold,
        circuit_cold_vs_forward=t_cold / t_fwd,
    )

    # head activation patching vs TransformerLens
    _, clean_cache = model.run_with_cache(clean)
    mean_metric = lambda lg: metric(lg).mean()
    t_fast = timed(
        lambda: apexlens.act_patch(model, clean, corrupted, nodes="all-heads", metric=metric)
    )
    if quick:
        nodes = [(f"blocks.{la}.attn.hook_z", h) for la in range(12) for h in range(12)][::step]
        t_tl = (
            timed(lambda: naive_act_patch(model, clean, corrupted, nodes=nodes, metric=metric))
            * step
        )
    else:
        t_tl = timed(
            lambda: tl_patching.get_act_patch_attn_head_out_all_pos(
                model, corrupted, clean_cache, mean_metric
            )
        )
    out.update(act_fast_s=t_fast, act_tl_s=t_tl, act_speedup=t_tl / t_fast)
    return out


MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
from bench_patching import ARCHS, data, RECEIVERS_HH
import apexlens
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) * 1024
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"): return int(line.split()[1]) * 1024
model = ARCHS[sys.argv[2]](); clean, corrupted, metric = data(model)
with torch.no_grad(): model(clean)
base = rss(); open("/proc/self/clear_refs", "w").write("5")
if sys.argv[1] == "cache":
    with torch.no_grad(): _, cache = model.run_with_cache(clean)
else:
    apexlens.path_patch(model, clean, corrupted, senders="all-heads", receivers=RECEIVERS_HH, metric=metric)
print(json.dumps(hwm() - base))
"""


def memory(arch: str = "gpt2") -> dict[str, float]:
    res = {}
    for what in ("cache", "hh"):
        p = subprocess.run(
            [sys.executable, "-c", MEM_SCRIPT, what, arch],
            capture_output=True,
            text=True,
            check=True,
        )
        res[what] = json.loads(p.stdout.strip().splitlines()[-1])
    return {
        "mem_run_with_cache_MB": res["cache"] / 2**20,
        "mem_heads_to_heads_MB": res["hh"] / 2**20,
        "mem_ratio": res["hh"] / max(res["cache"], 1),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="naive loops on every 4th sender, scaled up"
    )
    parser.add_argument("--backend", default="hooked", choices=["hooked", "bridge"])
    parser.add_argument("--arch", default="gpt2", choices=list(ARCHS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    r = speed(args.quick, args.backend, args.arch)
    r.update(memory(args.arch))
    shape = "GPT-2-small" if args.arch == "gpt2" else "Llama (GQA 12/4, rotary, RMS, gated MLP) GPT-2-small-width"
    print(
        f"\npath patching on a random {shape}-shaped model ({args.backend}), batch {BATCH} x {N_POS}"
    )
    print(f"  one plain forward                         {r['forward_s'] * 1e3:8.1f} ms")
    print(
        f"  heads -> logits (144 senders, mlps=live)  apexlens {r['hl_fast_s']:7.2f} s | naive {r['hl_naive_s']:7.2f} s | {r['hl_speedup']:6.1f}x faster | {r['hl_vs_two_forwards']:.2f}x two forwards"
    )
    print(
        f"  heads -> logits with a plain function metric: {r['hl_plain_s']:.2f} s, {r['hl_plain_vs_metric']:.2f}x the built-in LogitDiff"
    )
    for mlps in ("live", "frozen"):
        print(
            f"  heads -> {'/'.join(RECEIVERS_HH)} ({mlps:6s})  apexlens {r[f'hh_{mlps}_fast_s']:7.2f} s | naive {r[f'hh_{mlps}_naive_s']:7.2f} s | {r[f'hh_{mlps}_speedup']:6.1f}x faster"
        )
    print(
        f"  circuit ({int(r['n_edges'])} edges in the graph, half kept): warm {r['circuit_warm_vs_forward']:.2f}x one forward | cold (incl. clean+corrupted runs) {r['circuit_cold_vs_forward']:.2f}x"
    )
    print(
        f"  head activation patching vs TL get_act_patch_attn_head_out_all_pos: {r['act_speedup']:.1f}x faster ({r['act_fast_s']:.2f} s vs {r['act_tl_s']:.2f} s)"
    )
    print(
        f"  peak memory heads -> heads {r['mem_heads_to_heads_MB']:.0f} MB vs run_with_cache {r['mem_run_with_cache_MB']:.0f} MB: {r['mem_ratio']:.2f}x"
    )
    return r


if __name__ == "__main__":
    main()
