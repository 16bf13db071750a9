"""A warm circuit on ``induction-2l`` (8 x 40): apexlens vs auto-circuit, side by side.

auto-circuit 1.0.1 needs a TransformerLens of its own (< 3), so it runs in a separate
environment, named by ``--ac-python`` (e.g. a venv with ``auto-circuit==1.0.1``,
``torch==2.13.0`` and ``transformer-lens<3``); this script writes the model (config and
weights), the tokens and the random-half edge set to a file, and the other environment's
python (``--worker``) loads them into its own ``HookedTransformer``, makes it patchable
(edge ablation, q/k/v inputs separate, resample ablation from the corrupted run) and
checks its per-example logit differences against apexlens' before timing. Both sides time
the same number of warm calls, each against its own plain forward of the same model, one
thread; the rounds alternate between the two processes (the machine's load drifts).

    python benchmarks/bench_autocircuit.py --ac-python /tmp/ac-venv/bin/python [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

CALLS = 200


def _median_ms(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """The median and the fastest of ``calls`` timings in ms (on a loaded machine, calls of a
    few ms are cut by the scheduler's time slices: the fastest is the least disturbed)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def _ac_name(node: Any) -> str:
    """An apexlens node as auto-circuit spells it."""
    if node.kind == "embed":
        return "Resid Start"
    if node.kind == "logits":
        return "Resid End"
    if node.kind == "head":
        base = f"A{node.layer}.{node.head}"
        return base if node.channel is None else f"{base}.{node.channel.upper()}"
    raise ValueError(f"no auto-circuit spelling for {node}")


def apexlens_side(path: str) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    import apexlens
    from apexlens.toys.tasks import get_task

    model = apexlens.load_model("induction-2l")
    b = get_task("induction").batch(8, seed=0)
    metric = b.logit_diff()
    exp = apexlens.Experiment(model, b.clean_tokens, b.corrupted_tokens, metric=metric)
    edges = apexlens.full_graph(model)
    g = torch.Generator().manual_seed(0)
    half = [e for e, k in zip(edges, torch.rand(len(edges), generator=g) < 0.5, strict=True) if k]
    res = exp.evaluate_circuit(half)
    n_pos = b.clean_tokens.shape[1]
    assert bool((torch.as_tensor(metric.positions) % n_pos == n_pos - 1).all()), "the last position"
    torch.save(
        {
            "cfg": model.cfg.to_dict(),
            "state": dict(model.named_parameters()),
            "logits": model(b.clean_tokens).detach(),
            "clean": b.clean_tokens,
            "corrupted": b.corrupted_tokens,
            "answer": metric.answer,
            "wrong": metric.wrong,
            "kept": sorted({(_ac_name(s), _ac_name(r)) for s, r in half}),
            "values": res.scores.values,
        },
        path,
    )

    def fwd() -> Any:
        with torch.no_grad():
            return model(b.clean_tokens)

    return (
        lambda: _median_ms(lambda: exp.evaluate_circuit(half), CALLS),
        lambda: _median_ms(fwd, CALLS),
        res,
    )


def worker(path: str, rounds: int) -> None:
    """Runs in auto-circuit's environment: check, then time ``rounds`` rounds (one JSON line
    each, waiting for a line on stdin before each round)."""
    import dataclasses

    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.set_num_threads(1)
    d = torch.load(path, weights_only=False)
    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    cfg = {k: v for k, v in d["cfg"].items() if k in fields and k not in ("n_params",)}
    cfg["device"] = "cpu"
    def make() -> Any:
        m = HookedTransformer(HookedTransformerConfig(**cfg))
        missing, unexpected = m.load_state_dict(d["state"], strict=False)
        assert not unexpected and not set(missing) & {n for n, _ in m.named_parameters()}
        return m.eval()

    base, model = make(), make()  # the plain model (its forward, the unit) and the patched
    clean, corrupted = d["clean"], d["corrupted"]
    with torch.no_grad():
        logit_err = float((base(clean) - d["logits"]).abs().max())
    assert logit_err < 1e-4, f"the models differ (logits by {logit_err})"
    model.set_use_attn_result(True)
    if not model.cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True)
    src_outs = src_ablations(pm, corrupted)
    kept = {f"{s}->{r}" for s, r in d["kept"]}
    set_all_masks(pm, 0.0)
    for edge in pm.edges:  # every edge outside the circuit is patched (ablated)
        if edge.name not in kept:
            edge.patch_mask(pm).data[edge.patch_idx] = 1.0
    ai, wi = d["answer"], d["wrong"]
    rows = torch.arange(clean.shape[0])

    def circuit() -> Any:
        with torch.inference_mode(), patch_mode(pm, src_outs):
            out = pm(clean)
        last = out[:, -1]  # slice_output="last_seq" is applied by auto-circuit's metrics
        return last[rows, ai] - last[rows, wi]

    def fwd() -> Any:
        with torch.no_grad():
            return base(clean)

    values = circuit()
    err = float((values.double() - d["values"].double()).abs().max())
    n_edges = len(pm.edges)
    print("ready", flush=True)
    for _ in range(rounds):
        sys.stdin.readline()
        out = {"circuit_ms": _median_ms(circuit, CALLS), "forward_ms": _median_ms(fwd, CALLS),
               "max_abs_diff": err, "n_edges": n_edges}
        print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ac-python", help="the python of auto-circuit's environment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        worker(args.worker, args.rounds)
        return
    if not args.ac_python:
        parser.error("--ac-python: the python of an environment with auto-circuit==1.0.1")
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        ours, our_fwd, _ = apexlens_side(path)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [args.ac_python, os.path.abspath(__file__), "--worker", path, "--rounds", str(args.rounds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the auto-circuit worker stopped (see its error above)")
        print("induction-2l, batch 8 x 40, one thread; a warm random-half circuit (ms, median of "
              f"{CALLS} calls), each side against its own plain forward")
        print("median (fastest) of the calls; ratio = circuit / the same side's forward")
        print(" round | apexlens circuit       forward        ratio       | auto-circuit circuit  "
              "forward        ratio       | apexlens / auto-circuit")
        med, best = [], []
        for r in range(args.rounds):
            (a, a0), (af, af0) = ours(), our_fwd()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("the auto-circuit worker stopped (see its error above)")
            w = json.loads(line)
            (c, c0), (cf, cf0) = w["circuit_ms"], w["forward_ms"]
            med.append(a / c)
            best.append(a0 / c0)
            print(f" {r + 1:5d} | {a:7.2f} ({a0:5.2f}) {af:6.2f} ({af0:4.2f}) {a / af:5.2f} "
                  f"({a0 / af0:4.2f}) | {c:7.2f} ({c0:5.2f}) {cf:6.2f} ({cf0:4.2f}) {c / cf:5.2f} "
                  f"({c0 / cf0:4.2f}) | {med[-1]:.2f} ({best[-1]:.2f})")
        proc.stdin.close()
        proc.wait()
        print(f"numbers: max |apexlens - auto-circuit| = {w['max_abs_diff']:.1e} over "
              f"{w['n_edges']} edges; apexlens takes {statistics.median(med):.2f}x auto-circuit's "
              f"time (median of rounds; {statistics.median(best):.2f}x by the fastest calls)")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
