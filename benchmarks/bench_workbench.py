"""Workbench latency: from a toggle to the updated numbers (issue 26's speed targets).

* **server side** -- ``Session.toggle_edge`` (the exact ``Experiment.evaluate_circuit`` of
  the new hypothesis, proportion explained included) plus rendering what the page shows of
  it (``render_numbers``: the numbers and the per-example figure), median over >= 10
  toggles of distinct edges (every hypothesis new: nothing cached), warm (after a first
  toggle). Targets: <= 100 ms on the shipped toy models, <= 300 ms on the GPT-2-small
  shape (``apexlens.random_gpt2_small(seed=0)``, a random batch of 8 x 16 tokens, metric
  ``LogitDiff`` of two fixed tokens at the last position, starting from a seeded random
  half of all 32,491 edges -- the worst case). A plain forward pass is timed beside it.
* **browser** -- the page's own round trip on ``induction-2l`` in headless Chromium: a
  click on an edge until the page shows the new numbers (and until the circuit view is
  redrawn), median over the clicks.

    python benchmarks/bench_workbench.py [--toggles 12] [--no-browser]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time

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


def toggle_ms(session: Session, toggles: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """Milliseconds from ``toggle_edge`` to the rendered numbers, one per toggle (distinct
    edges, so every hypothesis is new): wall time and this process' CPU time (on a shared
    machine the CPU time is what the toggle costs on a quiet one, with one thread)."""
    rng = random.Random(seed)
    edges = rng.sample(session.universe, toggles + 1)
    session.toggle_edge(edges[0])  # warm
    wall, cpu = [], []
    for e in edges[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        entry = session.toggle_edge(e)
        render_numbers(session, entry)
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return wall, cpu


def forward_ms(model: object, tokens: torch.Tensor, repeat: int = 5) -> tuple[float, float]:
    """A plain forward pass (full logits): median wall and CPU milliseconds."""
    with torch.no_grad():
        model(tokens)  # type: ignore[operator]
        wall, cpu = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            model(tokens)  # type: ignore[operator]
            wall.append(1000 * (time.perf_counter() - t0))
            cpu.append(1000 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def gpt2_session() -> tuple[Session, object, torch.Tensor]:
    model = apexlens.random_gpt2_small(seed=0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (8, 16), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (8, 16), generator=g)
    metric = apexlens.LogitDiff(torch.full((8,), 1000), torch.full((8,), 2000), positions=-1)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    universe = [f"{s}->{r}" for s, r in apexlens.full_graph(model)]
    half = random.Random(0).sample(universe, len(universe) // 2)
    return Session(exp, start=half, title="random GPT-2 small"), model, clean


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
        rows.append(
            (
                f"{name} ({len(s.universe)} edges, {task} n=8)",
                *toggle_ms(s, args.toggles),
                100.0,
                forward_ms(model, s.exp.clean_tokens),
            )
        )
    if not args.no_gpt2:
        s, model, clean = gpt2_session()
        rows.append(
            (
                f"GPT-2 small shape, 8 x 16, random half of {len(s.universe)} edges",
                *toggle_ms(s, args.toggles),
                300.0,
                forward_ms(model, clean),
            )
        )
    print(
        f"\nserver side, toggle -> numbers (median of {args.toggles} toggles, warm; torch threads "
        f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"{'setting':58s} {'wall':>8s} {'cpu':>8s} {'target':>7s} {'ratio':>6s} "
        f"{'forward wall/cpu':>17s} {'toggle/fwd':>10s}"
    )
    for name, wall, cpu, target, (fw, fc) in rows:
        w, c = statistics.median(wall), statistics.median(cpu)
        print(
            f"{name:58s} {w:6.1f}ms {c:6.1f}ms {target:5.0f}ms {w / target:6.2f} "
            f"{fw:7.1f} / {fc:6.1f}ms {c / fc:10.2f}"
        )
    print("ratio = wall / target; toggle/fwd = CPU time of a toggle over a plain forward's")
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
        f"  click -> new numbers shown      {statistics.median(numbers):7.1f} ms (max {max(numbers):.1f})"
    )
    print(
        f"  click -> circuit view redrawn   {statistics.median(redrawn):7.1f} ms (max {max(redrawn):.1f}; includes weighing every edge)"
    )


if __name__ == "__main__":
    main()
