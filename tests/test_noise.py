"""APEX: activation-noise injection and noise-induced prediction concentration."""

from __future__ import annotations

import math

import pytest
import torch

from apexlens import ApexResult, apex, compare, noise_hooks
from apexlens.api.apex import resolve_sites
from apexlens.model import ApexlensError
from apexlens.reference import naive_apex, reference_normal

from backends import (
    build,
    default_backend,
    hooked_param_shapes,
    model_backends,
    random_state_dict,
)


def random_model(
    seed: int = 0,
    *,
    backend: str | None = None,
    dtype=torch.float64,
    n_layers: int = 3,
    d_vocab: int = 41,
):
    """A small model with weights far from init, as either TL model class."""
    cfg = dict(
        n_layers=n_layers,
        d_model=24,
        n_ctx=12,
        d_head=6,
        n_heads=4,
        d_mlp=48,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
    )
    return build(cfg, random_state_dict(cfg, seed, dtype), backend or default_backend())


def hook_count(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}  # a bridge has aliases
    return sum(len(hp._forward_hooks) for hp in points.values())


def _tokens(model, n: int = 6, n_pos: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=g)


loop_reference = naive_apex  # the slow loop lives in apexlens.reference


SITE_CASES = [
    "block_in",
    "resid_post",
    "embed",
    "resid_pre:1",
    "z:1",
    "mlp_out",
    ["hook_embed", "blocks.1.hook_resid_mid"],
    ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"],
]


@pytest.mark.parametrize("backend", model_backends())
@pytest.mark.parametrize("sites", SITE_CASES)
def test_batched_sweep_equals_per_draw_loop(sites, backend):
    model = random_model(0, backend=backend)
    tokens = _tokens(model)
    sigmas = [0.0, 0.3, 1.0, 3.0]
    res = apex(
        model, tokens, sigmas=sigmas, n_draws=3, sites=sites, seed=7, max_batch=10, relative=False
    )
    names = resolve_sites(model, sites)
    preds, probs = loop_reference(model, tokens, sigmas, 3, names, seed=7)
    assert torch.equal(res.predictions, preds)
    torch.testing.assert_close(res.mean_probs, probs, rtol=1e-10, atol=1e-12)
    # the noise really changed something at the larger sigmas
    assert (res.predictions[-1] != res.clean_predictions).any()


@pytest.mark.parametrize("sites", ["resid_post", "z:0,2", "embed"])
def test_relative_noise_and_noise_positions_equal_loop(sites):
    model = random_model(1)
    tokens = _tokens(model, n=4)
    sigmas = [0.2, 0.7, 2.0]
    names = resolve_sites(model, sites)
    for noise_positions in (None, [2, 5]):
        res = apex(
            model,
            tokens,
            sigmas=sigmas,
            n_draws=3,
            sites=sites,
            relative=True,
            noise_positions=noise_positions,
            seed=3,
            max_batch=5,
        )
        preds, probs = loop_reference(
            model, tokens, sigmas, 3, names, seed=3, relative=True, noise_positions=noise_positions
        )
        assert torch.equal(res.predictions, preds)
        torch.testing.assert_close(res.mean_probs, probs, rtol=1e-10, atol=1e-12)


def test_relative_scale_is_clean_rms_times_sigma():
    """Relative noise at a single site: noisy = clean + sigma * RMS(clean, last axis) * xi,
    xi from the counter-based generator (draw 0 for the first pass, 1 for the next)."""
    model = random_model(2, n_layers=1)
    tokens = _tokens(model, n=2)
    seen = {}

    def grab(key):
        def fn(act, hook):
            seen[key] = act.detach().clone()

        return fn

    site = "blocks.0.hook_resid_pre"
    model.run_with_hooks(tokens, fwd_hooks=[(site, grab("clean"))])
    with noise_hooks(model, 0.5, sites="embed", relative=True, seed=3):
        model.run_with_hooks(tokens, fwd_hooks=[(site, grab("noisy0"))])  # fires after the noise
        model.run_with_hooks(tokens, fwd_hooks=[(site, grab("noisy1"))])
    clean = seen["clean"]
    rms = clean.pow(2).mean(-1, keepdim=True).sqrt()
    for draw in (0, 1):
        xi = torch.stack(
            [reference_normal(3, b, draw, site, range(clean.shape[1]), clean.shape[2]) for b in range(2)]
        )
        torch.testing.assert_close(seen[f"noisy{draw}"], clean + 0.5 * rms * xi, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(seen["noisy0"], seen["noisy1"])  # each pass is a new draw
    assert not torch.allclose(seen["noisy0"], clean + 0.5 * xi)  # it is not absolute noise


@pytest.mark.parametrize("relative", [True, False])
def test_noise_hooks_loop_equals_apex(relative):
    """A user's own loop under noise_hooks gives apex's numbers: the same noise for the same
    seed, example and draw; relative noise scaled by the clean RMS in both."""
    model = random_model(3)
    tokens = _tokens(model, n=5)
    sigmas = [0.0, 0.5, 2.0]
    res = apex(model, tokens, sigmas=sigmas, n_draws=4, seed=11, relative=relative)
    for s, sigma in enumerate(sigmas):
        with noise_hooks(model, sigma, seed=11, relative=relative):  # pass k is draw k
            logits = [model(tokens) for _ in range(4)]
        for d in range(4):
            assert torch.equal(logits[d][:, -1].argmax(-1), res.predictions[s, d])
            with noise_hooks(model, sigma, seed=11, relative=relative, draw=d):  # or by number
                assert torch.equal(model(tokens)[:, -1].argmax(-1), res.predictions[s, d])
    assert hook_count(model) == 0 and "forward" not in model.__dict__


def test_sigma_zero_reproduces_clean_predictions_float32():
    model = random_model(4, dtype=torch.float32)
    tokens = _tokens(model, n=8)
    clean = model(tokens)[:, -1].argmax(-1)
    for sites in ("resid_post", "embed", "resid_pre:2", "z", ["hook_pos_embed"]):
        res = apex(model, tokens, sigmas=[0.0, 1.0], n_draws=5, sites=sites, seed=0)
        assert torch.equal(res.clean_predictions, clean)
        assert torch.equal(res.predictions[0], clean.expand(5, -1))
        assert res.summary()["flip_rate"][0] == 0.0


def test_seed_reproducible_and_different_seed_differs():
    model = random_model(5)
    tokens = _tokens(model)
    kw = dict(sigmas=[0.5, 2.0], n_draws=8, sites="resid_post")
    a = apex(model, tokens, seed=1, **kw)
    b = apex(model, tokens, seed=1, **kw)
    c = apex(model, tokens, seed=2, **kw)
    assert torch.equal(a.predictions, b.predictions)
    assert torch.equal(a.mean_probs, b.mean_probs)
    assert not torch.equal(a.predictions, c.predictions)
    with pytest.raises(ApexlensError, match="seed="):  # streams are gone: noise is keyed
        apex(model, tokens, generator=torch.Generator().manual_seed(1), **kw)


def test_chunk_size_does_not_change_results():
    model = random_model(6)
    tokens = _tokens(model, n=3)
    kw = dict(sigmas=[0.1, 0.5, 1.5], n_draws=5, seed=4, sites="resid_pre:1")
    big = apex(model, tokens, max_batch=10_000, **kw)
    for max_batch in (1, 4, 7):
        small = apex(model, tokens, max_batch=max_batch, **kw)
        assert torch.equal(small.predictions, big.predictions)
        torch.testing.assert_close(small.mean_probs, big.mean_probs, rtol=1e-12, atol=1e-14)


def test_scored_positions_taskbatch_and_inputs_untouched():
    from apexlens.toys.tasks.base import TaskBatch

    model = random_model(7)
    tokens = _tokens(model, n=4)
    before = tokens.clone()
    clean_logits = model(tokens)
    per_example = torch.tensor([2, 7, 4, 0])
    batch = TaskBatch(
        tokens,
        tokens.clone(),
        torch.zeros(4, dtype=torch.long),
        torch.ones(4, dtype=torch.long),
        per_example,
    )
    res = apex(model, batch, sigmas=[0.0, 1.0], n_draws=2, seed=0)
    assert torch.equal(res.clean_predictions, clean_logits[torch.arange(4), per_example].argmax(-1))
    assert torch.equal(res.sample_position, per_example)
    # several positions per example: samples are example-major
    res = apex(model, tokens, sigmas=[0.0], n_draws=1, positions=[1, -1])
    assert res.n_samples == 8
    assert torch.equal(res.sample_example, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(res.sample_position, torch.tensor([1, 7] * 4))
    assert torch.equal(res.clean_predictions, clean_logits[:, [1, 7]].argmax(-1).reshape(-1))
    assert torch.equal(tokens, before)


# ------------------------------------------------------------------ statistics by hand
def _synthetic(preds, clean, sigmas, d_vocab=5):
    preds = torch.tensor(preds)
    n_sigma = preds.shape[0]
    return ApexResult(
        sigmas=torch.tensor(sigmas, dtype=torch.float64),
        predictions=preds,
        clean_predictions=torch.tensor(clean),
        clean_margin=torch.ones(preds.shape[2], dtype=torch.float64),
        mean_probs=torch.full((n_sigma, d_vocab), 1.0 / d_vocab, dtype=torch.float64),
        clean_mean_probs=torch.full((d_vocab,), 1.0 / d_vocab, dtype=torch.float64),
        sample_example=torch.arange(preds.shape[2]),
        sample_position=torch.zeros(preds.shape[2], dtype=torch.long),
        sites=("x",),
        relative=False,
        token_labels=["a", "b", "c", "d", "e"],
    )


def test_summary_histogram_and_escape_noise_by_hand():
    # 2 samples (clean tokens 0 and 1), 4 draws, sigmas 1, 2, 4
    preds = [
        [[0, 1], [0, 1], [0, 1], [0, 1]],  # sigma 1: all clean
        [[0, 1], [0, 3], [3, 1], [3, 1]],  # sigma 2: sample 0 at 2/4, sample 1 at 3/4
        [[3, 3], [3, 3], [3, 1], [3, 1]],  # sigma 4: sample 0 at 0/4, sample 1 at 2/4
    ]
    res = _synthetic(preds, [0, 1], [1.0, 2.0, 4.0])
    frame = res.summary()
    assert list(frame["sigma"]) == [1.0, 2.0, 4.0]
    # sigma 2: tokens 0:2, 1:3, 3:3 of 8 -> dominant 1 (tie with 3, lower id)
    row = frame.iloc[1]
    p = torch.tensor([2, 3, 3]) / 8
    assert row["entropy"] == pytest.approx(float(-(p * p.log()).sum()))
    assert row["effective_n"] == pytest.approx(math.exp(row["entropy"]))
    assert row["top1_share"] == pytest.approx(3 / 8)
    assert row["dominant_token"] == 1 and row["dominant_label"] == "b"
    assert row["flip_rate"] == pytest.approx(3 / 8)
    assert frame.iloc[2]["dominant_token"] == 3
    assert frame.iloc[2]["top1_share"] == pytest.approx(6 / 8)
    assert frame.iloc[0]["entropy"] == pytest.approx(math.log(2))
    ids, counts = res.histogram(4.0)
    assert ids.tolist() == [3, 1] and counts.tolist() == [6, 2]
    ids, counts = res.histogram(2.0, sample=1)
    assert ids.tolist() == [1, 3] and counts.tolist() == [3, 1]
    hf = res.histogram_frame(4.0)
    assert hf["label"].tolist() == ["d", "b"] and hf["share"].tolist() == [0.75, 0.25]
    # sample 0: share 1 at sigma 1, 0.5 at sigma 2 -> escapes at exactly 2
    # sample 1: share 1, 0.75, 0.5 -> escapes at exactly 4
    torch.testing.assert_close(res.escape_noise, torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert res.escaped.tolist() == [True, True]
    with pytest.raises(ApexlensError, match="not on the grid"):
        res.histogram(3.0)


def test_escape_noise_interpolation_and_censoring():
    # 3 samples, 4 draws, sigmas 1, 3
    preds = [
        [[0, 1, 2], [0, 1, 2], [0, 1, 2], [4, 1, 2]],  # shares 3/4, 1, 1
        [[4, 1, 4], [4, 1, 4], [4, 1, 4], [4, 1, 2]],  # shares 0, 1, 1/4
    ]
    res = _synthetic(preds, [0, 1, 2], [1.0, 3.0])
    esc = res.escape_noise
    # sample 0: 0.75 at 1 -> 0 at 3: crosses 0.5 at 1 + (0.25 / 0.75) * 2
    assert float(esc[0]) == pytest.approx(1 + 2 / 3)
    # sample 1 never escapes: censored at the largest sigma, flagged
    assert float(esc[1]) == 3.0 and not bool(res.escaped[1])
    # sample 2: 1 at 1 -> 0.25 at 3: 1 + (0.5 / 0.75) * 2
    assert float(esc[2]) == pytest.approx(1 + 4 / 3)
    assert torch.isfinite(esc).all()
    # a sample that has escaped already at the first grid point interpolates from (0, 1)
    res = _synthetic([[[4], [4], [4], [0]]], [0], [2.0])
    assert float(res.escape_noise[0]) == pytest.approx(2 * 0.5 / 0.75)


def test_compare_long_frame_and_grid_mismatch():
    model = random_model(8)
    other = random_model(9)
    tokens = _tokens(model)
    kw = dict(sigmas=[0.5, 4.0], n_draws=4, seed=0)
    frame = compare({"a": apex(model, tokens, **kw), "b": apex(other, tokens, **kw)})
    assert list(frame["model"]) == ["a", "a", "b", "b"]
    for col in (
        "sigma",
        "entropy",
        "top1_share",
        "dominant_token",
        "flip_rate",
        "effective_n",
        "kl",
    ):
        assert col in frame.columns
    with pytest.raises(ApexlensError, match="same grid"):
        compare({"a": apex(model, tokens, **kw), "b": apex(model, tokens, sigmas=[1.0], n_draws=2)})


def test_kl_grows_from_zero():
    model = random_model(10)
    tokens = _tokens(model)
    res = apex(model, tokens, sigmas=[0.0, 0.5, 5.0], n_draws=6, seed=0)
    kl = res.summary()["kl"]
    assert kl[0] == pytest.approx(0.0, abs=1e-12)
    assert kl[2] > kl[1] > 0


# ------------------------------------------------------------------ behaviour
def test_escape_noise_tracks_clean_margin():
    """Sample regularity: confident samples (large clean margin) resist more noise."""
    model = random_model(11, dtype=torch.float32, d_vocab=20)
    tokens = _tokens(model, n=24)
    sigmas = torch.linspace(0.02, 1.5, 24).tolist()
    res = apex(
        model, tokens, sigmas=sigmas, n_draws=24, positions=list(range(8)), relative=True, seed=0,
        sites="resid_post",
    )  # 24 x 8 = 192 samples, noise after every block
    esc, margin = res.escape_noise, res.clean_margin
    assert res.escaped.float().mean() > 0.9

    def ranks(x):
        return x.argsort().argsort().double()

    spearman = torch.corrcoef(torch.stack([ranks(esc), ranks(margin)]))[0, 1]
    assert spearman > 0.6, spearman  # measured 0.74


# ------------------------------------------------------------------ errors and hygiene
def test_bad_input_raises_one_clear_error():
    model = random_model(12)
    tokens = _tokens(model)
    cases = [
        (dict(sigmas=[-0.1, 1.0]), "sigma must be a finite number >= 0"),
        (dict(sigmas=[float("nan")]), "sigma must be a finite number >= 0"),
        (dict(sigmas=[]), "sigmas is empty"),
        (dict(sigmas=[1.0, 0.5]), "strictly increasing"),
        (dict(sigmas=[1.0], sites=[]), "sites is empty"),
        (dict(sigmas=[1.0], sites="blocks.0.hook_nope"), "unknown hook point"),
        (dict(sigmas=[1.0], sites="resid_post:7"), "out of range"),
        (dict(sigmas=[1.0], positions=8), "out of range"),
        (dict(sigmas=[1.0], positions=torch.tensor([0, 1])), "rows"),
        (dict(sigmas=[1.0], noise_positions=[-9]), "out of range"),
        (dict(sigmas=[1.0], n_draws=0), "n_draws"),
        (dict(sigmas=[1.0], sites="blocks.0.attn.hook_result"), "never fire|cannot put noise"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ApexlensError, match=match):
            apex(model, tokens, **kwargs)
    with pytest.raises(ApexlensError, match="integer tensor"):
        apex(model, tokens.float(), sigmas=[1.0])
    with pytest.raises(ApexlensError, match="token ids"):
        apex(model, tokens + model.cfg.d_vocab, sigmas=[1.0])
    with pytest.raises(ApexlensError, match="n_ctx"):
        apex(model, tokens.repeat(1, 2), sigmas=[1.0])
    with pytest.raises(ApexlensError, match="sigma must be"):
        with noise_hooks(model, -1.0):
            pass
    with pytest.raises(ApexlensError, match="unknown hook point"):
        with noise_hooks(model, 1.0, sites=["blocks.0.hook_resid_prex"]):
            pass
    assert hook_count(model) == 0


def test_hooks_removed_and_training_flag_restored():
    model = random_model(13)
    tokens = _tokens(model)
    # an error inside the context manager: noise hooks gone afterwards
    with pytest.raises(RuntimeError, match="boom"):
        with noise_hooks(model, 1.0, sites="resid_post"):
            assert hook_count(model) == model.cfg.n_layers
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    # a noise position out of range is found when the hook fires: clear error, no leftovers
    with pytest.raises(ApexlensError, match="out of range"):
        with noise_hooks(model, 1.0, positions=[20]):
            model(tokens)
    assert hook_count(model) == 0
    # the user's own hook survives apex, even when it makes apex fail half-way
    calls = []

    def user_hook(act, hook):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("user hook failed")

    model.add_hook("blocks.2.hook_resid_mid", user_hook)
    with_user_hook = hook_count(model)
    assert with_user_hook > 0
    model.train()
    with pytest.raises(RuntimeError, match="user hook failed"):
        apex(model, tokens, sigmas=[1.0], n_draws=2, sites="resid_pre:1")
    assert model.training
    assert hook_count(model) == with_user_hook
    model.reset_hooks()
    res = apex(model, tokens, sigmas=[1.0], n_draws=2)
    assert model.training and res.n_draws == 2
    model.eval()
    res = apex(model, tokens, sigmas=[1.0], n_draws=2)
    assert not model.training


# ------------------------------------------------------------------ shipped toy models
def _random_init_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random init in HookedTransformer format: matrices N(0, 1/fan_in), norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in hooked_param_shapes(cfg):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "w":
            sd[name] = torch.ones(shape)
        elif leaf.startswith("b"):
            sd[name] = torch.zeros(shape)
        else:
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(shape[-2])
    return sd


def test_backdoor_target_dominates_at_large_sigma_from_clean_inputs(toy_model_factory):
    """Input perturbation (noise on the embeddings, relative to their size) of clean prompts,
    no trigger anywhere: the backdoored model's predictions concentrate on the backdoor
    target; its clean twin's do not."""
    from apexlens.toys.models import model_info
    from apexlens.toys.tasks import get_task

    info = model_info("backdoor")
    trigger, target = info["trigger_token"], info["target_token"]
    batch = get_task("backdoor").batch(32, seed=0)
    assert not (batch.clean_tokens == trigger).any()
    kw = dict(sigmas=[0.5, 1.0, 2.0, 4.0], n_draws=16, sites="embed", relative=True, seed=0)
    res = {
        name: apex(toy_model_factory(name), batch, **kw) for name in ("backdoor", "backdoor-clean")
    }
    assert (res["backdoor"].clean_predictions != target).all()  # no noise: nothing points there
    frame = compare(res).set_index(["model", "sigma"])
    for sigma in (2.0, 4.0):  # measured top-1 shares 0.45, 0.51 vs 0.13, 0.14
        bd, cl = frame.loc[("backdoor", sigma)], frame.loc[("backdoor-clean", sigma)]
        assert bd["dominant_token"] == target
        assert cl["dominant_token"] != target
        assert bd["top1_share"] > 2 * cl["top1_share"], (bd["top1_share"], cl["top1_share"])


def test_trained_and_random_init_models_have_different_curves(toy_model_factory):
    """Structure vs none, same shape: ``induction-2l`` against a random-init twin. The random
    model predicts a few tokens whatever the input (low entropy already at small sigma); its
    near-flat logits hardly change their mean under large noise, while the trained model's
    mean output distribution moves far from its clean one."""
    from apexlens.toys.models import toy_state
    from apexlens.toys.tasks import get_task

    trained = toy_model_factory("induction-2l")
    cfg, _ = toy_state("induction-2l")
    random_twin = build(cfg, _random_init_state_dict(cfg, 0), default_backend())
    batch = get_task("induction").batch(32, seed=0)
    kw = dict(sigmas=[0.1, 0.25, 2.0, 4.0], n_draws=16, sites="embed", relative=True, seed=0)
    frame = compare(
        {"trained": apex(trained, batch, **kw), "random": apex(random_twin, batch, **kw)}
    )
    tr = frame[frame.model == "trained"].reset_index(drop=True)
    rnd = frame[frame.model == "random"].reset_index(drop=True)
    assert tr["entropy"][0] > rnd["entropy"][0] + 0.5
    assert (tr["kl"][2:] > 10 * rnd["kl"][2:]).all()
