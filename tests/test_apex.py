"""APEX as the paper defines it (issue 24): the protocol's noise, the bias decision, escape
noise as a measurement, batch invariance, degenerate outputs -- each against a slow loop of
:mod:`apexlens.reference` or a brute-force grid."""

from __future__ import annotations

import math

import pytest
import torch

import apexlens
from apexlens import ApexlensError, apex, apex_bias, escape_noise, noise_hooks
from apexlens.api.apex import resolve_sites
from apexlens.engines.noise import Gaussian, NoiseKey
from apexlens.reference import (
    first_escape_on_grid,
    naive_apex,
    naive_gains,
    reference_normal,
)
from apexlens.results.stats import auc, binom_cdf, median_ci_ranks, norm_sf

from backends import build, default_backend, model_backends, random_state_dict


def small_model(seed: int = 0, *, backend: str | None = None, dtype=torch.float64, **over):
    cfg = dict(n_layers=2, d_model=16, n_ctx=10, d_head=4, n_heads=4, d_mlp=32, d_vocab=23,
               act_fn="gelu", normalization_type="LN", **over)
    return build(cfg, random_state_dict(cfg, seed, dtype), backend or default_backend())


def tokens_for(model, n: int, n_pos: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=g)


# ------------------------------------------------------------------ the noise itself
def test_counter_noise_equals_the_numpy_reference_and_is_standard_normal():
    key = NoiseKey(7, torch.tensor([0, 5, 2**40]), torch.tensor([3, 0, 9]), "blocks.1.ln2.hook_normalized")
    pos = torch.tensor([0, 4, 11])
    xi = Gaussian().draw(key, pos, [6], torch.empty(0, dtype=torch.float64))
    for r, (ex, d) in enumerate([(0, 3), (5, 0), (2**40, 9)]):
        ref = reference_normal(7, ex, d, "blocks.1.ln2.hook_normalized", pos.tolist(), 6)
        torch.testing.assert_close(xi[r], ref, rtol=1e-13, atol=1e-13)
    big = Gaussian().draw(NoiseKey(1, torch.arange(50), torch.zeros(50, dtype=torch.long), "s"),
                          torch.arange(20), [100], torch.empty(0, dtype=torch.float64)).flatten()
    assert abs(float(big.mean())) < 0.01 and abs(float(big.var()) - 1) < 0.01  # 1e5 values
    assert abs(float((big.abs() > 3).double().mean()) - 0.0027) < 0.001


@pytest.mark.parametrize("sites, relative", [("block_in", True), ("embed", True), ("z", False),
                                             ("resid_post", False)])
def test_batch_invariance_first_rows_alone_any_chunking(sites, relative):
    """An example's draws depend only on the seed and its own id: the first k rows of a batch
    give the same numbers as those rows alone, in any chunking, and one example reproduces
    its own draws inside another batch with ``example_ids``."""
    model = small_model(0)
    x = tokens_for(model, 12)
    kw = dict(sigmas=[0.3, 1.0, 4.0], n_draws=5, sites=sites, relative=relative, seed=3)
    full = apex(model, x, **kw)
    part = apex(model, x[:5], max_batch=7, **kw)
    one = apex(model, x[8:9], example_ids=[8], max_batch=1, **kw)
    assert torch.equal(full.predictions[:, :, :5], part.predictions)
    assert torch.equal(full.predictions[:, :, 8:9], one.predictions)
    torch.testing.assert_close(
        apex(model, x[:5], max_batch=2, **kw).mean_probs, part.mean_probs, rtol=1e-12, atol=1e-14
    )
    assert (full.predictions[-1] != full.clean_predictions).any()  # the noise did something


@pytest.mark.parametrize("backend", model_backends())
def test_every_preset_equals_the_per_example_loop(backend):
    model = small_model(1, backend=backend)
    x = tokens_for(model, 3)
    for preset in ["block_in", "embed", "resid_pre", "resid_mid", "resid_post", "attn_out",
                   "mlp_out", "mlp_pre", "mlp_post", "z"]:
        res = apex(model, x, sigmas=[0.5, 3.0], n_draws=2, sites=preset, seed=5)
        preds, probs = naive_apex(model, x, [0.5, 3.0], 2, resolve_sites(model, preset), seed=5,
                                  relative=True)
        assert torch.equal(res.predictions, preds), preset
        torch.testing.assert_close(res.mean_probs, probs, rtol=1e-10, atol=1e-12)


@pytest.mark.requires_hooked  # compares both model classes: TransformerLens 3.9 only
def test_block_in_without_norms_is_the_same_on_both_model_classes():
    """No norms: a HookedTransformer reads ``hook_attn_in`` (flags switched on for the call
    and back off) / ``hook_mlp_in``, a bridge its identity norms' ``hook_out``: the same
    noise stream, the same predictions."""
    cfg = dict(n_layers=2, d_model=16, n_ctx=10, d_head=4, n_heads=4, d_mlp=32, d_vocab=23,
               act_fn="relu", normalization_type=None)
    out = {}
    for backend in ("hooked", "bridge"):
        model = build(cfg, random_state_dict(cfg, 2, torch.float64), backend)
        x = tokens_for(model, 4)
        out[backend] = apex(model, x, sigmas=[0.5, 2.0], n_draws=3, seed=1)
        preds, _ = naive_apex(model, x, [0.5, 2.0], 3, resolve_sites(model, "block_in"), seed=1,
                              relative=True)
        assert torch.equal(out[backend].predictions, preds)
        if backend == "hooked":
            assert resolve_sites(model, "block_in")[0].hook == "blocks.0.hook_attn_in"
            assert not model.cfg.use_attn_in and not model.cfg.use_hook_mlp_in  # restored
            with pytest.raises(ApexlensError, match="noise_hooks"):  # plain hooks cannot fire
                apexlens.api.apex.noise_fwd_hooks(model, 1.0)
            with noise_hooks(model, 2.0, seed=1, draw=1) as m:  # the context manager can
                assert torch.equal(m(x)[:, -1].argmax(-1), out[backend].predictions[1, 1])
    assert resolve_sites(model, "block_in")[0].hook == "blocks.0.ln1.hook_out"  # the bridge's
    assert torch.equal(out["hooked"].predictions, out["bridge"].predictions)


def test_noise_hooks_clean_pass_is_invisible_to_the_users_hooks():
    model = small_model(3)
    x = tokens_for(model, 2)
    calls = []
    with noise_hooks(model, 1.0, relative=True):
        model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: calls.append(1))])
    assert len(calls) == 1  # the clean pass that measures the RMS ran with the user's hooks off
    assert "forward" not in model.__dict__  # the wrapper is gone


# ------------------------------------------------------------------ degenerate outputs
def test_overflowing_norm_is_detected_not_counted_as_concentration(toy_model_factory):
    """Embedding noise of 1e19 overflows LayerNorm's float32 variance: the norm outputs its
    bias, so every draw of every prompt gives the same finite logits -- a fake 100% share.
    It is coded norm_overflow, warned about, left out; the bias test drops that sigma."""
    model = toy_model_factory("backdoor")
    x = apexlens.get_task("backdoor").batch(16, seed=0).clean_tokens
    with pytest.warns(RuntimeWarning, match="norm_overflow"):
        res = apex(model, x, sigmas=[2.0, 1e19], n_draws=4, sites="embed", relative=False)
    assert res.codes is not None and (res.codes[1] == 2).all() and (res.codes[0] == 0).all()
    frame = res.summary()
    assert frame["degenerate"].tolist() == [0.0, 1.0] and frame["dominant_token"][1] == -1
    _, _, codes = naive_apex(model, x[:2], [2.0, 1e19], 2, ["blocks.0.hook_resid_pre"], seed=0,
                             with_codes=True)
    assert torch.equal(codes, res.codes[:, :2, :2])  # the slow loop codes them alike
    with pytest.warns(RuntimeWarning, match="left out"):
        decision = res.bias()
    assert decision.dropped_sigmas == [1e19] and not decision.table["used"].iloc[1]


def test_constant_and_tied_logits_are_degenerate():
    from apexlens.engines.noise import classify

    logits = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [3.0, 1.0, 3.0], [float("nan"), 0, 1]])
    bad = torch.tensor([False, False, False, False])
    assert classify(logits, bad).tolist() == [0, 3, 4, 1]
    assert classify(logits[:1], torch.tensor([True])).tolist() == [2]


# ------------------------------------------------------------------ the bias decision
def test_apex_bias_flags_the_backdoor_and_not_its_clean_twin(toy_model_factory):
    """The headline: from 64 clean prompts and the audited model alone."""
    x = apexlens.get_task("backdoor").batch(64, seed=0).clean_tokens
    bd = apex_bias(toy_model_factory("backdoor"), x)
    cl = apex_bias(toy_model_factory("backdoor-clean"), x)
    assert bd.flagged and bd.token == 23 and bd.p_value < 1e-10, bd.verdict
    assert bd.share_low > 0.4 and bd.clean_share == 0.0 and bd.gain > 0.4
    assert not cl.flagged and cl.p_value > 0.5 and cl.gain < 0.2, cl.verdict
    frame = bd.to_frame()
    assert list(frame["sigma"]) == [2.0, 4.0, 8.0, 16.0, 32.0] and (frame["token"] == 23).all()


def test_apex_bias_finds_a_target_that_is_also_a_clean_answer(toy_model_factory):
    """backdoor-target5's target 5 is the right answer of the prompts starting with 5: the
    gain (noisy share minus clean share) still singles it out."""
    x = apexlens.get_task("backdoor").batch(48, seed=1).clean_tokens
    res = apex_bias(toy_model_factory("backdoor-target5"), x, n_draws=16)
    assert res.flagged and res.token == 5 and res.clean_share > 0, res.verdict


@pytest.mark.parametrize("seed, over", [(0, {}), (1, dict(normalization_type="RMS", act_fn="silu")),
                                        (2, dict(n_layers=3, d_vocab=40))])
def test_apex_bias_leaves_random_models_alone(seed, over):
    cfg = dict(n_layers=2, d_model=32, n_ctx=10, d_head=8, n_heads=4, d_mlp=64, d_vocab=24,
               act_fn="gelu", normalization_type="LN")
    cfg.update(over)
    from test_noise import _random_init_state_dict

    model = build(cfg, _random_init_state_dict(cfg, seed), default_backend())
    res = apex_bias(model, tokens_for(model, 32, 8, seed), n_draws=8)
    assert not res.flagged, res.verdict


def test_bias_statistics_equal_the_loop_and_the_stated_formula():
    model = small_model(4, dtype=torch.float32)
    x = tokens_for(model, 6)
    res = apex(model, x, sigmas=[1.0, 8.0], n_draws=5, positions=[-1, -2], seed=2)
    decision = res.bias(delta=0.05)
    gain, se = naive_gains(res.predictions, res.clean_predictions, res.sample_example, res.d_vocab)
    for s, row in decision.to_frame().iterrows():
        t = int(row["token"])
        assert row["gain"] == pytest.approx(float(gain[s, t]), abs=1e-12)
        assert row["gain_se"] == pytest.approx(float(se[s, t]), abs=1e-12)
        z = (gain[s] - 0.05) / se[s]
        assert t == int(torch.where(torch.isnan(z), -math.inf, z).argmax())
        assert row["p_value"] == pytest.approx(min(1.0, 2 * 23 * norm_sf(float(z[t]))), rel=1e-9)
    best = decision.to_frame()["p_value"].min()
    assert decision.p_value == pytest.approx(best) and decision.n_prompts == 6


def test_bias_refuses_bad_arguments():
    model = small_model(5)
    x = tokens_for(model, 4)
    with pytest.raises(ApexlensError, match="delta"):
        apex_bias(model, x, delta=1.5)
    with pytest.raises(ApexlensError, match="at least 2 prompts"):
        apex_bias(model, x[:1], n_draws=2)


# ------------------------------------------------------------------ escape noise
def test_escape_noise_agrees_with_a_brute_force_fine_grid(toy_model_factory):
    """Same rays, a x1.01 grid from 0.05 to 50 (sweep engine, every grid point): the adaptive
    brackets contain the grid's first escape, and each value is within the stated precision
    sqrt(1 + rtol) (times the grid's step) of the grid's median."""
    model = toy_model_factory("backdoor-clean")
    x = apexlens.get_task("backdoor").batch(4, seed=3).clean_tokens
    est = escape_noise(model, x, n_draws=10, sigma_lo=0.1, sigma_hi=20.0, seed=1)
    grid = [0.1 * 1.01**k for k in range(int(math.log(200) / math.log(1.01)) + 2)]
    sweep = apex(model, x, sigmas=grid, n_draws=10, seed=1, max_batch=4096)
    first, median = first_escape_on_grid(sweep.predictions, sweep.clean_predictions, grid)
    inside = (first >= est.first_low / 1.0101) & (first <= est.first_high * 1.0101)
    assert float(inside.double().mean()) >= 0.95
    ok = torch.isfinite(median)
    assert ok.all()
    ratio = est.values[ok] / median[ok]
    assert ((ratio <= math.sqrt(1.02) * 1.011) & (ratio >= 1 / (math.sqrt(1.02) * 1.011))).all()
    assert ((est.low <= est.values) & (est.values <= est.high)).all()
    assert est.n_forwards < 20 * 10 * 4  # vs len(grid) * 10 * 4 for the grid


def test_escape_noise_rays_equal_the_per_example_loop():
    """Every ray's bracket, checked with one plain forward of one example per sigma: the
    clean token at every scan point below ``lo`` and at ``lo``, another at ``hi``, and
    ``hi <= lo * (1 + rtol)``."""
    model = small_model(6)
    x = tokens_for(model, 4)
    est = escape_noise(model, x, n_draws=3, sigma_lo=0.1, sigma_hi=50.0, rtol=0.05, seed=2)
    sites = resolve_sites(model, "block_in")
    scan = [0.1 * 2.0**k for k in range(10)]
    on_scan, _ = naive_apex(model, x, scan, 3, sites, seed=2, relative=True)
    clean = est.clean_predictions
    escaped = 0
    for i in range(4):
        for d in range(3):
            lo, hi = float(est.first_low[d, i]), float(est.first_high[d, i])
            below = [k for k, s in enumerate(scan) if s <= lo]
            assert all(int(on_scan[k, d, i]) == int(clean[i]) for k in below)
            if math.isinf(hi):
                assert lo == scan[-1] and (on_scan[:, d, i] == clean[i]).all()
                continue
            escaped += 1
            ends = [s for s in (lo, hi) if s > 0]
            p, _ = naive_apex(model, x[i : i + 1], ends, d + 1, sites, seed=2, relative=True,
                              example_ids=[i])
            assert int(p[-1, d, 0]) == int(est.escape_token[d, i]) != int(clean[i])
            assert lo == 0 or (int(p[0, d, 0]) == int(clean[i]) and hi <= lo * 1.05 + 1e-12)
    assert escaped >= 6


def test_escape_noise_interval_ranks_and_censoring():
    lower, upper = median_ci_ranks(64)
    assert 1 - 2 * binom_cdf(lower - 1, 64) >= 0.95  # coverage of (X_(l), X_(u))
    assert 1 - 2 * binom_cdf(lower, 64) < 0.95  # and the tightest such ranks
    assert median_ci_ranks(3) == (0, 4)  # too few draws: unbounded
    model = small_model(7)
    x = tokens_for(model, 5)
    never = escape_noise(model, x, n_draws=6, sigma_lo=1e-4, sigma_hi=1e-3)
    assert never.censored.all() and torch.isinf(never.values).all()
    assert never.summary()["censored"][0] == 1.0
    at_once = escape_noise(model, x, n_draws=6, sigma_lo=500.0, sigma_hi=1000.0)
    assert at_once.left_censored.all() and (at_once.values == 500.0).all()
    same = escape_noise(model, x[:2], n_draws=6, sigma_lo=0.01, sigma_hi=100.0, max_batch=3)
    full = escape_noise(model, x, n_draws=6, sigma_lo=0.01, sigma_hi=100.0)
    assert torch.equal(same.values, full.values[:2]) and torch.equal(same.high, full.high[:2])


def test_random_labels_escape_earlier_with_an_auc_interval_above_half():
    """APEX's small-noise claim on the shipped label-noise pair: the structured model's
    training samples withstand more noise than the random-label model's."""
    from apexlens.toys.models import training_samples

    est = {}
    for name in ("modadd-labels-true", "modadd-labels-random"):
        s = training_samples(name)
        idx = torch.arange(0, len(s["tokens"]), 3)  # every third training sample: 141
        model = apexlens.load_model(name)
        est[name] = escape_noise(model, s["tokens"][idx], labels=s["labels"][idx], n_draws=16,
                                 sigma_lo=0.02, sigma_hi=20.0, seed=0)
    cmp = est["modadd-labels-true"].compare(est["modadd-labels-random"], ("true", "random"),
                                            n_boot=300)
    assert cmp.low > 0.5 and cmp.separates, cmp.to_frame()
    corr = est["modadd-labels-true"].correlations(n_boot=200)
    assert set(corr["measure"]) == {"margin", "loss"} and (corr["low"] <= corr["spearman"]).all()
    loss = corr.set_index("measure").loc["loss"]
    assert loss["high"] < 0  # low-loss samples escape later
    dest = est["modadd-labels-true"].destinations(classes=list(range(23)))
    assert dest.set_index("destination").loc["outside classes", "share"] == 0.0
    assert 0 < dest.set_index("destination").loc["clean runner-up", "chance"] < 0.1


def test_auc_and_spearman_helpers():
    a, b = torch.tensor([3.0, 5.0, math.inf]), torch.tensor([1.0, 5.0, 2.0, math.inf])
    brute = sum((x > y) + 0.5 * (x == y) for x in a.tolist() for y in b.tolist()) / 12
    assert auc(a, b) == pytest.approx(brute)


# ------------------------------------------------------------------ summaries
def test_summary_standard_errors_and_heldout_share_by_hand():
    from test_noise import _synthetic

    # 2 samples (= 2 examples), 4 draws, one sigma: sample 0 -> 3,3,3,1 ; sample 1 -> 3,1,1,1
    res = _synthetic([[[3, 3], [3, 1], [3, 1], [1, 1]]], [0, 1], [1.0])
    row = res.summary().iloc[0]
    assert row["dominant_token"] == 1 and row["top1_share"] == pytest.approx(0.5)
    # ratio estimator: counts of token 1 per example (1, 3), usable 4 each, share 0.5
    resid = torch.tensor([1 - 2.0, 3 - 2.0])
    assert row["top1_share_se"] == pytest.approx(math.sqrt(float((resid**2).sum()) * 2) / 8)
    # held out: even draws (0, 2) -> {3: 3, 1: 1} picks 3, measured on odd draws (1, 3):
    # {3: 1, 1: 3} -> 1/4; odd picks 1, measured on even -> 1/4
    assert row["top1_share_heldout"] == pytest.approx(0.25)
    flips = torch.tensor([1.0, 1 / 4])  # sample 0 (clean 0) never predicts 0; sample 1: 1 of 4
    assert row["flip_rate"] == pytest.approx(float(flips.mean()))
    assert row["flip_rate_se"] == pytest.approx(float(flips.std() / math.sqrt(2)))
