"""``apexlens apex``: an APEX noise sweep, the concentration of the predictions, and the bias
decision (:func:`apexlens.apex_bias`) from the model alone."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.ui.cli.common import (
    add_common,
    check_out,
    model_and_task,
    parse_sigmas,
    provenance,
    say,
    split_sites,
    write_json,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("apex", help="APEX: noise sweep and prediction concentration")
    add_common(p)
    p.add_argument(
        "--sigmas",
        default="0.25,0.5,1,2,4,8",
        help="comma-separated noise levels >= 0, increasing (default: 0.25,0.5,1,2,4,8; "
        "negative numbers are refused, '--sigmas -1,2' included)",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=32,
        help="Monte-Carlo forward passes per prompt and sigma (default: 32)",
    )
    p.add_argument(
        "--sites",
        default="block_in",
        help="where the noise goes: presets or hook names, comma-separated; a preset may name "
        "layers, 'z:0,1' is heads' outputs in layers 0 and 1 (default: block_in, every "
        "sublayer's input after its norm: the APEX paper's protocol on a transformer and "
        "apexlens.apex's default; 'embed' = input perturbation, the special case; 'resid_post' "
        "= every block's output)",
    )
    scale = p.add_mutually_exclusive_group()
    scale.add_argument(
        "--relative",
        action="store_true",
        default=True,
        help="sigma in units of each site's clean activation RMS (default: relative, as in "
        "apexlens.apex; block_in's activations have RMS 1)",
    )
    scale.add_argument(
        "--absolute",
        dest="relative",
        action="store_false",
        help="absolute sigma, as in the paper (default: relative; on block_in the two agree)",
    )


def run(args: argparse.Namespace) -> int:
    sigmas = parse_sigmas(args.sigmas)  # the arguments first: an error comes back at once
    if args.n < 1:
        raise ApexlensError("--n must be at least 1")
    if args.draws < 1:
        raise ApexlensError("--draws must be at least 1")
    sites: Any = split_sites(args.sites)
    if not sites:
        raise ApexlensError("--sites: give at least one site")
    out = Path(args.out)
    check_out(out)

    from apexlens.api.apex import apex, apex_bias
    from apexlens.ui import plotting
    from apexlens.ui.report import write_report

    model, task = model_and_task(args)
    batch = task.batch(args.n, seed=args.seed)
    rows = len(sigmas) * args.draws * len(batch)
    noise = "relative" if args.relative else "absolute"
    say(
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
        progress=not args.no_progress,
    )
    say(args, f"APEX: done, {rows} rows in {time.perf_counter() - started:.1f} s")
    decision = apex_bias(
        model, batch.clean_tokens, n_draws=args.draws, sites=sites if len(sites) > 1 else sites[0],
        relative=args.relative, positions=batch.positions, seed=args.seed,
        progress=not args.no_progress,
    ) if len(batch) >= 2 else None
    out.mkdir(parents=True, exist_ok=True)
    frame = result.summary()
    frame.to_csv(out / "apex.csv", index=False)
    files = [str(out / f) for f in ("apex.csv", "apex.json", "apex.html")]
    if decision is not None:
        decision.to_frame().to_csv(out / "apex_bias.csv", index=False)
        files.insert(1, str(out / "apex_bias.csv"))
    write_json(
        out / "apex.json",
        {"model": args.model, "task": task.name, "summary": frame.to_dict("records"),
         "bias": None if decision is None else decision.summary().to_dict("records")[0],
         "verdict": None if decision is None else decision.verdict},
        args,
        files,
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
            *(
                [(
                    "bias decision",
                    plotting.apex_bias_plot({args.model: decision}),
                    "apex_bias, from the model alone: for each large noise level, the token "
                    "whose share of the noisy predictions most exceeds its clean share (gain, "
                    f"95% interval) against the tolerance delta (dashed). {decision.verdict}",
                )]
                if decision is not None else []
            ),
        ],
        title=f"APEX on {args.model}",
        provenance=provenance(args, files),
    )
    print(frame.to_string(index=False))
    if decision is not None:
        print(f"apex_bias: {decision.verdict}")
    print(f"wrote {', '.join(files)}")
    return 0

