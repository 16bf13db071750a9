"""One rank of the sharding tests (tests/test_distributed.py launches it with torchrun).

Every question apexlens shards, on a small float64 random model as every
model class this TransformerLens has, asked twice -- by this process alone, then inside
``apexlens.sharded()`` -- and compared (bit for bit, and the largest difference). Each rank
writes what it found to ``OUT/rank{r}.json``.

With 2 ranks, then: a metric error on one rank, bad values on one rank, an out-of-memory error on one
rank, each inside a sharded question: every rank must raise one ApexlensError naming the
failing rank, with its hooks removed, and the next question must still work; then one rank
skips a question altogether and the others must raise after the timeout instead of hanging.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import apexlens  # noqa: E402
from apexlens import ApexlensError, LogitDiff  # noqa: E402

from backends import model_backends  # noqa: E402
from helpers import hook_count, random_model, random_tokens  # noqa: E402


def tensors(x: Any) -> dict[str, torch.Tensor]:
    """The numbers of a result, by name."""
    if isinstance(x, torch.Tensor):
        return {"": x}
    if isinstance(x, tuple):
        return {f"{i}.{k}": v for i, part in enumerate(x) for k, v in tensors(part).items()}
    out: dict[str, torch.Tensor] = {}
    for name in ("per_example", "values", "predictions", "mean_probs", "nonfinite", "tokens",
                 "activation", "trajectory", "soft_trajectory", "rows", "cols", "scores",
                 "codes", "low", "high", "censored", "first_low", "first_high", "escape_token"):
        v = getattr(x, name, None)
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif hasattr(v, "values") and isinstance(v.values, torch.Tensor):
            out[name] = v.values
    for name in ("recovery", "full", "empty", "share", "share_low", "share_high", "gain",
                 "p_value", "n_forwards", "n_degenerate", "token", "flagged"):
        if isinstance(getattr(x, name, None), (float, int)):
            out[name] = torch.tensor(float(getattr(x, name)), dtype=torch.float64)
    if hasattr(x, "kl_circuit"):
        out["kl_circuit"] = x.kl_circuit.values
    if hasattr(x, "evaluation"):  # discover
        out["steps"] = torch.tensor(x.steps[["before", "after"]].to_numpy())
        out["removed"] = torch.tensor(x.steps["removed"].to_numpy())
        out["kept"] = torch.tensor([hash(tuple(e)) % 10**9 for e in x.edges])
        out.update({f"evaluation.{k}": v for k, v in tensors(x.evaluation).items()})
    return out


def compare(one: Any, many: Any) -> dict[str, Any]:
    a, b = tensors(one), tensors(many)
    assert a and a.keys() == b.keys(), (a.keys(), b.keys())
    equal, worst = True, 0.0
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"equal": False, "max_abs": float("inf"), "what": f"{k}: {x.shape} vs {y.shape}"}
        equal &= torch.equal(x, y)
        if x.is_floating_point():
            both_nan = x.isnan() & y.isnan()
            d = (x.double() - y.double()).abs().masked_fill(both_nan, 0)
            worst = max(worst, float(d.max()) if d.numel() else 0.0)
        elif not torch.equal(x, y):
            worst = float("inf")
    return {"equal": bool(equal), "max_abs": worst}


def questions(backend: str) -> dict[str, Any]:
    """Every sharded question, asked on ``backend``: name -> a function giving its result."""
    model = random_model(0, backend=backend)
    clean, corrupted = random_tokens(model, batch=7, n_pos=6, seed=3)
    metric = LogitDiff(clean[:, -1] % 11, (clean[:, -1] + 3) % 11)

    def plain(logits: torch.Tensor) -> torch.Tensor:  # a plain function metric
        return logits[..., -1, 2] - logits[..., -1, 5]

    def exp() -> apexlens.Experiment:
        return apexlens.Experiment(model, clean, corrupted, metric=metric)

    half = [e for i, e in enumerate(apexlens.full_graph(model)) if i % 2 == 0]
    g = torch.Generator().manual_seed(5)
    hyps = [[e for e in half if torch.rand((), generator=g) < 0.5] for _ in range(5)]


    return {
        "path_patch": lambda: apexlens.path_patch(
            model, clean, corrupted, senders=["embed", "all-heads", "all-mlps"], receivers="logits",
            metric=metric),
        "path_patch_q_plain": lambda: apexlens.path_patch(
            model, clean, corrupted, senders="heads:0", receivers=["2.1.q", "m1"], metric=plain),
        "path_patch_via": lambda: exp().path_patch(["0.1", "0.2"], "logits", via=["1.3"]),
        "act_patch": lambda: apexlens.act_patch(
            model, clean, corrupted, nodes=["embed", "all-heads", "all-mlps", "r2"], metric=metric),
        "evaluate_circuit": lambda: apexlens.evaluate_circuit(
            model, clean, corrupted, half, metric=metric),
        "evaluate_circuit_mean": lambda: exp().evaluate_circuit(half, ablation="mean"),
        "evaluate_circuits": lambda: exp().evaluate_circuits(hyps),
        "exact": lambda: apexlens.attribute_edges(
            model, clean, corrupted, metric=metric, method="exact"),
        "exact_per_position": lambda: exp().attribute_edges(
            method="exact", edges=half[:20], per_position=True),
        "eap": lambda: apexlens.attribute_edges(model, clean, corrupted, metric=metric, method="eap"),
        "eap_plain": lambda: apexlens.attribute_edges(
            model, clean, corrupted, metric=plain, method="eap"),
        "eap_ig": lambda: apexlens.attribute_edges(
            model, clean, corrupted, metric=metric, method="eap-ig", ig_steps=4),
        "faithfulness": lambda: (lambda e: e.faithfulness(
            e.attribute_edges(method="eap"), fractions=[0.0, 0.1, 0.3, 0.6, 1.0]))(exp()),
        "discover": lambda: apexlens.discover(
            model, clean, corrupted, metric=metric, threshold=0.0001, batch_size=4,
            edges=half[::3]),
        "apex": lambda: apexlens.apex(
            model, clean, sigmas=[0.1, 1.0, 4.0], n_draws=7, seed=3, max_batch=21),
        "apex_ids": lambda: apexlens.apex(
            model, clean, sigmas=[0.5, 2.0, 8.0], n_draws=5, sites="resid_pre", relative=False,
            example_ids=torch.arange(10, 17), max_batch=5),
        "apex_bias": lambda: apexlens.apex_bias(model, clean, sigmas=[2.0, 8.0], n_draws=4, seed=2),
        "escape_noise": lambda: apexlens.escape_noise(
            model, clean, n_draws=5, sigma_lo=0.05, sigma_hi=50.0, seed=4, max_batch=6),
        "top_examples": lambda: apexlens.top_examples(model, "m1.n3", clean, k=5, batch_size=2),
        "visualize": lambda: apexlens.visualize(
            model, "m2.n5", n_pos=4, steps=6, restarts=5, refine_steps=3, top_k=4, seed=1),
        "visualize_swaps_only": lambda: apexlens.visualize(
            model, "m0.n7", n_pos=3, steps=0, restarts=4, refine_steps=4, seed=2),
    }


def run_questions(out: Path) -> None:
    """Each rank computes its share of the single-process answers (all_gather'd), then every
    question is asked again inside ``apexlens.sharded()`` and compared."""
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict[str, Any] = {}
    for backend in model_backends():
        asked = questions(backend)
        names = list(asked)
        mine = {k: asked[k]() for i, k in enumerate(names) if i % world == rank}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        alone = {k: v for part in every for k, v in part.items()}
        for name, ask in asked.items():
            with apexlens.sharded(timeout=120):
                many = ask()
            report[f"{backend}:{name}"] = compare(alone[name], many)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


TIMEOUT = 15.0


def expect_error(what: str, ask: Any, model: Any, hooks: int) -> dict[str, Any]:
    try:
        with apexlens.sharded(timeout=TIMEOUT):
            ask()
    except ApexlensError as err:
        return {"what": what, "message": str(err), "hooks_left": hook_count(model) - hooks}
    return {"what": what, "message": None, "hooks_left": hook_count(model) - hooks}


def run_faults(out: Path) -> None:
    rank = dist.get_rank()
    model = random_model(0)
    clean, corrupted = random_tokens(model, batch=5, n_pos=6, seed=3)
    armed = {"on": False}

    def failing(logits: torch.Tensor) -> torch.Tensor:
        if armed["on"] and rank == 1:
            raise ValueError("the metric broke on this shard")
        return logits[..., -1, 2] - logits[..., -1, 5]

    def nan_on_one_rank(logits: torch.Tensor) -> torch.Tensor:
        v = logits[..., -1, 2] - logits[..., -1, 5]
        return v * float("nan") if armed["on"] and rank == 1 else v

    with apexlens.sharded(timeout=3):  # made now, on every rank: used by the last check
        pass
    results = []
    hooks = hook_count(model)
    exp = apexlens.Experiment(model, clean, corrupted, metric=failing)
    armed["on"] = True
    results.append(expect_error("metric", lambda: exp.path_patch("all-heads"), model, hooks))
    armed["on"] = False
    exp2 = apexlens.Experiment(model, clean, corrupted, metric=nan_on_one_rank)
    armed["on"] = True
    results.append(expect_error("bad values", lambda: exp2.act_patch("all-heads"), model, hooks))
    armed["on"] = False

    def oom(act: torch.Tensor, hook: Any) -> None:
        if armed["on"] and rank == 1 and act.shape[0] > clean.shape[0]:  # the noisy rows only
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 20 GiB")

    handle = model.blocks[1].hook_resid_pre.add_hook(oom)  # the user's own hook
    armed["on"] = True
    results.append(expect_error(
        "oom", lambda: apexlens.apex(model, clean, sigmas=[1.0], n_draws=4, sites="resid_pre:0"),
        model, hooks + 1))
    armed["on"] = False
    model.reset_hooks()
    del handle
    with apexlens.sharded(timeout=TIMEOUT):  # the group is still in step after those
        after = exp.path_patch("all-heads").per_example
    results.append({"what": "after", "finite": bool(torch.isfinite(after).all())})
    # a rank that never asks: the others raise after the timeout instead of hanging
    t0 = time.time()
    if rank == 1:
        time.sleep(8)  # alive, but never asks
        results.append({"what": "timeout", "message": "skipped", "seconds": 0.0})
    else:
        try:
            with apexlens.sharded(timeout=3):
                exp.path_patch("all-heads")
            results.append({"what": "timeout", "message": None})
        except ApexlensError as err:
            results.append({"what": "timeout", "message": str(err), "seconds": time.time() - t0,
                            "hooks_left": hook_count(model) - hooks})
    (out / f"faults{rank}.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    """``questions`` (every rank count), then with 2 ranks ``faults`` (last: its timeout
    check leaves the group unusable)."""
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        run_questions(out)
        if dist.get_world_size() == 2:
            run_faults(out)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # a timed-out group cannot be shut down cleanly


if __name__ == "__main__":
    main()
