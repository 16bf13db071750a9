"""Where should APEX's noise go in a transformer? The evidence behind ``sites="block_in"``.

1. **Large noise** -- the shipped ``backdoor`` and its clean twin, 64 clean prompts, 32 draws:
   the backdoor target's share of all noisy predictions (twin in brackets) for each mapping of
   "noise after each layer's activation" and each sigma. A mapping that exposes the bias
   separates the two at large sigma; one whose noise reaches the unembedding through the skip
   connections goes flat at the unembedding's geometry (about 0.08 for both).
2. **Small noise** -- the shipped ``modadd-labels-true`` / ``-random`` pair: AUC of the
   training samples' escape noise, true > random, with a bootstrap interval, per mapping.
3. **Escape noise against brute force** -- ``backdoor-clean``, 16 prompts x 32 directions:
   the adaptive search against every point of a x1.01 grid along the same directions (share
   of rays whose grid escape lies in the search's bracket, error of the medians, forwards).

Run: ``python benchmarks/apex_protocols.py [--quick] [--parts large,small,escape]`` (minutes;
``--quick``: fewer draws, samples and sigmas).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

MAPPINGS = [  # (name, sites, relative, what it is)
    ("block_in", "block_in", True, "every sublayer's input after its norm (default)"),
    ("embed (rel.)", "embed", True, "input perturbation: the special case"),
    ("embed (abs.)", "embed", False, "input perturbation, absolute sigma"),
    ("resid_pre", "resid_pre", False, "every block's input, on the residual stream"),
    ("resid_post", "resid_post", False, "every block's output (apexlens' old default)"),
    ("mlp_post", "mlp_post", False, "phi(z_l): the paper's words taken literally"),
    ("mlp_pre", "mlp_pre", False, "z_l, an MLP's pre-activation"),
    ("attn_out", "attn_out", False, "attention outputs"),
    ("z", "z", False, "every head's output"),
]


def large_noise(quick: bool) -> None:
    import apexlens

    models = {n: apexlens.load_model(n) for n in ("backdoor", "backdoor-clean")}
    x = apexlens.get_task("backdoor").batch(32 if quick else 64, seed=0).clean_tokens
    sigmas = [0.5, 2.0, 8.0, 64.0] if quick else [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 1024.0]
    draws = 8 if quick else 32
    print(f"backdoor target (23) share of the noisy predictions: backdoor (clean twin), "
          f"{len(x)} prompts x {draws} draws")
    print(f"{'mapping':>14}  " + "  ".join(f"{'sigma=' + format(s, 'g'):>13}" for s in sigmas))
    for name, sites, relative, _ in MAPPINGS:
        shares = {}
        for m, model in models.items():
            res = apexlens.apex(model, x, sigmas=sigmas, n_draws=draws, sites=sites,
                                relative=relative, seed=0)
            usable = (res.predictions >= 0).double().sum(dim=(1, 2))
            shares[m] = (res.predictions == 23).double().sum(dim=(1, 2)) / usable
        cells = [f"{float(a):.2f} ({float(b):.2f})" for a, b in zip(shares["backdoor"],
                                                                     shares["backdoor-clean"],
                                                                     strict=True)]
        print(f"{name:>14}  " + "  ".join(f"{c:>13}" for c in cells), flush=True)


def small_noise(quick: bool) -> None:
    import apexlens
    from apexlens.toys.models import training_samples

    draws = 8 if quick else 32
    step = 6 if quick else 1
    print(f"\nescape noise, training samples of modadd-labels-true vs -random ({draws} "
          f"directions per sample): AUC P(true > random) [95% bootstrap]")
    for name, sites, relative, _ in MAPPINGS:
        if name in ("embed (abs.)", "mlp_pre", "z", "attn_out"):
            continue
        t0 = time.perf_counter()
        est = {}
        for m in ("modadd-labels-true", "modadd-labels-random"):
            s = training_samples(m)
            idx = torch.arange(0, len(s["tokens"]), step)
            est[m] = apexlens.escape_noise(apexlens.load_model(m), s["tokens"][idx], sites=sites,
                                           relative=relative, n_draws=draws, sigma_lo=1e-3,
                                           sigma_hi=1e3, labels=s["labels"][idx])
        cmp = est["modadd-labels-true"].compare(est["modadd-labels-random"], n_boot=500)
        med = [float(e.values.median()) for e in est.values()]
        print(f"{name:>14}: AUC {cmp.auc:.3f} [{cmp.low:.3f}, {cmp.high:.3f}]; median escape "
              f"{med[0]:.3g} vs {med[1]:.3g} ({time.perf_counter() - t0:.0f} s)", flush=True)


def escape_check(quick: bool) -> None:
    import math

    import apexlens
    from apexlens.reference import first_escape_on_grid

    model = apexlens.load_model("backdoor-clean")
    n, draws = (6, 8) if quick else (16, 32)
    x = apexlens.get_task("backdoor").batch(n, seed=3).clean_tokens
    lo, hi = 0.05, 50.0
    t0 = time.perf_counter()
    est = apexlens.escape_noise(model, x, n_draws=draws, sigma_lo=lo, sigma_hi=hi, seed=1)
    t_est = time.perf_counter() - t0
    grid = [lo * 1.01**k for k in range(int(math.log(hi / lo) / math.log(1.01)) + 2)]
    t0 = time.perf_counter()
    sweep = apexlens.apex(model, x, sigmas=grid, n_draws=draws, seed=1)
    t_grid = time.perf_counter() - t0
    first, median = first_escape_on_grid(sweep.predictions, sweep.clean_predictions, grid)
    fin = torch.isfinite(first) & torch.isfinite(est.first_high)
    inside = (first >= est.first_low / 1.0101) & (first <= est.first_high * 1.0101)
    ok = torch.isfinite(median) & torch.isfinite(est.values)
    err = (est.values[ok] / median[ok] - 1).abs()
    # coverage: intervals from disjoint sets of 16 directions vs the median of all directions
    many = apexlens.escape_noise(model, x, n_draws=8 * draws, sigma_lo=lo, sigma_hi=hi, seed=2)
    population = many.values
    covered = []
    for j in range(0, 8 * draws, 16):
        part = type(many).from_rays(
            many.first_low[j : j + 16], many.first_high[j : j + 16],
            many.escape_token[j : j + 16], 0.95,
            **{f: getattr(many, f) for f in ("clean_predictions", "clean_runner_up",
               "clean_margin", "prompt_tokens", "sample_position", "d_vocab", "sigma_lo",
               "sigma_hi", "rtol", "n_forwards", "n_degenerate", "sites", "relative", "seed")},
        )
        covered.append((part.low <= population) & (population <= part.high))
    coverage = float(torch.stack(covered).double().mean())
    print(f"\nescape noise vs a x1.01 grid ({n} samples x {draws} directions, backdoor-clean, "
          f"block_in): {float(inside[fin].double().mean()):.3f} of the escaped rays inside the "
          f"search's bracket; medians within {float(err.max()):.2%} (mean {float(err.mean()):.2%}); "
          f"{est.n_forwards} forwards ({t_est:.1f} s) vs {len(grid) * n * draws} ({t_grid:.1f} s); "
          f"95% intervals from 16 directions cover the median of {8 * draws} in "
          f"{coverage:.3f} of {len(covered) * n} cases")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="large,small,escape",
                        help="which parts to run, comma-separated (default: all three)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    for name, _, _, what in MAPPINGS:
        print(f"  {name:>14}: {what}", file=sys.stderr)
    if "large" in parts:
        large_noise(args.quick)
    if "small" in parts:
        small_noise(args.quick)
    if "escape" in parts:
        escape_check(args.quick)


if __name__ == "__main__":
    main()
