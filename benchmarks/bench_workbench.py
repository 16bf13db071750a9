"""Workbench latency: from a toggle to the updated numbers (issue 26's speed targets).

* **server side** -- ``Session.toggle_edge`` (the exact evaluation of the new hypothesis:
  ``Experiment.evaluate_keep(..., incremental=True)`` on its keep-matrix, proportion
  explained included: the pass resumed from the toggled receiver's block) plus rendering
  what the page shows of it (``render_numbers``: the numbers and the per-example figure),
  over toggles of distinct edges (every hypothesis new: nothing cached) spread evenly over
  the receiver layers (the same number of edges into every layer and into the logits: a
  toggle's cost depends on its receiver's layer; :func:`fair_sample`), warm (after a first
  toggle): median, p90 and max, and the median per receiver layer. Measured side by side on
  the same hypotheses: ``Experiment.evaluate_circuit`` of the edges as names (a whole pass;
  its per-example metric and KL divergences must equal the toggle's bit-for-bit: counted)
  and a plain forward pass. Wall time and this process' CPU time are both printed: the
  machine is shared, and the CPU time is what a toggle costs on a quiet core.
  Targets: <= 100 ms on the shipped toy models, <= 300 ms on the GPT-2-small shape
  (``apexlens.random_gpt2_small(seed=0)``, a random batch of 8 x 16 tokens, metric
  ``LogitDiff`` of two fixed tokens at the last position) from two hypotheses: the top 200
  edges by EAP (a circuit-sized hypothesis) and a seeded random half of all 32,491 edges
  (the worst case: every receiver excludes a different set of senders).
* **browser** -- the page's own round trip on ``induction-2l`` in headless Chromium: a
  click on an edge until the page shows the new numbers (and until the circuit view is
  redrawn), median over the clicks.

    python benchmarks/bench_workbench.py [--per-layer 2] [--clicks 12] [--no-browser] [--no-gpt2]
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


def receiver_layer(edge: str, n_layers: int) -> int:
    """The block an edge's receiver is read in (``n_layers`` for the logits)."""
    node = apexlens.parse_node(edge.split("->")[1])
    return n_layers if node.kind == "logits" else node.layer


def fair_sample(universe: list[str], n_layers: int, per_layer: int, seed: int) -> list[str]:
    """``per_layer`` distinct edges into every receiver layer and into the logits, in a
    seeded random order: toggles spread evenly across layers. (A uniform draw over edges
    favours late receivers -- a receiver at layer ``L`` has about ``13 L`` senders -- whose
    toggles resume late and are cheap.)"""
    rng = random.Random(seed)
    by_layer: dict[int, list[str]] = {}
    for e in universe:
        by_layer.setdefault(receiver_layer(e, n_layers), []).append(e)
    out = [e for layer in sorted(by_layer) for e in rng.sample(by_layer[layer], min(per_layer, len(by_layer[layer])))]
    rng.shuffle(out)
    return out


def toggle_ms(session: Session, per_layer: int, seed: int = 0) -> dict[str, Any]:
    """Per toggle of a distinct edge (every hypothesis new), in milliseconds: the toggle to
    the rendered numbers (wall and CPU) and, on the same new hypothesis, evaluate_circuit of
    its edges as names (a whole pass, CPU), whose per-example metric and KL divergences the
    toggle's must equal bit-for-bit (``mismatches``); each toggle's receiver layer."""
    n_layers = session.exp.edge_index().dims.n_layers
    edges = fair_sample(session.universe, n_layers, per_layer, seed)
    warm = next(e for e in session.universe if e not in edges)
    session.toggle_edge(warm)
    out: dict[str, Any] = {"wall": [], "cpu": [], "whole cpu": [], "layer": [], "mismatches": 0}
    for e in edges:
        wall, cpu = _timed(lambda e=e: render_numbers(session, session.toggle_edge(e)))
        res = session.current.result
        pairs = session.edge_pairs()
        got: list[Any] = []
        out["whole cpu"].append(
            _timed(lambda p=pairs, got=got: got.append(session.exp.evaluate_circuit(p)))[1]
        )
        same = torch.equal(res.scores.values, got[0].scores.values) and torch.equal(
            res.kl_circuit.values, got[0].kl_circuit.values
        )
        out["mismatches"] += not same
        out["wall"].append(wall)
        out["cpu"].append(cpu)
        out["layer"].append(receiver_layer(e, n_layers))
    return out


def spread(values: list[float]) -> str:
    """``median / p90 / max``."""
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return f"{statistics.median(values):6.0f} {q[8]:6.0f} {max(values):6.0f}"


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
    parser.add_argument(
        "--per-layer", type=int, default=3,
        help="toggles into each receiver layer on GPT-2 small (toy models: twice as many)",
    )
    parser.add_argument("--clicks", type=int, default=12, help="browser clicks")
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
            (f"{name}: {len(s.universe)} edges, {task} n=8", toggle_ms(s, 2 * args.per_layer),
             100.0, forward)
        )
    if not args.no_gpt2:
        sessions, model, clean = gpt2_sessions()
        forward = forward_ms(model, clean)
        for name, s in sessions:
            rows.append(
                (f"GPT-2 small 8x16: {name}", toggle_ms(s, args.per_layer), 300.0, forward)
            )
    print(
        f"\nserver side, toggle -> numbers (ms; toggles spread evenly over receiver layers, "
        f"logits included; warm; torch threads {torch.get_num_threads()}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"{'setting':52s} {'n':>3s} {'cpu: median    p90    max':>25s} {'wall: median    p90    max':>26s} "
        f"{'target':>6s} {'whole':>6s} {'speed-up':>8s} {'fwd':>6s} {'tgl/fwd':>7s} {'equal':>6s}"
    )
    for name, t, target, fwd in rows:
        c, whole = (statistics.median(t[k]) for k in ("cpu", "whole cpu"))
        n = len(t["cpu"])
        print(
            f"{name:52s} {n:3d} {spread(t['cpu']):>25s} {spread(t['wall']):>26s} {target:6.0f} {whole:6.0f} "
            f"{whole / c:8.2f} {fwd:6.1f} {c / fwd:7.2f} {n - t['mismatches']:3d}/{n:<3d}"
        )
    print(
        "cpu = this process' CPU time of a toggle (median / p90 / max; summed over torch's threads), wall its wall time "
        "(the latency a user sees); whole = evaluate_circuit of the\nsame hypotheses (a whole pass), speed-up = "
        "whole / cpu; fwd = a plain forward pass (full logits), tgl/fwd = cpu / fwd;\nequal = "
        "toggles whose per-example metric and KL equal evaluate_circuit's bit-for-bit"
    )
    for name, t, _, fwd in rows:
        if not name.startswith("GPT-2"):
            continue
        for kind in ("cpu", "wall"):
            by: dict[int, list[float]] = {}
            for layer, c in zip(t["layer"], t[kind], strict=True):
                by.setdefault(layer, []).append(c)
            print(f"\nper receiver layer, {name} (median {kind} ms; a plain forward {fwd:.0f} ms cpu):")
            print("  " + " ".join(f"{'L' + str(k) if k < 12 else 'logits':>6s}" for k in sorted(by)))
            print("  " + " ".join(f"{statistics.median(by[k]):6.0f}" for k in sorted(by)))
    if args.no_browser:
        return
    got = browser_ms(args.clicks)
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
