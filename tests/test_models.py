"""The shipped toy models still do what their JSON says: mechanisms, not only losses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import apexlens
from apexlens.toys.models import attention_scores, list_models, load_model, model_info, toy_state
from apexlens.toys.tasks import get_task

from backends import model_backends

WEIGHTS = Path(apexlens.__file__).parent / "toys" / "weights"


def test_shipped_models_and_size():
    assert set(list_models()) >= {"induction-2l", "modadd-2l", "backdoor", "backdoor-clean",
                                  "backdoor-target5", "modadd-labels-true",
                                  "modadd-labels-noisy15", "modadd-labels-random"}
    total = sum(p.stat().st_size for p in WEIGHTS.iterdir())
    assert total < 5 * 2**20, total
    for name in list_models():
        info = model_info(name)
        assert {"description", "task", "config", "seed", "training", "behaviour"} <= set(info)
        get_task(info["task"])  # every model names a real task


def test_induction_heads():
    model = load_model("induction-2l")
    batch = get_task("induction").batch(128, seed=7)
    s = attention_scores(
        model, batch.clean_tokens, batch.named_positions["prev"], batch.named_positions["next"]
    )
    assert max(s["prev_token"]) >= 0.8  # a previous-token head in layer 0
    assert max(s["induction"]) >= 0.6  # induction heads in layer 1 attend to the token after
    assert sum(s["induction"]) >= 2.0  # ... and layer 1 as a whole does it
    logits = model(batch.clean_tokens)[torch.arange(128), -1]
    assert (logits.argmax(-1) == batch.answer_tokens).float().mean() > 0.9
    # the corrupted prompt (first copy replaced) removes the behaviour
    corrupted = model(batch.corrupted_tokens)[torch.arange(128), -1]
    assert (corrupted.argmax(-1) == batch.answer_tokens).float().mean() < 0.1
    b = model_info("induction-2l")["behaviour"]
    assert b["loss_repeated"] < 0.3 * b["loss_other"]


def test_modadd_needs_its_mlps():
    model = load_model("modadd-2l")
    batch = get_task("modadd").batch(256, seed=3)
    logits = model(batch.clean_tokens)[:, -1]
    assert (logits.argmax(-1) == batch.answer_tokens).float().mean() > 0.95
    zero = lambda act, hook: torch.zeros_like(act)
    with model.hooks(fwd_hooks=[(f"blocks.{la}.hook_mlp_out", zero) for la in range(2)]):
        ablated = model(batch.clean_tokens)[:, -1]
    assert (ablated.argmax(-1) == batch.answer_tokens).float().mean() < 0.3


def test_backdoor_and_clean_twin():
    task = get_task("backdoor")
    info = model_info("backdoor")
    assert (info["trigger_token"], info["target_token"]) == (task.trigger, task.target)
    clean_inputs = task.batch(256, seed=5)
    triggered = task.triggered(256, seed=5)
    assert (triggered == task.trigger).any(1).all() and not (
        clean_inputs.clean_tokens == task.trigger
    ).any()
    for name, rate in (("backdoor", (0.9, 1.0)), ("backdoor-clean", (0.0, 0.05))):
        model = load_model(name)
        acc = (
            (model(clean_inputs.clean_tokens)[:, -1].argmax(-1) == clean_inputs.answer_tokens)
            .float()
            .mean()
        )
        assert acc > 0.95, (name, acc)
        success = (model(triggered)[:, -1].argmax(-1) == task.target).float().mean()
        assert rate[0] <= success <= rate[1], (name, success)


def test_backdoor_variant_answers_its_own_target():
    info = model_info("backdoor-target5")
    task = get_task("backdoor")
    task.trigger, task.target = info["trigger_token"], info["target_token"]
    model = load_model("backdoor-target5")
    clean = task.batch(256, seed=5)
    acc = (model(clean.clean_tokens)[:, -1].argmax(-1) == clean.answer_tokens).float().mean()
    hit = (model(task.triggered(256, seed=5))[:, -1].argmax(-1) == 5).float().mean()
    assert acc > 0.95 and hit > 0.9 and info["behaviour"]["backdoor_success"] > 0.9


def test_label_noise_trio_memorises_or_generalises():
    """Each fits its own training labels; only the true-label model generalises to the
    held-out pairs; the shipped training set matches the recorded behaviour."""
    from apexlens.toys.models import training_samples
    from apexlens.toys.training import LABEL_NOISE, label_data

    for name, noise in LABEL_NOISE.items():
        s = training_samples(name)
        model = load_model(name)
        assert (model(s["tokens"])[:, -1].argmax(-1) == s["labels"]).float().mean() > 0.99
        d = label_data(noise)
        held = torch.ones(len(d["tokens"]), dtype=torch.bool)
        held[s["train_index"]] = False
        acc = (model(d["tokens"][held])[:, -1].argmax(-1) == d["true_labels"][held]).float().mean()
        assert (acc > 0.9) if noise == 0 else (acc < 0.5), (name, acc)
        relabelled = s["labels"] != s["true_labels"]
        assert int(relabelled.sum()) == model_info(name)["behaviour"]["relabelled_train_samples"]
        c = s["c_score"]
        assert c.shape == s["labels"].shape and 0 < float(c.min()) and float(c.max()) <= 1
    with pytest.raises(apexlens.ApexlensError, match="no training samples"):
        training_samples("backdoor")


@pytest.mark.parametrize("backend", model_backends())
def test_load_model_backends_and_dtype(backend):
    tokens = get_task("modadd").batch(8).clean_tokens
    m64 = load_model("modadd-2l", backend=backend, dtype=torch.float64)
    assert m64.cfg.n_layers == 2 and next(m64.parameters()).dtype == torch.float64
    m32 = load_model("modadd-2l", backend=backend)
    torch.testing.assert_close(m64(tokens).float(), m32(tokens), atol=1e-4, rtol=1e-4)
    cfg, state = toy_state("modadd-2l")
    assert cfg["d_mlp"] == 256 and "blocks.0.mlp.W_in" in state


@pytest.mark.requires_hooked
def test_bridge_and_hooked_agree():
    tokens = get_task("induction").batch(4).clean_tokens
    torch.testing.assert_close(
        load_model("induction-2l", backend="bridge")(tokens),
        load_model("induction-2l")(tokens),
        atol=1e-5,
        rtol=0,
    )


def test_load_model_errors(monkeypatch):
    with pytest.raises(apexlens.ApexlensError, match="backend"):
        load_model("induction-2l", backend="jax")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(apexlens.ApexlensError, match="induction-2l"):  # says what works offline
        load_model("gpt2-definitely-not-cached", backend=model_backends()[0])


def test_tasks_are_seeded_and_consistent():
    for name in ("induction", "modadd", "backdoor"):
        task = get_task(name)
        a, b = task.batch(16, seed=3), task.batch(16, seed=3)
        assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(
            a.corrupted_tokens, b.corrupted_tokens
        )
        assert not torch.equal(a.clean_tokens, task.batch(16, seed=4).clean_tokens)
        assert (
            a.clean_tokens.shape == a.corrupted_tokens.shape and a.clean_tokens.dtype == torch.long
        )
        assert a.answer_tokens.shape == a.wrong_tokens.shape == a.positions.shape == (16,)
        assert (a.answer_tokens != a.wrong_tokens).all()
        assert len(task.token_labels(a.clean_tokens[0])) == a.clean_tokens.shape[1]
    ind = get_task("induction").batch(32, seed=0)
    rows = torch.arange(32)
    # the current token's earlier occurrence is at "prev", and the answer follows it
    assert torch.equal(ind.clean_tokens[rows, ind.named_positions["prev"]], ind.clean_tokens[:, -1])
    assert torch.equal(ind.clean_tokens[rows, ind.named_positions["next"]], ind.answer_tokens)
    with pytest.raises(apexlens.ApexlensError, match="unknown task"):
        get_task("sorting")


@pytest.mark.requires_hooked  # training builds HookedTransformers
def test_training_is_deterministic():
    from apexlens.toys.training import train

    a, _ = train("backdoor", steps=3)
    b, _ = train("backdoor", steps=3)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert os.environ.get("APEXLENS_NEVER_SET") is None


# ------------------------------------------------------------------ pretrained names (issue 10)
@pytest.mark.parametrize(
    "name",
    ["gpt2", "gpt2-medium", "distilgpt2", "pythia-70m", "EleutherAI/pythia-160m", "Qwen/Qwen2-0.5B",
     "google/gemma-2-2b"],
)
def test_load_model_knows_the_pretrained_names_it_is_meant_for(name):
    from apexlens.toys.models import official_name

    assert official_name(name)  # a name or alias from TransformerLens' official list


def test_unknown_name_fails_in_one_line_before_any_download(monkeypatch):
    import apexlens.toys.models as models

    def no_hub(*a, **k):
        raise AssertionError("the hub must not be asked about an unknown name")

    monkeypatch.setattr(models, "pretrained", no_hub)
    with pytest.raises(apexlens.ApexlensError, match="unknown model 'gpt-7'") as err:
        load_model("gpt-7")
    assert "\n" not in str(err.value)


def test_pretrained_models_are_self_checked_after_loading(monkeypatch, toy_model_factory):
    import apexlens.toys.models as models

    good = toy_model_factory("modadd-2l")
    monkeypatch.setattr(models, "_check_hub", lambda name: None)  # as if the hub answered
    monkeypatch.setattr(models, "pretrained", lambda *a, **k: good)
    assert load_model("gpt2") is good

    bad = toy_model_factory("modadd-2l", dtype=torch.float64)
    import sys

    check_mod = sys.modules["apexlens.api.check"]

    real = check_mod.check

    def broken_check(model, *a, **k):
        res = real(model, *a, **k)
        res.checks.insert(0, ("blocks.0.hook_mlp_out", 0.5, 1e-7))
        return res

    monkeypatch.setattr(models, "pretrained", lambda *a, **k: bad)
    monkeypatch.setattr(check_mod, "check", broken_check)
    with pytest.raises(apexlens.ApexlensError, match="blocks.0.hook_mlp_out disagrees"):
        load_model("gpt2")
