"""``apexlens discover``: edge scores, a faithfulness curve and greedy exact pruning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.ui.cli.common import add_common, check_out, model_and_task


def add_parser(sub: Any) -> None:
    from apexlens.engines.attribution import METHODS

    p = sub.add_parser("discover", help="circuit discovery: edge scores, MIB curve, pruning")
    add_common(p)
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=next(iter(METHODS)),
        help="edge scores: " + "; ".join(
            f"{n} ({'exact' if m.exact else 'an approximation'})" for n, m in METHODS.items()
        ),
    )
    p.add_argument("--ig-steps", type=int, default=5, help="integration steps of eap-ig")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="greedy pruning threshold (metric units); default: 2%% of the clean-corrupted gap",
    )
    p.add_argument("--no-prune", action="store_true", help="only scores and the faithfulness curve")


def run(args: argparse.Namespace) -> int:
    import apexlens
    from apexlens.ui import plotting_discovery as pd_
    from apexlens.ui.report import write_report

    if args.n < 1:
        raise ApexlensError("--n must be at least 1")
    check_out(Path(args.out))
    model, task = model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    metric = batch.logit_diff()
    exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens, metric=metric)
    scores = apexlens.attribute_edges(
        exp, None, None, metric=metric, method=args.method, ig_steps=args.ig_steps
    )
    curve = apexlens.faithfulness(exp, None, None, scores, metric=metric)
    found, threshold = None, None
    if not args.no_prune:  # computed before anything is written
        gap = float(exp.clean_values.mean() - exp.corrupted_values.mean())
        threshold = args.threshold if args.threshold is not None else 0.02 * abs(gap)
        found = apexlens.discover(exp, None, None, metric=metric, threshold=threshold, order=scores)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_frame().to_csv(out / "edge_scores.csv", index=False)
    curve.to_frame().to_csv(out / "faithfulness.csv", index=False)
    summary: dict[str, Any] = {
        "model": args.model,
        "task": task.name,
        "method": args.method,
        "n_edges": len(scores),
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "top_edges": scores.top(10),
    }
    figs: list[tuple[str, Any]] = [("faithfulness", pd_.faithfulness_curve(curve))]
    if found is not None:
        found.to_frame().to_csv(out / "circuit.csv", index=False)
        summary.update(
            threshold=threshold,
            circuit=found.edges,
            recovery=found.recovery,
        )
        figs.append(("discovered circuit", pd_.circuit_graph(found, scores)))
        print(found)
    (out / "discover.json").write_text(json.dumps(summary, indent=2, default=str))
    figs.append(("top edges", scores.summary(20)))
    write_report(out / "discover.html", figs, title=f"circuit discovery on {args.model}")
    print(curve)
    print(
        f"wrote {out / 'edge_scores.csv'}, {out / 'faithfulness.csv'}, {out / 'discover.json'}, {out / 'discover.html'}"
    )
    return 0
