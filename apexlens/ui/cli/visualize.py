"""``apexlens visualize``: feature visualization of one feature, checked against natural inputs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.ui.cli.common import add_common, check_out, model_and_task, provenance, write_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "visualize",
        help="feature visualization of a neuron / head / logit, with a manipulation check",
    )
    add_common(p)
    p.add_argument(
        "feature",
        help="the feature: 'm1.n34' (MLP neuron), 'L.H.attn:K' (attention to key K), "
        "'logit:T', '<hook>[i]'; optionally '@position' (default: the last)",
    )
    p.add_argument(
        "--n-pos", type=int, default=None, help="input length (default: the task's prompt length)"
    )
    p.add_argument(
        "--steps", type=int, default=200, help="soft-input optimisation steps (default: 200)"
    )
    p.add_argument(
        "--restarts", type=int, default=8, help="independent starting points (default: 8)"
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=20,
        help="rounds of discrete single-token swaps after the soft optimisation (default: 20)",
    )
    p.add_argument(
        "--peers",
        type=int,
        default=31,
        help="peer features of the same layer the check ranks the visualization among "
        "(default 31)",
    )
    p.add_argument(
        "--alpha", type=float, default=0.05, help="false-alarm rate to flag at (default 0.05)"
    )
    p.add_argument(
        "--natural",
        type=int,
        default=512,
        help="natural prompts of the task to compare against (default: 512; duplicates dropped)",
    )


def run(args: argparse.Namespace) -> int:
    if args.natural < 3:  # the arguments first: an error comes back at once
        raise ApexlensError("--natural must be at least 3")
    check_out(Path(args.out))  # before anything is computed

    import torch

    import apexlens
    from apexlens.ui.plotting_fv import fv_check_figure
    from apexlens.ui.report import write_report

    model, task = model_and_task(args)
    apexlens.parse_feature(model, args.feature)  # a bad feature fails before any compute
    natural = torch.unique(task.batch(args.natural, seed=args.seed).clean_tokens, dim=0)
    n_pos = int(natural.shape[1]) if args.n_pos is None else args.n_pos
    check = apexlens.fv_check(
        model,
        args.feature,
        natural,
        n_pos=n_pos,
        steps=args.steps,
        restarts=args.restarts,
        refine_steps=args.refine_steps,
        seed=args.seed,
        peers=args.peers,
        alpha=args.alpha,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = task.token_labels
    check.fv.to_frame(labels).to_csv(out / "fv.csv", index=False)
    check.natural.to_frame(labels).to_csv(out / "natural_top.csv", index=False)
    check.to_frame().to_csv(out / "check.csv", index=False)
    summary = {
        "model": args.model,
        "feature": check.feature.label,
        "fv_tokens": check.fv.best_tokens.tolist(),
        "fv_text": " ".join(labels(check.fv.best_tokens)),
        **{
            str(k): v.item() if hasattr(v, "item") else v
            for k, v in check.to_frame().iloc[0].items()
            if k != "feature"
        },
        "verdict": check.verdict,
    }
    names = ("fv.csv", "natural_top.csv", "check.csv", "visualize.json", "visualize.html")
    files = [str(out / f) for f in names]
    write_json(out / "visualize.json", summary, args, files)
    write_report(
        out / "visualize.html",
        [
            ("Manipulation check", fv_check_figure(check, labels), CAPTION),
            (
                "The check in numbers",
                check.to_frame().drop(columns=["feature", "reason"]),
                check.verdict,
            ),
            ("Feature visualization: final inputs, best first", check.fv.to_frame(labels)),
            ("Natural top examples", check.natural.to_frame(labels)),
            ("Attribution share per upstream component", check.attribution_frame()),
            ("The checked feature and its peers", check.peer_frame()),
        ],
        title=f"feature visualization of {check.feature.label} on {args.model}",
        provenance=provenance(args, files),
    )
    print(f"{check.feature.label}: FV '{summary['fv_text']}' -> {check.fv_activation:.4g}")
    print(check.verdict)
    print(f"wrote {', '.join(files)}")
    return 0


CAPTION = (
    "Top left: the activation of each restart's discrete input while the soft input is "
    "optimised (then, after the dotted line, while single tokens are swapped); dashed: the "
    "largest natural activation. Top middle: the feature on every natural input and position, "
    "the red line the visualization's activation. Top right: the share of the activation each "
    "upstream component contributes (gradient x activation, signed, divided by the total "
    "absolute attribution), for the visualization (red) and the mean of the natural top "
    "examples (blue). Bottom: the calibrated test. Each panel is one measure of how unlike its "
    "natural top examples the visualization is, for the checked feature (red) and for peer "
    "features of the same layer visualized the same way (grey), with the checked feature's "
    "rank p-value. The measures are combined and ranked again; the visualization is flagged "
    "when it is more unusual than all but an alpha share of its peers."
)
