"""Per-call overhead and position-restricted questions: the ratios of issue 27, side by side.

Part 1, the shipped ``induction-2l`` (2 attention-only layers, d_model 64) at 8 x 40 tokens,
one thread: there a plain forward is about a millisecond and what counts is how many torch
operations a call dispatches (counted with a ``TorchDispatchMode``, views included):

* a warm random-half circuit vs one forward (time and dispatched operations), re-evaluated
  (its plan kept) and a new hypothesis every call (planned each time); "one forward" is
  ``model(clean)`` with its unembedding, under ``torch.no_grad()``. The warm circuit is
  timed in rows of 10 calls alternating with rows of 10 forwards (each in its steady
  state, as a re-evaluated hypothesis runs) and, as before, call by call (each call right
  after the other's, its caches displaced);
* exact edge scores of the full graph, in forwards per edge;
* heads -> logits vs two forwards.

Part 2, the random GPT-2-small-shaped model at 8 x 16 (IOI's name-mover receivers):

* heads -> ``9.9.q``, ``9.6.q``, ``10.0.q`` at ``@end`` vs the same receivers at every
  position, and vs the naive per-sender loop (ARENA's algorithm, :mod:`apexlens.reference`)
  on the same ``@end`` receivers (every 4th sender with ``--quick``, scaled);
* exact per-position edge scores with an ``@end`` metric: edges at the last position vs the
  same edges at every position.

    python benchmarks/bench_overhead.py [--quick] [--part 1|2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every dispatched aten operation (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> int:
    with OpCounter() as c:
        fn()
    return c.n


def timed(fn: Callable[[], Any], repeat: int = 5) -> float:
    """The median of ``repeat`` timings (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(
    fn: Callable[[], Any], base: Callable[[], Any], rounds: int = 5, calls: int = 1
) -> float:
    """``fn``'s time over ``base``'s, each round timing both side by side (the machine's speed
    drifts): ``calls`` calls of ``base``, of ``fn``, of ``base`` again; the median of the
    per-round ratios. ``calls=1`` times each call right after the other's (its caches
    displaced by the other's work); more calls time each in a row of its own, as a
    re-evaluated hypothesis or a forward loop runs."""

    def row(f: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        return time.perf_counter() - t0

    fn(), base()
    ratios = []
    for _ in range(rounds):
        b0 = row(base)
        t = row(fn)
        b1 = row(base)
        ratios.append(t / ((b0 + b1) / 2))
    return statistics.median(ratios)


def part1() -> dict[str, float]:
    import apexlens
    from apexlens.toys.tasks import get_task

    model = apexlens.load_model("induction-2l")
    b = get_task("induction").batch(8, seed=0)
    clean, corrupted, metric = b.clean_tokens, b.corrupted_tokens, b.logit_diff()
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    edges = apexlens.full_graph(model)
    g = torch.Generator().manual_seed(0)
    half = [e for e, k in zip(edges, torch.rand(len(edges), generator=g) < 0.5, strict=True) if k]
    exp.evaluate_circuit(half)  # warm

    def fwd() -> Any:
        with torch.no_grad():
            return model(clean)

    out: dict[str, float] = {}
    out["forward_ms"] = timed(fwd, 20) * 1e3
    warm = lambda: exp.evaluate_circuit(half)  # noqa: E731
    out["circuit_vs_forward"] = interleaved(warm, fwd, 15, calls=10)
    out["circuit_vs_forward_alternating"] = interleaved(warm, fwd, 15)
    out["circuit_ops"] = count_ops(lambda: exp.evaluate_circuit(half))
    # a new hypothesis every call (more than the plans kept: each one is planned)
    fresh = [
        [e for e, k in zip(edges, torch.rand(len(edges), generator=g) < 0.5, strict=True) if k]
        for _ in range(64)
    ]
    it = iter(fresh * 4)
    out["fresh_circuit_vs_forward"] = interleaved(lambda: exp.evaluate_circuit(next(it)), fwd, 15)
    out["fresh_circuit_ops"] = count_ops(lambda: exp.evaluate_circuit(next(it)))
    out["forward_ops"] = count_ops(fwd)
    n_edges = len(edges)
    out["n_edges"] = n_edges
    exact = lambda: exp.attribute_edges(method="exact")  # noqa: E731
    out["exact_per_edge"] = interleaved(exact, fwd, 5) / n_edges
    out["exact_ops_per_edge"] = count_ops(exact) / n_edges
    hl = lambda: exp.path_patch("all-heads", "logits")  # noqa: E731
    two = lambda: (fwd(), fwd())  # noqa: E731
    out["heads_logits_vs_two_forwards"] = interleaved(hl, two, 10)
    return out


def part2(quick: bool) -> dict[str, float]:
    sys.path.insert(0, "benchmarks")
    from bench_patching import RECEIVERS_HH, data, gpt2_shaped

    import apexlens
    from apexlens.reference import naive_path_patch

    model = gpt2_shaped()
    clean, corrupted, metric = data(model)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    at_end = [f"{r}@-1" for r in RECEIVERS_HH]
    out: dict[str, float] = {}

    def fwd() -> Any:
        with torch.no_grad():
            return model(clean)

    out["forward_ms"] = timed(fwd, 5) * 1e3
    t_all = timed(lambda: exp.path_patch("all-heads", RECEIVERS_HH), 1)
    t_end = timed(lambda: exp.path_patch("all-heads", at_end), 2)
    step = 4 if quick else 1
    heads = [f"{la}.{h}" for la in range(12) for h in range(12)][::step]
    t_naive = step * timed(
        lambda: naive_path_patch(
            model, clean, corrupted, senders=heads, receivers=at_end, metric=metric
        ),
        1,
    )
    print(f"  (heads -> name movers: every position {t_all:.2f} s, @end {t_end:.2f} s, naive {t_naive:.1f} s)", flush=True)
    out.update(
        hh_all_s=t_all,
        hh_end_s=t_end,
        hh_end_vs_all=t_all / t_end,
        hh_end_vs_naive=t_naive / t_end,
        hh_end_forwards=t_end / (out["forward_ms"] / 1e3),
    )
    # exact per-position edge scores into layers 9-11 with an @end metric
    edges = [e for e in apexlens.full_graph(model) if e[1].layer >= 9 and e[0].kind == "head"]
    edges = edges[:: 8 if quick else 2]
    end_edges = [(s, r.at(-1)) for s, r in edges]
    every = [(s, r.at(p)) for s, r in edges[: max(1, len(edges) // 8)] for p in range(16)]
    t_end_e = timed(lambda: exp.attribute_edges(edges=end_edges, method="exact"), 1) / len(end_edges)
    t_every = timed(lambda: exp.attribute_edges(edges=every, method="exact"), 1) / len(every)
    out.update(
        exact_pos_end_ms=t_end_e * 1e3,
        exact_pos_every_ms=t_every * 1e3,
        exact_pos_gain=t_every / t_end_e,
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="naive loop on every 4th sender")
    parser.add_argument("--part", type=int, choices=[1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    r: dict[str, float] = {}
    if args.part in (None, 1):
        p = part1()
        r.update({f"toy_{k}": v for k, v in p.items()})
        print("\ninduction-2l, batch 8 x 40, one thread")
        print(f"  one plain forward                   {p['forward_ms']:.2f} ms, {p['forward_ops']:.0f} ops")
        print(
            f"  warm random-half circuit            {p['circuit_vs_forward']:.2f}x one forward, "
            f"{p['circuit_ops']:.0f} ops ({p['circuit_ops'] / p['forward_ops']:.2f}x a forward's); "
            f"{p['circuit_vs_forward_alternating']:.2f}x alternating call by call"
        )
        print(
            f"  a new random-half hypothesis        {p['fresh_circuit_vs_forward']:.2f}x one forward, "
            f"{p['fresh_circuit_ops']:.0f} ops ({p['fresh_circuit_ops'] / p['forward_ops']:.2f}x; "
            "planned each call)"
        )
        print(
            f"  exact edge scores ({p['n_edges']:.0f} edges)      {p['exact_per_edge']:.2f} forwards "
            f"per edge, {p['exact_ops_per_edge']:.0f} ops per edge"
        )
        print(f"  heads -> logits                     {p['heads_logits_vs_two_forwards']:.2f}x two forwards")
    if args.part in (None, 2):
        p = part2(args.quick)
        r.update({f"gpt2_{k}": v for k, v in p.items()})
        print("\nrandom GPT-2-small shape, batch 8 x 16")
        print(f"  one plain forward                   {p['forward_ms']:.1f} ms")
        print(
            f"  heads -> 9.9.q, 9.6.q, 10.0.q @end  {p['hh_end_s']:.2f} s = {p['hh_end_forwards']:.1f} "
            f"forwards | {p['hh_end_vs_all']:.1f}x faster than at every position ({p['hh_all_s']:.2f} s) "
            f"| {p['hh_end_vs_naive']:.0f}x faster than the naive loop"
        )
        print(
            f"  exact per-position edge scores      @end {p['exact_pos_end_ms']:.1f} ms/edge vs every "
            f"position {p['exact_pos_every_ms']:.1f} ms/edge: {p['exact_pos_gain']:.1f}x"
        )
    return r


if __name__ == "__main__":
    main()
