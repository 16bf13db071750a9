"""The ``apexlens`` command line: ``demo``, ``models``, ``path-patch``, ``apex``, ``discover``.

Every subcommand has ``--help``. A bad argument (unknown model, bad node name, head out of
range, negative sigma...) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from apexlens.backend import ApexlensError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        where = self.prog[len("apexlens ") :] if self.prog.startswith("apexlens ") else ""
        raise ApexlensError(f"{where}: {message}" if where else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="apexlens", description="Exact, fast path patching and APEX noise probing."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "demo", help="run the demo on the shipped toy models (offline) and write an HTML report"
    )
    p.add_argument(
        "--out", default="apexlens-report", help="output directory (default: apexlens-report)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("models", help="list the shipped toy models")

    common = _Parser(add_help=False)
    common.add_argument(
        "model",
        help="a shipped toy model (see `apexlens models`) or a TransformerLens name, e.g. gpt2",
    )
    common.add_argument("--task", help="task name (default: the toy model's own task)")
    common.add_argument("--n", type=int, default=32, help="number of prompts (default 32)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--backend",
        choices=["hooked", "bridge"],
        default=None,
        help="model class (default: HookedTransformer where TransformerLens has it, else TransformerBridge)",
    )
    common.add_argument("--out", default="apexlens-out", help="output directory")

    p = sub.add_parser("path-patch", parents=[common], help="path patching: senders -> receivers")
    p.add_argument(
        "--senders", default="all-heads", help="comma-separated nodes or sets (default all-heads)"
    )
    p.add_argument("--receivers", default="logits", help="comma-separated nodes (default logits)")
    p.add_argument(
        "--via", default="", help="comma-separated intermediate nodes for a multi-hop path"
    )
    p.add_argument("--mlps", choices=["live", "frozen"], default="live")

    p = sub.add_parser(
        "apex", parents=[common], help="APEX: noise sweep and prediction concentration"
    )
    p.add_argument("--sigmas", default="0.25,0.5,1,2,4,8", help="comma-separated noise levels")
    p.add_argument("--draws", type=int, default=32)
    p.add_argument(
        "--sites", default="embed", help="noise sites: preset or hook names, comma-separated"
    )
    p.add_argument(
        "--absolute",
        action="store_true",
        help="absolute sigma (default: relative to the activation RMS)",
    )
    from apexlens import cli_discovery

    cli_discovery.add_parser(sub, common)
    return parser


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_and_task(args: argparse.Namespace) -> tuple[Any, Any]:
    from apexlens.models import list_models, load_model, model_info
    from apexlens.tasks import get_task

    model = load_model(args.model, backend=args.backend)
    task_name = args.task or (
        model_info(args.model)["task"] if args.model in list_models() else None
    )
    if task_name is None:
        raise ApexlensError(
            f"model {args.model!r} has no default task: pass --task (e.g. --task ioi)"
        )
    kwargs = {"tokenizer": model.tokenizer} if task_name == "ioi" else {}
    return model, get_task(task_name, **kwargs)


def _path_patch(args: argparse.Namespace) -> int:
    import apexlens
    from apexlens import plotting
    from apexlens.report import write_report

    if args.n < 1:
        raise ApexlensError("--n must be at least 1")
    model, task = _model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    result = apexlens.path_patch(
        model,
        batch.clean_tokens,
        batch.corrupted_tokens,
        senders=_split(args.senders),
        receivers=_split(args.receivers),
        via=_split(args.via),
        mlps=args.mlps,
        metric=batch.logit_diff(),
        positions=batch.named_positions,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = result.to_frame()
    frame.to_csv(out / "path_patch.csv", index=False)
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
    (out / "path_patch.json").write_text(json.dumps(summary, indent=2))
    figs: list[tuple[str, Any]] = []
    if result.grid is not None:
        figs.append(("heads", plotting.head_heatmap(result)))
    figs += [
        ("paths", plotting.path_graph(result, top_k=min(10, len(result.senders)))),
        ("values", frame),
    ]
    write_report(out / "path_patch.html", figs, title=f"path patching on {args.model}")
    print(frame.sort_values("normalized").head(10).to_string(index=False))
    print(f"wrote {out / 'path_patch.csv'}, {out / 'path_patch.json'}, {out / 'path_patch.html'}")
    return 0


def _apex(args: argparse.Namespace) -> int:
    from apexlens import plotting
    from apexlens.noise import apex
    from apexlens.report import write_report

    try:
        sigmas = [float(s) for s in _split(args.sigmas)]
    except ValueError:
        raise ApexlensError(
            f"--sigmas must be comma-separated numbers, got {args.sigmas!r}"
        ) from None
    model, task = _model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    sites: Any = _split(args.sites)
    result = apex(
        model,
        batch.clean_tokens,
        sigmas=sigmas,
        n_draws=args.draws,
        sites=sites if len(sites) > 1 else sites[0],
        relative=not args.absolute,
        positions=batch.positions,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = result.summary()
    frame.to_csv(out / "apex.csv", index=False)
    (out / "apex.json").write_text(
        json.dumps(
            {"model": args.model, "task": task.name, "summary": frame.to_dict("records")},
            indent=2,
            default=str,
        )
    )
    big = max(sigmas)
    write_report(
        out / "apex.html",
        [
            ("concentration", plotting.apex_curves({args.model: result})),
            (f"predicted tokens at sigma {big:g}", plotting.token_histogram(result, big)),
            ("summary", frame),
        ],
        title=f"APEX on {args.model}",
    )
    print(frame.to_string(index=False))
    print(f"wrote {out / 'apex.csv'}, {out / 'apex.json'}, {out / 'apex.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            from apexlens.demo import run_demo

            run_demo(args.out, progress=not args.no_progress)
            return 0
        if args.command == "models":
            from apexlens.models import list_models, model_info

            for name in list_models():
                print(
                    f"{name:16s} task={model_info(name)['task']:10s} {model_info(name)['description']}"
                )
            return 0
        if args.command == "path-patch":
            return _path_patch(args)
        if args.command == "discover":
            from apexlens import cli_discovery

            return cli_discovery.run(args, _model_and_task)
        return _apex(args)
    except ApexlensError as e:
        print(f"apexlens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
