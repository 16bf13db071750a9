"""Circuit-discovery speed, every ratio measured side by side in this one run.

Random-init GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257),
batch 8 x 16 tokens, float32, CPU.

* EAP-IG (ig_steps=5) over all 32,491 edges, in units of one forward+backward pass
  (``metric(model(tokens)).sum().backward()``);
* a full MIB faithfulness curve (10 circuits, set-up runs included) in plain forwards;
* exact edge scores: forward-equivalents per edge, and the naive side (one circuit forward
  per edge, ``evaluate_circuit(full graph minus the edge)``) on a sample of edges;
* ``discover`` on the shipped ``induction-2l`` (seconds) and on the GPT-2-shaped model
  from a start graph of its top EAP-IG edges.

    python benchmarks/bench_discovery.py            # exact on a sample of 200 edges
    python benchmarks/bench_discovery.py --full     # exact on all 32,491 edges (~15 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_patching import data, gpt2_shaped, timed  # noqa: E402

BUDGET = 2 * 2**30


def main(argv: list[str] | None = None) -> dict[str, float]:
    import apexlens
    from apexlens.api.functions import attribute_edges, discover, faithfulness

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="exact scores on every edge")
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument(
        "--start", type=int, default=40, help="discover on GPT-2 from this many top edges"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = gpt2_shaped()
    clean, corrupted, metric = data(model)
    out: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(3):
            model(clean)
        t_fwd = timed(lambda: model(clean), repeat=5)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        metric(model(clean)).sum().backward()

    fwd_bwd()
    t_fb = timed(fwd_bwd, repeat=3)
    model.zero_grad(set_to_none=True)
    out["forward_s"], out["forward_backward_s"] = t_fwd, t_fb
    print(f"one forward {t_fwd * 1e3:.0f} ms, one forward+backward {t_fb * 1e3:.0f} ms", flush=True)

    kw = dict(metric=metric, memory_budget=BUDGET)
    t0 = time.perf_counter()
    ig = attribute_edges(model, clean, corrupted, method="eap-ig", ig_steps=5, **kw)
    t_ig = time.perf_counter() - t0
    out["eap_ig_over_fwd_bwd"] = t_ig / t_fb
    print(
        f"EAP-IG, ig_steps=5, {len(ig)} edges: {t_ig:.2f} s = {t_ig / t_fb:.2f}x one forward+backward (target <= 8)",
        flush=True,
    )

    t0 = time.perf_counter()
    curve = faithfulness(model, clean, corrupted, ig, **kw)
    t_curve = time.perf_counter() - t0
    out["mib_curve_over_fwd"] = t_curve / t_fwd
    print(
        f"MIB curve (10 circuits, clean+corrupted runs included): {t_curve:.2f} s = "
        f"{t_curve / t_fwd:.1f} plain forwards (target <= 12); CPR {curve.cpr:.3f} CMD {curve.cmd:.3f}"
    )

    g = torch.Generator().manual_seed(0)
    edges = ig.edges
    if not args.full:
        pick = torch.randperm(len(edges), generator=g)[: args.sample].tolist()
        edges = [edges[i] for i in sorted(pick)]
    t0 = time.perf_counter()
    attribute_edges(model, clean, corrupted, method="exact", edges=edges, **kw)
    t_exact = time.perf_counter() - t0
    per_edge = t_exact / len(edges) / t_fwd
    out["exact_fwd_per_edge"] = per_edge
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    full = apexlens.full_graph(model)
    naive_pick = torch.randperm(len(full), generator=g)[:3].tolist()

    def naive() -> None:
        for i in naive_pick:
            exp.evaluate_circuit(full[:i] + full[i + 1 :])

    t_naive = timed(naive) / len(naive_pick)
    out["exact_speedup_vs_naive"] = t_naive / (t_exact / len(edges))
    print(
        f"exact on {len(edges)} edges: {t_exact:.1f} s = {per_edge:.3f} forwards per edge (floor ~0.36, "
        f"target <= 0.5); naive (one circuit forward per edge, {len(naive_pick)} sampled): "
        f"{t_naive / t_fwd:.2f} forwards per edge -> {out['exact_speedup_vs_naive']:.1f}x faster"
    )

    ind = apexlens.load_model("induction-2l")
    batch = apexlens.get_task("induction").batch(16, seed=0)
    t0 = time.perf_counter()
    scores = attribute_edges(
        ind, batch.clean_tokens, batch.corrupted_tokens, metric=batch.logit_diff(), method="exact"
    )
    found = discover(
        ind,
        batch.clean_tokens,
        batch.corrupted_tokens,
        metric=batch.logit_diff(),
        threshold=0.05,
        order=scores,
    )
    t_ind = time.perf_counter() - t0
    out["discover_induction_s"] = t_ind
    print(f"discover on induction-2l (exact order + pruning): {t_ind:.1f} s, {found}", flush=True)

    start = ig.top(args.start)
    t0 = time.perf_counter()
    found_g = discover(model, clean, corrupted, threshold=0.01, order=ig, edges=start, **kw)
    t_g = time.perf_counter() - t0
    out["discover_gpt2_300_s"] = t_g
    print(
        f"discover on the GPT-2-shaped model from its top {len(start)} EAP-IG edges: {t_g:.1f} s "
        f"({found_g.n_forward_rows} circuit rows, {t_g / max(found_g.n_forward_rows, 1):.3f} s each); "
        f"{len(found_g.edges)} edges kept"
    )
    return out


if __name__ == "__main__":
    main()
