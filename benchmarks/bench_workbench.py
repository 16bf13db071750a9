"""Workbench latency: from a toggle to the updated numbers (issue 26's speed targets).

* **server side** -- ``Session.toggle_edge`` (the exact evaluation of the new hypothesis:
  ``Experiment.evaluate_keep`` on its keep-matrix, proportion explained included) plus
  rendering what the page shows of it (``render_numbers``: the numbers and the per-example
  figure), median over >= 10 toggles of distinct edges (every hypothesis new: nothing
  cached), warm (after a first toggle). Measured side by side on the same hypotheses:
  ``Experiment.evaluate_circuit`` of the edges as names (what a toggle cost before the
  session kept keep-matrices) and a plain forward pass. Wall time and this process' CPU
  time are both printed: the machine is shared, and the CPU time is what a toggle costs
  on a quiet core.
  Targets: <= 100 ms on the shipped toy models, <= 300 ms on the GPT-2-small shape
  (``apexlens.random_gpt2_small(seed=0)``, a random batch of 8 x 16 tokens, metric
  ``LogitDiff`` of two fixed tokens at the last position) from two hypotheses: the top 200
  edges by EAP (a circuit-sized hypothesis) and a seeded random half of all 32,491 edges
  (the worst case: every receiver excludes a different set of senders).
* **browser** -- the page's own round trip on ``induction-2l`` in headless Chromium: a
  click on an edge until the page shows the new numbers (and until the circuit view is
  redrawn), median over the clicks.

    python benchmarks/bench_workbench.py [--toggles 12] [--no-browser] [--no-gpt2]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import apexlens
from apexlens.ui.workbench.app import serve
from apexlens.ui.workbench.render import render_numbers
from apexlens.ui.workbench.session import Session

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)


def toggle_ms(session: Session, toggles: int, seed: int = 0) -> dict[str, list[float]]:
    """Per toggle of a distinct edge (every hypothesis new), in milliseconds: the toggle to
    the rendered numbers (wall and CPU) and, on the same new hypothesis, evaluate_circuit of
    its edges as names (CPU)."""
    rng = random.Random(seed)
    edges = rng.sample(session.universe, toggles + 1)
    session.toggle_edge(edges[0])  # warm
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "names cpu": []}
    for e in edges[1:]:
        wall, cpu = _timed(lambda e=e: render_numbers(session, session.toggle_edge(e)))
        pairs = session.edge_pairs()
        out["wall"].append(wall)
        out["cpu"].append(cpu)
        out["names cpu"].append(_timed(lambda p=pairs: session.exp.evaluate_circuit(p))[1])
    return out


def forward_ms(model: Any, tokens: torch.Tensor, repeat: int = 5) -> float:
    """A plain forward pass (full logits): median CPU milliseconds."""
    with torch.no_grad():
        model(tokens)
        return statistics.median(_timed(lambda: model(tokens))[1] for _ in range(repeat))


def gpt2_sessions() -> tuple[list[tuple[str, Session]], Any, torch.Tensor]:
    """Sessions on the GPT-2-small shape from the top 200 edges by EAP and from a random
    half of every edge (one Experiment)."""
    model = apexlens.random_gpt2_small(seed=0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (8, 16), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (8, 16), generator=g)
    metric = apexlens.LogitDiff(torch.full((8,), 1000), torch.full((8,), 2000), positions=-1)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    universe = [f"{s}->{r}" for s, r in apexlens.full_graph(model)]
    top = exp.attribute_edges(method="eap").top(200)
    half = random.Random(0).sample(universe, len(universe) // 2)
    n = len(universe)
    return (
        [
            (f"top 200 of {n} edges by EAP", Session(exp, start=top)),
            (f"random half of {n} edges", Session(exp, start=half)),
        ],
        model,
        clean,
    )


def browser_ms(clicks: int) -> tuple[list[float], list[float]] | None:
    """Click -> new numbers and click -> redrawn view (ms) on induction-2l, in Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    model = apexlens.load_model("induction-2l")
    session = Session.for_model(model, "induction", n=8, seed=0)
    server = serve(session, port=0)
    numbers, redrawn = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url)
            page.wait_for_selector("[data-edge]")
            edges = random.Random(1).sample(session.universe, clicks + 1)
            for i, e in enumerate(edges):
                before = page.inner_text("#n-edges")
                state = "0" if page.get_attribute(f'[data-edge="{e}"]', "data-in") == "1" else "1"
                t0 = time.perf_counter()
                page.click(f'[data-edge="{e}"]')
                page.wait_for_function(
                    "b => document.getElementById('n-edges').innerText !== b", arg=before
                )
                t1 = time.perf_counter()
                page.wait_for_selector(f'[data-edge="{e}"][data-in="{state}"]')
                t2 = time.perf_counter()
                if i:  # the first click is the warm-up
                    numbers.append(1000 * (t1 - t0))
                    redrawn.append(1000 * (t2 - t0))
            browser.close()
    finally:
        server.stop()
    return numbers, redrawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toggles", type=int, default=12)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-gpt2", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("induction-2l", "modadd-2l", "backdoor"):
        model = apexlens.load_model(name)
        task = apexlens.model_info(name)["task"]
        s = Session.for_model(model, task, n=8, seed=0)
        forward = forward_ms(model, s.exp.clean_tokens)
        rows.append(
            (
                f"{name}: {len(s.universe)} edges, {task} n=8",
                toggle_ms(s, args.toggles),
                100.0,
                forward,
            )
        )
    if not args.no_gpt2:
        sessions, model, clean = gpt2_sessions()
        forward = forward_ms(model, clean)
        for name, s in sessions:
            rows.append((f"GPT-2 small 8x16: {name}", toggle_ms(s, args.toggles), 300.0, forward))
    print(
        f"\nserver side, toggle -> numbers (median of {args.toggles} toggles, warm; torch threads "
        f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"{'setting':52s} {'wall':>8s} {'cpu':>8s} {'target':>7s} {'cpu/tgt':>7s} "
        f"{'names cpu':>9s} {'speed-up':>8s} {'forward':>8s} {'toggle/fwd':>10s}"
    )
    for name, t, target, fwd in rows:
        w, c, old = (statistics.median(t[k]) for k in ("wall", "cpu", "names cpu"))
        print(
            f"{name:52s} {w:6.1f}ms {c:6.1f}ms {target:5.0f}ms {c / target:7.2f} "
            f"{old:7.1f}ms {old / c:8.2f} {fwd:6.1f}ms {c / fwd:10.2f}"
        )
    print(
        "cpu/tgt = CPU time of a toggle over the target; names cpu = evaluate_circuit of the same "
        "hypotheses\nspelled as names (the toggle before keep-matrices), speed-up = names cpu / "
        "cpu; toggle/fwd = a toggle's CPU time over a plain forward pass's (full logits)"
    )
    if args.no_browser:
        return
    got = browser_ms(args.toggles)
    if got is None:
        print("\nbrowser round trip: skipped (needs playwright and the system's chromium)")
        return
    numbers, redrawn = got
    print(
        f"\nbrowser round trip on induction-2l (headless Chromium, median of {len(numbers)} clicks)"
    )
    print(
        f"  click -> new numbers shown      {statistics.median(numbers):7.1f} ms "
        f"(max {max(numbers):.1f})"
    )
    print(
        f"  click -> circuit view redrawn   {statistics.median(redrawn):7.1f} ms "
        f"(max {max(redrawn):.1f}; includes weighing every edge)"
    )


if __name__ == "__main__":
    main()
