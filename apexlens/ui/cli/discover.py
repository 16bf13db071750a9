"""``apexlens discover``: edge scores, a faithfulness curve and greedy exact pruning."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.ui.cli.common import add_common, check_out, model_and_task, provenance, write_json


def add_parser(sub: Any) -> None:
    from apexlens.engines.attribution.registry import METHOD_INFO  # a table: no torch

    p = sub.add_parser("discover", help="circuit discovery: edge scores, MIB curve, pruning")
    add_common(p)
    default = next(iter(METHOD_INFO))
    p.add_argument(
        "--method",
        choices=list(METHOD_INFO),
        default=default,
        help="how edges are scored and ranked: "
        + "; ".join(f"{n}: {m.summary}, {m.kind}" for n, m in METHOD_INFO.items())
        + f" (default: {default})",
    )
    p.add_argument(
        "--ig-steps", type=int, default=5, help="integration steps of eap-ig (default: 5)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="greedy pruning threshold in the metric's units (default: 2%% of the "
        "clean-corrupted gap of the mean metric)",
    )
    p.add_argument(
        "--no-prune",
        action="store_true",
        help="only the edge scores and the faithfulness curve, no greedy pruning (default: prune)",
    )


def run(args: argparse.Namespace) -> int:
    if args.n < 1:  # the arguments first: an error comes back at once
        raise ApexlensError("--n must be at least 1")
    out = Path(args.out)
    check_out(out)

    import apexlens
    from apexlens.engines.attribution.registry import METHOD_INFO
    from apexlens.ui import plotting_discovery as pd_
    from apexlens.ui.report import write_report

    model, task = model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    progress = not args.no_progress
    exp = apexlens.Experiment(
        model, batch.clean_tokens, batch.corrupted_tokens, metric=batch.logit_diff()
    )
    scores = exp.attribute_edges(method=args.method, ig_steps=args.ig_steps, progress=progress)
    curve = exp.faithfulness(scores, progress=progress)
    found, threshold = None, None
    if not args.no_prune:  # computed before anything is written (under torchrun: every rank)
        gap = float(exp.clean_values.mean() - exp.corrupted_values.mean())
        threshold = args.threshold if args.threshold is not None else 0.02 * abs(gap)
        found = exp.discover(threshold=threshold, order=scores, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_frame().to_csv(out / "edge_scores.csv", index=False)
    curve.to_frame().to_csv(out / "faithfulness.csv", index=False)
    info = METHOD_INFO[args.method]
    ranking = (
        f"Edges are ranked by {args.method} ({info.summary}), {info.kind}"
        + ("." if info.exact else ": a gradient estimate of each edge's effect, not the "
           "effect itself. Check it against --method exact on a small batch; the circuit "
           "below is evaluated exactly either way.")
    )
    summary: dict[str, Any] = {
        "model": args.model,
        "task": task.name,
        "method": args.method,
        "scores_exact": info.exact,
        "n_edges": len(scores),
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "top_edges": scores.top(10),
    }
    names = ["edge_scores.csv", "faithfulness.csv"]
    figs: list[tuple[str, Any, str]] = [
        (
            "faithfulness",
            pd_.faithfulness_curve(curve),
            "MIB faithfulness of the top edges by |score|, each circuit evaluated exactly. "
            + ranking,
        )
    ]
    if found is not None:
        found.to_frame().to_csv(out / "circuit.csv", index=False)
        found.circuit.save(out / "circuit.json")
        names += ["circuit.csv", "circuit.json"]
        summary.update(threshold=threshold, circuit=found.edges, recovery=found.recovery)
        meaning = found.evaluation.ablation_meaning
        figs.append(
            (
                "discovered circuit",
                pd_.circuit_graph(found, scores),
                f"Greedy exact pruning (threshold {threshold:.4g}), {args.method} order; line "
                f"width = |{args.method} score| ({info.kind}). {meaning[:1].upper()}{meaning[1:]}",
            )
        )
        print(found)
    names += ["discover.json", "discover.html"]
    files = [str(out / f) for f in names]
    write_json(out / "discover.json", summary, args, files)
    figs.append(("top edges", scores.summary(20), ranking))
    write_report(
        out / "discover.html",
        figs,
        title=f"circuit discovery on {args.model}",
        intro=ranking,
        provenance=provenance(args, files),
    )
    print(curve)
    print(f"wrote {', '.join(files)}")
    return 0
