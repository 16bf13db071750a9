"""``apexlens path-patch``: path patching, senders -> receivers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.ui.cli.common import (
    add_common,
    check_out,
    model_and_task,
    provenance,
    split,
    write_json,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("path-patch", help="path patching: senders -> receivers")
    add_common(p)
    p.add_argument(
        "--senders",
        default="all-heads",
        help="comma-separated nodes or sets, each patched on its own: '0.1', 'heads:0', 'm2', "
        "'embed' (default: all-heads)",
    )
    p.add_argument(
        "--receivers",
        default="logits",
        help="comma-separated nodes the paths end in, patched jointly: 'logits', '1.3.k', "
        "'1.3' (= its q, k and v) (default: logits)",
    )
    p.add_argument(
        "--via",
        default="",
        help="comma-separated intermediate nodes for a multi-hop path sender -> via -> "
        "receivers (default: none, direct paths)",
    )
    p.add_argument(
        "--mlps",
        choices=["live", "frozen"],
        default="live",
        help="MLPs on a path recompute (live, the IOI/ARENA convention) or stay frozen "
        "(direct paths only) (default: live)",
    )


def run(args: argparse.Namespace) -> int:
    if args.n < 1:  # the arguments first: an error comes back at once
        raise ApexlensError("--n must be at least 1")
    out = Path(args.out)
    check_out(out)

    import apexlens
    from apexlens.ui import plotting
    from apexlens.ui.report import write_report

    model, task = model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    result = apexlens.path_patch(
        model,
        batch.clean_tokens,
        batch.corrupted_tokens,
        senders=split(args.senders),
        receivers=split(args.receivers),
        via=split(args.via),
        mlps=args.mlps,
        metric=batch.logit_diff(),
        positions=batch.named_positions,
        progress=not args.no_progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    frame = result.to_frame()
    frame.to_csv(out / "path_patch.csv", index=False)
    files = [str(out / f) for f in ("path_patch.csv", "path_patch.json", "path_patch.html")]
    summary = {
        "model": args.model,
        "task": task.name,
        "senders": result.senders,
        "receivers": result.receivers,
        "via": result.via,
        "mlps": args.mlps,
        "clean": result.clean.mean,
        "corrupted": result.corrupted.mean,
        "values": result.values.tolist(),
        "normalized": result.normalized().tolist(),
    }
    write_json(out / "path_patch.json", summary, args, files)
    receivers = ", ".join(result.receivers)
    sign = (
        "Normalised effect (patched - clean) / (clean - corrupted): 0 = no effect, -1 = the "
        "path alone removes the whole clean-corrupted difference of the metric (it carries "
        "the behaviour); positive = patching raises the metric."
    )
    figs: list[tuple[str, Any, str]] = []
    if result.grid is not None:
        figs.append(
            (
                "heads",
                plotting.head_heatmap(result),
                f"Each cell is one head, its path to {receivers} patched from the corrupted "
                f"run ({task.name} task, {args.n} prompts, MLPs {args.mlps}). {sign}",
            )
        )
    figs += [
        (
            "paths",
            plotting.path_graph(result, top_k=min(10, len(result.senders))),
            (
                f"The strongest senders, each patched into {receivers} at once: one joint "
                "effect per sender, written on its box and shown by its colour (red = "
                "negative); the grey lines show the paths patched and carry no number of "
                f"their own. {sign}"
                if len(result.receivers) > 1 and not result.via
                else f"The strongest senders' paths to {receivers}: line width = |normalised "
                f"effect|, red = negative, blue = positive. {sign}"
            ),
        ),
        ("values", frame, "One row per sender."),
    ]
    write_report(
        out / "path_patch.html",
        figs,
        title=f"path patching on {args.model}",
        provenance=provenance(args, files),
    )
    print(frame.sort_values("normalized").head(10).to_string(index=False))
    print(f"wrote {', '.join(files)}")
    return 0

