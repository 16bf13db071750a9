"""Feature visualization, natural top examples and the manipulation check (issue 13).

Every activation apexlens reports is compared with a plain forward pass (``run_with_cache``
and an index, in float64 where the model is); the optimiser is checked against brute force
over every input of a small model; the check is run on the shipped manipulated model
(``modadd-2l-slingshot``) and its untouched base.
"""

from __future__ import annotations

import pytest
import torch

import apexlens
from apexlens import ApexlensError
from apexlens.engines.features import attribution
from apexlens.model.hooks import inference_mode
from apexlens.toys.tasks.toy import ModAddTask
from apexlens.vocab import parse_feature

from backends import model_backends


@pytest.fixture(scope="module")
def natural() -> torch.Tensor:
    x, _, _ = ModAddTask().training_batch(torch.Generator().manual_seed(0))
    return x


def _cache(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return cache


@pytest.mark.parametrize("backend", model_backends())
def test_feature_values_equal_a_plain_forward(backend, toy_model_factory):
    model = toy_model_factory("modadd-2l", backend=backend, dtype=torch.float64)
    x = ModAddTask().batch(6, seed=1).clean_tokens
    cache = _cache(model, x)
    logits = model(x)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, generator=g, dtype=torch.float64)
    W_O = model.blocks[1].attn.W_O if hasattr(model.blocks[1].attn, "W_O") else None
    expected = {
        "m1.n37": cache["blocks.1.mlp.hook_post"][..., 37],
        "m0.n3": cache["blocks.0.mlp.hook_post"][..., 3],
        "1.2.attn:1": cache["blocks.1.attn.hook_pattern"][:, 2, :, 1],
        "r1": cache["blocks.1.hook_resid_pre"] @ d,
        "logit:7": logits[..., 7],
        "blocks.0.attn.hook_z[2,5]": cache["blocks.0.attn.hook_z"][..., 2, 5],
    }
    if W_O is not None:
        expected["1.2"] = (cache["blocks.1.attn.hook_z"][:, :, 2] @ W_O[2]) @ d
    for spec, want in expected.items():
        got = apexlens.feature_values(
            model, spec, x, direction=d if spec in ("r1", "1.2") else None
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=spec)


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("m5.n1", {}, "layer 5 out of range"),
        ("m1.n999", {}, "neuron 999 out of range"),
        ("1.2", {}, "pass direction="),
        ("r1", {"direction": torch.ones(3)}, r"shape \[64\]"),
        ("m1.n3", {"direction": torch.ones(64)}, "already one number"),
        ("logit:99", {}, "token 99 out of range"),
        ("blocks.9.hook_nothing[1]", {}, "no hook point"),
        ("neuron 3", {}, "cannot parse feature"),
        ("m1.n3@x", {}, "must be an integer"),
    ],
)
def test_bad_features_get_one_clear_error(spec, kwargs, match, toy_model_factory):
    model = toy_model_factory("modadd-2l")
    with pytest.raises(ApexlensError, match=match):
        parse_feature(model, spec, **kwargs)


def test_attention_only_model_has_no_neurons(toy_model_factory):
    with pytest.raises(ApexlensError, match="no MLPs"):
        parse_feature(toy_model_factory("induction-2l"), "m0.n1")


def test_optimiser_finds_the_known_maximiser_and_beats_every_natural_input(
    toy_model_factory, natural
):
    """A residual direction at the embedding, ``r0`` along ``W_E[t] + W_pos[p]``: its
    maximiser is known (the token with the largest dot product, by brute force)."""
    model = toy_model_factory("modadd-2l")
    direction = (model.W_E[7] + model.W_pos[3]).detach()
    scores = model.W_E.detach() @ direction + model.W_pos[3].detach() @ direction
    best = int(scores.argmax())
    fv = apexlens.visualize(model, "r0", direction=direction, n_pos=4, steps=60, seed=0)
    assert int(fv.best_tokens[-1]) == best
    torch.testing.assert_close(fv.best_activation, float(scores.max()), rtol=1e-5, atol=1e-5)
    nat = apexlens.top_examples(model, "r0", natural, direction=direction)
    assert fv.best_activation > float(nat.distribution.max())


def test_optimiser_reaches_the_brute_force_maximum_of_a_neuron(toy_model_factory):
    """Every input of 3 tokens (25^3), exhaustively: FV finds the global maximum."""
    model = toy_model_factory("modadd-2l")
    every = torch.cartesian_prod(*[torch.arange(25)] * 3)
    for n in (34, 143):
        values = apexlens.feature_values(model, f"m1.n{n}", every)[:, -1]
        fv = apexlens.visualize(model, f"m1.n{n}", n_pos=3, steps=100, seed=0)
        assert fv.best_activation == pytest.approx(float(values.max()), abs=1e-6)
        assert fv.best_tokens.tolist() == every[values.argmax()].tolist()


@pytest.mark.parametrize("backend", model_backends())
def test_reported_activations_are_plain_forward_values_and_seeded(backend, toy_model_factory):
    model = toy_model_factory("modadd-2l", backend=backend)
    kw = dict(n_pos=4, steps=30, restarts=3, refine_steps=3, seed=5)
    a = apexlens.visualize(model, "m1.n43", **kw)
    b = apexlens.visualize(model, "m1.n43", **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.trajectory, b.trajectory)
    again = apexlens.feature_values(model, "m1.n43", a.tokens)[:, -1]
    torch.testing.assert_close(a.activation, again.float(), rtol=0, atol=1e-6)
    assert torch.all(a.activation[:-1] >= a.activation[1:])  # best first
    assert torch.equal(a.trajectory[-1], a.activation)
    c = apexlens.visualize(model, "m1.n43", **{**kw, "seed": 6})
    assert not torch.equal(a.trajectory, c.trajectory)


def test_prefix_vocab_and_read_position(toy_model_factory):
    model = toy_model_factory("modadd-2l")
    fv = apexlens.visualize(
        model, "m1.n34@2", n_pos=4, prefix=[24], vocab=range(23), steps=20, refine_steps=2
    )
    assert torch.all(fv.tokens[:, 0] == 24)
    assert int(fv.tokens[:, 1:].max()) < 23
    again = apexlens.feature_values(model, "m1.n34", fv.tokens)[:, 2]
    torch.testing.assert_close(fv.activation, again, rtol=0, atol=1e-6)
    with pytest.raises(ApexlensError, match="inside the fixed prefix"):
        apexlens.visualize(model, "m1.n34@0", n_pos=4, prefix=[24], steps=2)
    with pytest.raises(ApexlensError, match="n_pos must be"):
        apexlens.visualize(model, "m1.n34", n_pos=5, steps=2)
    with pytest.raises(ApexlensError, match="vocab must list"):
        apexlens.visualize(model, "m1.n34", n_pos=4, vocab=[99], steps=2)


def test_visualize_leaves_no_trace(toy_model_factory):
    """No hooks left, the training flag restored, no gradient written into the weights."""
    model = toy_model_factory("modadd-2l")
    model.train()
    apexlens.visualize(model, "m1.n3", n_pos=4, steps=5, refine_steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_top_examples_rank_every_position(toy_model_factory, natural):
    model = toy_model_factory("modadd-2l")
    nat = apexlens.top_examples(model, "m1.n34", natural, k=5)
    values = apexlens.feature_values(model, "m1.n34", natural)
    # every context once (the same prefix recurs at many rows), largest first
    distinct: dict[tuple[int, ...], float] = {}
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            distinct.setdefault(tuple(natural[r, : c + 1].tolist()), float(values[r, c]))
    top = torch.tensor(sorted(distinct.values(), reverse=True)[:5])
    torch.testing.assert_close(nat.activations, top)
    assert nat.percentile(float(values.max()) + 1) == 100.0
    only_last = apexlens.top_examples(model, "m1.n34", natural, k=5, positions=[3])
    assert torch.all(only_last.cols == 3)
    frame = nat.to_frame(ModAddTask().token_labels)
    assert list(frame.columns) == ["rank", "row", "position", "activation", "context"]


@pytest.mark.parametrize("backend", model_backends())
def test_attribution_equals_finite_differences(backend, toy_model_factory):
    """Each component's gradient x activation is the derivative of the feature along that
    component's own output: scale the output by 1 +- eps (a hook) and difference, float64."""
    model = toy_model_factory("modadd-2l", backend=backend, dtype=torch.float64)
    x = ModAddTask().batch(2, seed=3).clean_tokens
    f = parse_feature(model, "m1.n34")
    with inference_mode(model, grad=True):
        labels, scores, value, resid = attribution(model, f, x)
    from apexlens.engines.features import components
    from apexlens.model import backend_for

    eps = 1e-5
    for j, (label, hook, head) in enumerate(components(backend_for(model), f)):

        def scaled(k: float, hook_name=hook, head=head):
            def fn(act, hook):
                out = act.clone()
                if head is None:
                    out = out * k
                else:
                    out[:, :, head] = out[:, :, head] * k
                return out

            with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, fn)]):
                return apexlens.feature_values(model, f, x)[:, -1]

        numeric = (scaled(1 + eps) - scaled(1 - eps)) / (2 * eps)
        torch.testing.assert_close(scores[:, j], numeric, rtol=1e-6, atol=1e-7, msg=label)
    torch.testing.assert_close(value, apexlens.feature_values(model, f, x)[:, -1])
    _, cache = model.run_with_cache(x)
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_mid"][:, -1], rtol=0, atol=0)
    assert labels[:2] == ["tok_embed", "pos_embed"] and labels[-1] == "1.3"


@pytest.fixture(scope="module")
def checks(natural):
    """The check on the manipulated neuron, the same neuron untouched, and other neurons of
    the manipulated model."""
    manipulated = apexlens.load_model("modadd-2l-slingshot")
    base = apexlens.load_model("modadd-2l")
    neuron = apexlens.model_info("modadd-2l-slingshot")["manipulation"]["neuron"]
    out = {"manipulated": apexlens.fv_check(manipulated, f"m1.n{neuron}", natural, n_pos=4)}
    out["untouched"] = apexlens.fv_check(base, f"m1.n{neuron}", natural, n_pos=4)
    for other in (43, 143, 7):
        out[f"other {other}"] = apexlens.fv_check(manipulated, f"m1.n{other}", natural, n_pos=4)
    return out


def test_check_flags_the_manipulated_neuron(checks):
    planted = apexlens.model_info("modadd-2l-slingshot")["manipulation"]["planted"]
    chk = checks["manipulated"]
    assert chk.fv.best_tokens.tolist() == planted  # the slingshot works
    assert chk.flagged, chk.verdict
    assert chk.percentile == 100.0 and chk.ratio >= 2
    # the most unusual of its 31 peers: the smallest p-value the test can give
    assert chk.p_value == pytest.approx(1 / 32) and chk.alpha == 0.05
    assert "far above the natural maximum" in chk.verdict


@pytest.mark.parametrize("which", ["untouched", "other 43", "other 143", "other 7"])
def test_check_does_not_flag_honest_neurons(checks, which):
    assert not checks[which].flagged, checks[which].verdict
    assert checks[which].p_value > 0.05


def test_manipulation_kept_the_task_and_the_natural_activations(natural):
    """What the fine-tune promised: same accuracy, same natural activations of the neuron."""
    info = apexlens.model_info("modadd-2l-slingshot")
    manipulated = apexlens.load_model("modadd-2l-slingshot")
    base = apexlens.load_model("modadd-2l")
    n = info["manipulation"]["neuron"]
    for model in (base, manipulated):
        logits = model(natural)[:, -1]
        acc = (logits.argmax(-1) == (natural[:, 1] + natural[:, 2]) % 23).float().mean()
        assert float(acc) == 1.0
    a = apexlens.feature_values(base, f"m1.n{n}", natural).flatten()
    b = apexlens.feature_values(manipulated, f"m1.n{n}", natural).flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.99
    top_a = set(a.topk(10).indices.tolist())
    top_b = set(b.topk(10).indices.tolist())
    assert len(top_a & top_b) >= 7


def test_check_figure_and_frames(checks):
    from apexlens.ui.plotting_fv import fv_check_figure, fv_trajectory

    chk = checks["manipulated"]
    fig = fv_check_figure(chk, ModAddTask().token_labels)
    assert "SUSPICIOUS" in fig.layout.title.text
    assert len(fig.data) >= 4
    assert fv_trajectory(chk.fv, natural_max=chk.natural_max).data
    frame = chk.to_frame()
    assert bool(frame["flagged"].iloc[0]) and frame["ratio"].iloc[0] >= 2
    assert frame["p_value"].iloc[0] <= frame["alpha"].iloc[0]
    assert len(chk.peer_frame()) == 32
    assert {"p = " in a.text for a in fig.layout.annotations} == {True, False}
    shares = chk.attribution_frame()
    assert list(shares.columns) == ["component", "fv", "natural"]
    assert shares["fv"].abs().sum() == pytest.approx(1.0)


def test_cli_visualize_writes_the_check_and_refuses_bad_input(tmp_path, capsys):
    import json

    from apexlens.ui.cli import main

    out = tmp_path / "fv"
    assert (
        main(["visualize", "modadd-2l-slingshot", "m1.n34", "--out", str(out), "--no-progress"])
        == 0
    )
    summary = json.loads((out / "visualize.json").read_text())
    assert summary["fv_text"] == "= 11 = 11" and summary["flagged"] is True
    for name in ("fv.csv", "natural_top.csv", "check.csv", "visualize.html"):
        assert (out / name).is_file()
    assert "suspicious" in capsys.readouterr().out
    for argv, message in [
        (["visualize", "modadd-2l", "m7.n1"], "layer 7 out of range"),
        (["visualize", "induction-2l", "m0.n1"], "no MLPs"),
        (["visualize", "modadd-2l", "m1.n1", "--natural", "2"], "--natural"),
    ]:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
