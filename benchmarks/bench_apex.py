"""APEX sweep speed: batched :func:`apexlens.apex` against a per-draw ``run_with_hooks`` loop.

The workload: 8 noise levels x 32 draws, noise injected at layer 6 (``blocks.6.hook_resid_pre``)
of a random-init GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, d_mlp 3072,
vocab 50257), a batch of 8 prompts x 16 tokens, the last position scored.

* **loop**: what one would write by hand -- one full forward of the batch per (sigma, draw)
  under :func:`apexlens.noise_hooks` (draw ``d``: the same noise apex gives that example and
  draw, at every sigma), argmax at the last position; the same predictions up to rounding.
* **apex**: all (sigma, draw) copies stacked along the batch, starting from the cached clean
  residual entering block 6 (blocks 0-5 are never re-run), logits only at the last position.

Then the cost of the two APEX measurements in forward passes per sample, on the shipped
``backdoor`` model: :func:`apexlens.apex_bias` (forwards per prompt) and
:func:`apexlens.escape_noise` (forwards per sample, against a grid of the same precision).

Run: ``python benchmarks/bench_apex.py`` (``--help`` for a smaller workload).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

GPT2_SMALL = dict(
    n_layers=12,
    d_model=768,
    n_heads=12,
    d_head=64,
    d_mlp=3072,
    d_vocab=50257,
    n_ctx=1024,
    act_fn="gelu_new",
    normalization_type="LN",
)


def _gpt2_small_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """GPT-2-style random init (weights N(0, 0.02), norms 1/0) in HookedTransformer format."""
    c = GPT2_SMALL
    m, h, dh, f, v = c["d_model"], c["n_heads"], c["d_head"], c["d_mlp"], c["d_vocab"]
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(shape, generator=g)

    sd = {"embed.W_E": w(v, m), "pos_embed.W_pos": w(c["n_ctx"], m)}
    for layer in range(c["n_layers"]):
        p = f"blocks.{layer}"
        sd.update(
            {
                f"{p}.ln1.w": torch.ones(m),
                f"{p}.ln1.b": torch.zeros(m),
                f"{p}.ln2.w": torch.ones(m),
                f"{p}.ln2.b": torch.zeros(m),
                f"{p}.attn.W_Q": w(h, m, dh),
                f"{p}.attn.W_K": w(h, m, dh),
                f"{p}.attn.W_V": w(h, m, dh),
                f"{p}.attn.W_O": w(h, dh, m),
                f"{p}.attn.b_Q": torch.zeros(h, dh),
                f"{p}.attn.b_K": torch.zeros(h, dh),
                f"{p}.attn.b_V": torch.zeros(h, dh),
                f"{p}.attn.b_O": torch.zeros(m),
                f"{p}.mlp.W_in": w(m, f),
                f"{p}.mlp.b_in": torch.zeros(f),
                f"{p}.mlp.W_out": w(f, m),
                f"{p}.mlp.b_out": torch.zeros(m),
            }
        )
    sd.update(
        {
            "ln_final.w": torch.ones(m),
            "ln_final.b": torch.zeros(m),
            "unembed.W_U": w(m, v),
            "unembed.b_U": torch.zeros(v),
        }
    )
    return sd


def gpt2_small_random(seed: int = 0, device: str = "cpu", backend: str = "hooked") -> Any:
    """A random-init model of GPT-2 small's shape (no download), as either TL model class."""
    if backend == "bridge":
        from apexlens.model.convert import to_bridge

        return to_bridge(GPT2_SMALL, _gpt2_small_state_dict(seed), device=device)
    try:
        from apexlens.toys.models import random_gpt2_small  # type: ignore[attr-defined]

        return random_gpt2_small(seed=seed).to(device)
    except (ImportError, AttributeError, TypeError):
        pass
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**GPT2_SMALL, seed=seed, device=device))
    model.eval()
    return model


def run_loop(
    model: Any, tokens: torch.Tensor, sigmas: list[float], n_draws: int, site: str, seed: int
) -> torch.Tensor:
    """What one writes by hand: one full forward of the batch per (sigma, draw) under
    :func:`apexlens.noise_hooks` (the same noise as apex: keyed by seed, example and draw)."""
    import apexlens

    preds = torch.empty(len(sigmas), n_draws, tokens.shape[0], dtype=torch.long)
    with torch.no_grad():
        for s, sigma in enumerate(sigmas):
            for d in range(n_draws):
                with apexlens.noise_hooks(
                    model, sigma, sites=site, seed=seed, draw=d, relative=False
                ):
                    preds[s, d] = model(tokens)[:, -1].argmax(-1).cpu()
    return preds


def apex_costs(quick: bool) -> dict[str, float]:
    """The cost of the two APEX measurements in forward passes per sample (one example's
    noisy pass = one forward), on the shipped backdoor model, with their wall time."""
    import apexlens

    model = apexlens.load_model("backdoor")
    n = 16 if quick else 64
    tokens = apexlens.get_task("backdoor").batch(n, seed=0).clean_tokens
    t0 = time.perf_counter()
    decision = apexlens.apex_bias(model, tokens, n_draws=8 if quick else 32)
    t_bias = time.perf_counter() - t0
    per_prompt = len(decision.to_frame()) * decision.n_draws
    draws = 16 if quick else 64
    t0 = time.perf_counter()
    esc = apexlens.escape_noise(model, tokens, n_draws=draws)
    t_esc = time.perf_counter() - t0
    per_sample = esc.n_forwards / esc.n_samples
    grid = math.ceil(math.log(esc.sigma_hi / esc.sigma_lo) / math.log(1 + esc.rtol)) + 1
    print(f"APEX measurements on the shipped backdoor model ({n} prompts, cpu):")
    print(f"{'apex_bias':>32}: {per_prompt:8.0f} forwards per prompt "
          f"({len(decision.to_frame())} sigmas x {decision.n_draws} draws), {t_bias:6.2f} s, "
          f"{decision.verdict.split(':')[0]}")
    print(f"{'escape_noise':>32}: {per_sample:8.0f} forwards per sample "
          f"({per_sample / draws:.1f} per direction x {draws} directions), {t_esc:6.2f} s")
    print(f"{'a grid at the same precision':>32}: {grid * draws:8.0f} forwards per sample "
          f"({grid} sigmas at x{1 + esc.rtol:g} from {esc.sigma_lo:g} to {esc.sigma_hi:g}): "
          f"{grid * draws / per_sample:.0f}x more")
    return {"bias_forwards_per_prompt": per_prompt, "bias_s": t_bias,
            "escape_forwards_per_sample": per_sample, "escape_s": t_esc}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sigmas", type=int, default=8, help="number of noise levels")
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--layer", type=int, default=6, help="noise at blocks.LAYER.hook_resid_pre")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="hooked", choices=["hooked", "bridge"])
    parser.add_argument("--quick", action="store_true", help="4 draws instead of 32")
    args = parser.parse_args(argv)
    if args.quick:
        args.draws = min(args.draws, 4)

    import apexlens

    torch.manual_seed(0)
    try:
        model = gpt2_small_random(device=args.device, backend=args.backend)
    except ImportError:  # TransformerLens 4.x: no HookedTransformer
        args.backend = "bridge"
        model = gpt2_small_random(device=args.device, backend="bridge")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq), generator=g)
    tokens = tokens.to(args.device)
    sigmas = torch.linspace(0.5, 8.0, args.sigmas).tolist()
    site = f"blocks.{args.layer}.hook_resid_pre"

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up (allocator, kernels) on a tiny sweep, not timed
    kw = dict(sites=site, seed=0, relative=False)
    apexlens.apex(model, tokens, sigmas=sigmas[:1], n_draws=1, **kw)
    run_loop(model, tokens, sigmas[:1], 1, site, 0)

    sync()
    t0 = time.perf_counter()
    res = apexlens.apex(model, tokens, sigmas=sigmas, n_draws=args.draws, **kw)
    sync()
    t_apex = time.perf_counter() - t0

    t0 = time.perf_counter()
    loop_preds = run_loop(model, tokens, sigmas, args.draws, site, 0)
    sync()
    t_loop = time.perf_counter() - t0

    agree = float((loop_preds == res.predictions).double().mean())
    ratio = t_loop / t_apex
    n_pass = args.sigmas * args.draws
    print(
        f"APEX sweep, {args.sigmas} sigmas x {args.draws} draws at {site}, "
        f"batch {args.batch} x {args.seq} tokens, GPT-2-small shape (random init), "
        f"{args.backend}, {args.device}"
    )
    print(f"{'per-draw run_with_hooks loop':>32}: {t_loop:8.2f} s  ({n_pass} forward passes)")
    print(f"{'apexlens.apex (batched)':>32}: {t_apex:8.2f} s")
    print(f"{'speed-up':>32}: {ratio:8.2f} x   (floor 1.8x)")
    print(f"{'same predictions as the loop':>32}: {agree:8.2%}")
    out = {"loop_s": t_loop, "apex_s": t_apex, "ratio": ratio, "agreement": agree}
    return {**out, **apex_costs(args.quick)}


if __name__ == "__main__":
    main()
