"""The ``apexlens`` command line: ``demo``, ``models``, ``path-patch``, ``apex``, ``discover``,
``workbench``.

Every subcommand has ``--help``. A bad argument (unknown model, bad node name, head out of
range, negative sigma...) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError


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
    common.add_argument(
        "--out",
        default="apexlens-out",
        help="output directory (checked before anything is computed)",
    )
    common.add_argument("--no-progress", action="store_true", help="no progress on stderr")

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
    p.add_argument(
        "--sigmas",
        default="0.25,0.5,1,2,4,8",
        help="comma-separated noise levels >= 0, increasing (negative numbers are refused, "
        "'--sigmas -1,2' included)",
    )
    p.add_argument("--draws", type=int, default=32)
    p.add_argument(
        "--sites",
        default="resid_post",
        help="where the noise goes: presets or hook names, comma-separated; a preset may name "
        "layers, 'z:0,1' is heads' outputs in layers 0 and 1 (default: resid_post, every "
        "block's output, the APEX paper's setting and apexlens.apex's default; 'embed' = "
        "input perturbation)",
    )
    scale = p.add_mutually_exclusive_group()
    scale.add_argument(
        "--relative",
        action="store_true",
        help="sigma in units of each site's clean activation RMS (default: absolute sigma, as "
        "in the paper and in apexlens.apex)",
    )
    scale.add_argument(
        "--absolute", action="store_true", help="absolute sigma (the default; kept for scripts)"
    )
    from apexlens import cli_discovery

    cli_discovery.add_parser(sub, common)
    from apexlens import cli_visualize

    cli_visualize.add_parser(sub, common)
    from apexlens.ui.workbench import cli as cli_workbench

    cli_workbench.add_parser(sub)
    return parser


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def split_sites(text: str) -> list[str]:
    """Split ``--sites`` on commas, except before a layer number: ``"z:0,1,embed"`` ->
    ``["z:0,1", "embed"]`` (a piece that is an integer continues the preset before it)."""
    out: list[str] = []
    for piece in _split(text):
        if out and ":" in out[-1] and re.fullmatch(r"-?\d+", piece):
            out[-1] += f",{piece}"
        else:
            out.append(piece)
    return out


def parse_sigmas(text: str) -> list[float]:
    """``--sigmas``: comma-separated numbers, each >= 0, strictly increasing."""
    try:
        sigmas = [float(s) for s in _split(text)]
    except ValueError:
        raise ApexlensError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not sigmas:
        raise ApexlensError("--sigmas: give at least one noise level")
    bad = [s for s in sigmas if not s >= 0]
    if bad:
        raise ApexlensError(
            f"--sigmas: every sigma must be >= 0 (a standard deviation), got {bad[0]:g}"
        )
    if any(b <= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise ApexlensError(f"--sigmas must be strictly increasing, got {text!r}")
    return sigmas


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot take the outputs, before anything is computed."""
    if out.exists() and not out.is_dir():
        raise ApexlensError(f"--out {out} is a file, not a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ApexlensError(f"--out {out}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ApexlensError(
            f"--out {out}: cannot write there ({e.strerror or type(e).__name__} in {existing})"
        ) from None


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--sigmas -1,2`` -> ``--sigmas=-1,2``: argparse takes ``-1,2`` for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--sigmas" and i + 1 < len(argv) and re.match(r"-[\d.]", argv[i + 1]):
            out.append(f"--sigmas={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.no_progress:
        print(text, file=sys.stderr, flush=True)


def _model_and_task(args: argparse.Namespace) -> tuple[Any, Any]:
    from apexlens.models import check_task_fits, list_models, load_model, model_info
    from apexlens.tasks import get_task

    toy = args.model in list_models()
    task_name = args.task or (model_info(args.model)["task"] if toy else None)
    if task_name is None:
        raise ApexlensError(
            f"model {args.model!r} has no default task: pass --task (e.g. --task ioi)"
        )
    if toy and task_name != model_info(args.model)["task"]:  # before loading anything
        check_task_fits(get_task(task_name), None, args.model)
    model = load_model(args.model, backend=args.backend)
    kwargs = {"tokenizer": model.tokenizer} if task_name == "ioi" else {}
    task = get_task(task_name, **kwargs)
    check_task_fits(task, model, args.model)
    return model, task


def _path_patch(args: argparse.Namespace) -> int:
    import apexlens
    from apexlens import plotting
    from apexlens.report import write_report

    if args.n < 1:
        raise ApexlensError("--n must be at least 1")
    out = Path(args.out)
    check_out(out)
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
        progress=not args.no_progress,
    )
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
            f"The strongest senders' paths to {receivers}: line width = |normalised effect|, "
            f"red = negative, blue = positive. {sign}",
        ),
        ("values", frame, "One row per sender."),
    ]
    write_report(out / "path_patch.html", figs, title=f"path patching on {args.model}")
    print(frame.sort_values("normalized").head(10).to_string(index=False))
    print(f"wrote {out / 'path_patch.csv'}, {out / 'path_patch.json'}, {out / 'path_patch.html'}")
    return 0


def _apex(args: argparse.Namespace) -> int:
    from apexlens import plotting
    from apexlens.noise import apex
    from apexlens.report import write_report

    sigmas = parse_sigmas(args.sigmas)
    if args.n < 1:
        raise ApexlensError("--n must be at least 1")
    if args.draws < 1:
        raise ApexlensError("--draws must be at least 1")
    sites: Any = split_sites(args.sites)
    if not sites:
        raise ApexlensError("--sites: give at least one site")
    out = Path(args.out)
    check_out(out)
    model, task = _model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    rows = len(sigmas) * args.draws * len(batch)
    noise = "relative" if args.relative else "absolute"
    _say(
        args,
        f"APEX on {args.model}: {len(sigmas)} sigmas x {args.draws} draws x {len(batch)} prompts "
        f"= {rows} noisy forward rows (sites {','.join(sites)}, {noise} noise) ...",
    )
    started = time.perf_counter()
    result = apex(
        model,
        batch.clean_tokens,
        sigmas=sigmas,
        n_draws=args.draws,
        sites=sites if len(sites) > 1 else sites[0],
        relative=args.relative,
        positions=batch.positions,
        seed=args.seed,
    )
    _say(args, f"APEX: done, {rows} rows in {time.perf_counter() - started:.1f} s")
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
    how = f"{'relative' if args.relative else 'absolute'} Gaussian noise at {', '.join(sites)}"
    write_report(
        out / "apex.html",
        [
            (
                "concentration",
                plotting.apex_curves({args.model: result}),
                f"{how}, {args.draws} draws per prompt and sigma (x axis, log scale). Solid "
                "(left axis): share of all predictions taken by the most predicted token; "
                "dotted (right axis): entropy of the predicted tokens. Rising share and "
                "falling entropy at large sigma = the model's predictions concentrate on what "
                "it is biased toward, whatever the prompt.",
            ),
            (
                f"predicted tokens at sigma {big:g}",
                plotting.token_histogram(result, big),
                f"Which tokens the model predicts under the largest noise (sigma = {big:g}), as "
                "a share of all draws over all prompts; one tall bar = a strong bias toward "
                "that token.",
            ),
            ("summary", frame, "One row per noise level."),
        ],
        title=f"APEX on {args.model}",
    )
    print(frame.to_string(index=False))
    print(f"wrote {out / 'apex.csv'}, {out / 'apex.json'}, {out / 'apex.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(_join_negative_values(argv))
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
        if args.command == "visualize":
            from apexlens import cli_visualize

            return cli_visualize.run(args, _model_and_task)
        if args.command == "workbench":
            from apexlens.ui.workbench import cli as cli_workbench

            return cli_workbench.run(args, _model_and_task)
        return _apex(args)
    except ApexlensError as e:
        print(f"apexlens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
