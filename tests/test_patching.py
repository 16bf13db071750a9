"""The fast path-patching engine against the naive per-sender loop, in float64."""

from __future__ import annotations

import pytest
import torch

import apexlens
from apexlens.reference import naive_act_patch, naive_path_patch
from apexlens.scoring import KLDivergence, LogitDiff

from backends import model_backends
from helpers import hook_count, random_model, random_tokens

TOL = 1e-9


@pytest.fixture(scope="module", params=model_backends())
def model(request):
    return random_model(0, backend=request.param)


@pytest.fixture(scope="module")
def toks(model):
    return random_tokens(model, batch=3, n_pos=8)


@pytest.fixture(scope="module")
def metric():
    return LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), positions=-1)


def plain_metric(logits: torch.Tensor) -> torch.Tensor:
    """A user's own callable: no declared positions, so the engine takes the general path."""
    b = torch.arange(logits.shape[0])
    return logits[b, -1, torch.tensor([1, 2, 3])] - logits[b, -1, torch.tensor([4, 5, 6])]


CASES = [
    dict(senders="all-heads", receivers="logits"),
    dict(senders=["embed", "0.1", "m0", "1.2", "m1"], receivers=["2.1.q", "2.3.k", "m2", "1.0.v"]),
    dict(senders=["embed", "0.1@2", "m0@3,4", "1.2", "0.3@-1"], receivers=["2.1.q@-1", "logits"]),
    dict(senders=["embed", "0.1", "0.2", "m0"], receivers="logits", via=["1.2.k"]),
    dict(senders=["embed", "0.1", "0.2"], receivers="2.0", via=["m1"]),
    dict(senders=["embed", "0.1", "0.2"], receivers="logits@-1", via=["1.1", "m1"]),
    dict(senders="all-heads", receivers=["2.2", "m1"]),
]


@pytest.mark.parametrize("mlps", ["live", "frozen"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_path_patch_matches_naive_loop(model, toks, metric, case, mlps):
    clean, corrupted = toks
    kw = dict(CASES[case], mlps=mlps)
    fast = apexlens.path_patch(model, clean, corrupted, metric=metric, **kw)
    slow = naive_path_patch(model, clean, corrupted, metric=metric, **kw)
    assert fast.per_example.shape == slow.shape
    torch.testing.assert_close(fast.per_example, slow, atol=TOL, rtol=0)
    # the patch does something: not every sender leaves the clean metric unchanged
    assert (slow - fast.clean.values).abs().max() > 1e-3


@pytest.mark.parametrize("case", [0, 1, 3])
def test_general_callable_metric_matches_declared_metric(model, toks, metric, case):
    clean, corrupted = toks
    fast = apexlens.path_patch(model, clean, corrupted, metric=metric, **CASES[case])
    general = apexlens.path_patch(model, clean, corrupted, metric=plain_metric, **CASES[case])
    slow = naive_path_patch(model, clean, corrupted, metric=plain_metric, **CASES[case])
    torch.testing.assert_close(general.per_example, fast.per_example, atol=TOL, rtol=0)
    torch.testing.assert_close(general.per_example, slow, atol=TOL, rtol=0)


def test_kl_metric_and_small_memory_budget(model, toks):
    clean, corrupted = toks
    kl = KLDivergence(model(clean), positions=-1)
    fast = apexlens.path_patch(
        model,
        clean,
        corrupted,
        metric=kl,
        senders="all-heads",
        receivers=["2.1.q", "logits"],
        memory_budget=1,
    )
    slow = naive_path_patch(
        model, clean, corrupted, metric=kl, senders="all-heads", receivers=["2.1.q", "logits"]
    )
    torch.testing.assert_close(fast.per_example, slow, atol=TOL, rtol=0)


def test_named_positions(model, toks, metric):
    clean, corrupted = toks
    pos = {"end": torch.tensor([7, 6, 5]), "early": torch.tensor([1, 2, 3])}
    kw = dict(
        senders=["0.1@early", "0.2", "1.3@early"],
        receivers=["2.0.q@end", "2.1.k@early"],
        positions=pos,
    )
    fast = apexlens.path_patch(model, clean, corrupted, metric=metric, **kw)
    slow = naive_path_patch(model, clean, corrupted, metric=metric, **kw)
    torch.testing.assert_close(fast.per_example, slow, atol=TOL, rtol=0)


def test_result_shapes_and_normalisation(model, toks, metric):
    clean, corrupted = toks
    res = apexlens.path_patch(
        model, clean, corrupted, metric=metric, senders="all-heads", receivers="logits"
    )
    assert res.values.shape == (3, 4)
    assert res.per_example.shape == (12, 3)
    norm = res.normalized()
    expected = (res.values - res.clean.mean) / (res.clean.mean - res.corrupted.mean)
    torch.testing.assert_close(norm, expected)
    df = res.to_frame()
    assert list(df["sender"])[:2] == ["0.0", "0.1"] and len(df) == 12
    # senders after the receivers keep the clean metric exactly
    late = apexlens.path_patch(
        model, clean, corrupted, metric=metric, senders=["0.1", "2.3"], receivers="2.0.q"
    )
    torch.testing.assert_close(late.per_example[1], late.clean.values)
    assert not torch.allclose(late.per_example[0], late.clean.values)


@pytest.mark.parametrize("backend", model_backends())
def test_patching_every_head_at_once_equals_corrupted_run_without_mlps(backend):
    """An attention-only model: all heads + embed patched jointly to the logits = corrupted run."""
    model = random_model(3, attn_only=True, backend=backend)
    clean, corrupted = random_tokens(model)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    group = [n for n in apexlens.all_heads(model)] + [apexlens.vocab.Node("embed")]
    joint = exp.path_patch_groups([group], "logits")
    torch.testing.assert_close(joint[0], exp.corrupted_values, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- activation patching
def test_act_patch_matches_transformer_lens(model, toks, metric):
    from transformer_lens import patching as tlp

    clean, corrupted = toks
    _, cache = model.run_with_cache(clean)
    mean_metric = lambda lg: metric(lg).mean()
    tl = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, mean_metric)
    ours = apexlens.act_patch(model, clean, corrupted, nodes="all-heads", metric=metric).values
    torch.testing.assert_close(ours, tl.to(ours.dtype), atol=1e-6, rtol=0)
    tl = tlp.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, mean_metric)
    nodes = [f"{la}.{h}@{p}" for la in range(3) for p in range(8) for h in range(4)]
    ours = apexlens.act_patch(model, clean, corrupted, nodes=nodes, metric=metric).values.reshape(
        3, 8, 4
    )
    torch.testing.assert_close(ours, tl.to(ours.dtype), atol=1e-6, rtol=0)
    tl = tlp.get_act_patch_mlp_out(model, corrupted, cache, mean_metric)
    nodes = [f"m{la}@{p}" for la in range(3) for p in range(8)]
    ours = apexlens.act_patch(model, clean, corrupted, nodes=nodes, metric=metric).values.reshape(
        3, 8
    )
    torch.testing.assert_close(ours, tl.to(ours.dtype), atol=1e-6, rtol=0)
    tl = tlp.get_act_patch_resid_pre(model, corrupted, cache, mean_metric)
    nodes = [f"r{la}@{p}" for la in range(3) for p in range(8)]
    ours = apexlens.act_patch(model, clean, corrupted, nodes=nodes, metric=metric).values.reshape(
        3, 8
    )
    torch.testing.assert_close(ours, tl.to(ours.dtype), atol=1e-6, rtol=0)


def test_act_patch_matches_naive_loop_in_float64(model, toks, metric):
    clean, corrupted = toks
    nodes = [(f"blocks.{la}.attn.hook_z", h) for la in range(3) for h in range(4)]
    nodes += [(f"blocks.{la}.hook_mlp_out", None) for la in range(3)]
    slow = naive_act_patch(model, clean, corrupted, nodes=nodes, metric=metric)
    names = [f"{la}.{h}" for la in range(3) for h in range(4)] + ["m0", "m1", "m2"]
    fast = apexlens.act_patch(model, clean, corrupted, nodes=names, metric=metric).per_example
    torch.testing.assert_close(fast, slow, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- reliability
class Boom(Exception):
    pass


def test_nested_inference_mode_restores_every_flag_once():
    """Nested blocks on one model walk its modules once (the outer block) and every module's
    own flag comes back exactly: MC-dropout set-ups, a module added since the last call, a
    nested block asking for gradients; the grad mode inside each is the one it asked for."""
    from apexlens.model.hooks import inference_mode

    model = random_model(1)
    model.eval()
    model.blocks[0].attn.train()  # a submodule in training mode inside an eval model
    model.blocks[1].extra = torch.nn.Dropout(0.1)  # added after construction, training
    before = {name: m.training for name, m in model.named_modules()}
    with inference_mode(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
        with inference_mode(model):
            assert not torch.is_grad_enabled()
        with inference_mode(model, grad=True):
            assert torch.is_grad_enabled()
            with inference_mode(model):
                assert not torch.is_grad_enabled()
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
    assert {name: m.training for name, m in model.named_modules()} == before
    del model.blocks[1].extra


@pytest.mark.parametrize("backend", model_backends())
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_hooks_removed_and_flags_restored_after_exceptions(exc, backend, toks):
    model = random_model(1, backend=backend)
    clean, corrupted = toks
    seen = []
    model.blocks[0].hook_resid_pre.add_hook(lambda act, hook: seen.append(1))  # the user's own hook
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = hook_count(model)
    calls = {"n": 0}

    def bad_metric(logits):
        calls["n"] += 1
        if calls["n"] > 2:
            raise exc("metric failed")
        return logits[:, -1, 0]

    with pytest.raises(exc):
        apexlens.path_patch(
            model, clean, corrupted, metric=bad_metric, senders="all-heads", receivers=["2.1.q"]
        )
    assert hook_count(model) == n_hooks == 1
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    seen.clear()
    model(clean)
    assert seen == [1]  # the user's hook is still attached and still runs
    with pytest.raises(exc):
        with apexlens.patched(model, apexlens.Paths("0.1", "2.1.q"), corrupted):
            model(clean)
            raise exc("inside the block")
    assert hook_count(model) == 1


def test_inputs_are_not_modified(model, toks, metric):
    clean, corrupted = toks
    c0, k0 = clean.clone(), corrupted.clone()
    apexlens.path_patch(
        model, clean, corrupted, metric=metric, senders="all-heads", receivers=["2.1", "logits"]
    )
    assert torch.equal(clean, c0) and torch.equal(corrupted, k0)


def test_errors_are_clear(model, toks, metric):
    clean, corrupted = toks
    E = apexlens.ApexlensError
    with pytest.raises(E, match="same shape"):
        apexlens.path_patch(model, clean, corrupted[:, :5], metric=metric, senders="0.1")
    with pytest.raises(E, match="no sender has a path"):
        apexlens.path_patch(
            model, clean, corrupted, metric=metric, senders="2.0", receivers="1.1.q"
        )
    with pytest.raises(E, match="empty"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders=[])
    with pytest.raises(E, match="NaN"):
        apexlens.path_patch(
            model, clean, corrupted, metric=lambda lg: lg[:, -1, 0] * float("nan"), senders="0.1"
        )
    with pytest.raises(E, match="unknown node"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders="9x")
    with pytest.raises(E, match="out of range"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders="1.7")
    with pytest.raises(E, match="out of range"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders="5.0")
    with pytest.raises(E, match="cannot be a sender"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders="logits")
    with pytest.raises(E, match="mlps must be"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders="0.1", mlps="dead")
    with pytest.raises(E, match="vocabulary"):
        apexlens.path_patch(model, clean + 1000, corrupted, metric=metric, senders="0.1")
    with pytest.raises(E, match="unknown"):
        apexlens.path_patch(model, clean, corrupted, metric=metric, senders="0.1@end")


# ---------------------------------------------------------------------------- the shipped induction model
@pytest.mark.parametrize("backend", model_backends())
def test_induction_model_prev_token_to_induction_key_path(backend):
    """On the shipped induction model, path patching singles out prev-token head -> induction head
    (via its key) -> logits."""
    from apexlens.toys.models import load_model
    from apexlens.toys.tasks import get_task

    model = load_model("induction-2l", dtype=torch.float64, backend=backend)
    batch = get_task("induction").batch(16, seed=0)
    metric = batch.logit_diff()
    exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens, metric=metric)
    to_logits = exp.path_patch("all-heads", "logits").normalized()
    induction_head = int(to_logits[1].argmin())  # the layer-1 head whose path carries most
    assert to_logits[1, induction_head] < -0.3
    to_key = exp.path_patch("heads:0", f"1.{induction_head}.k").normalized()
    prev_head = int(to_key[:4].argmin()) if to_key.ndim == 1 else int(to_key[0].argmin())
    vals = to_key[:4] if to_key.ndim == 1 else to_key[0]
    assert vals[prev_head] < -0.2
    others = torch.cat([vals[:prev_head], vals[prev_head + 1 :]])
    assert vals[prev_head] < 2 * others.min()  # clearly the strongest
    # and the path goes through k, not q
    to_query = exp.path_patch([f"0.{prev_head}"], f"1.{induction_head}.q").normalized()
    assert abs(float(to_query[0])) < abs(float(vals[prev_head])) / 3
    # the full chain as one multi-hop path matches its naive reference
    hop = exp.path_patch([f"0.{prev_head}"], "logits", via=[f"1.{induction_head}.k"]).per_example
    ref = naive_path_patch(
        model,
        batch.clean_tokens,
        batch.corrupted_tokens,
        metric=metric,
        senders=[f"0.{prev_head}"],
        receivers="logits",
        via=[f"1.{induction_head}.k"],
    )
    torch.testing.assert_close(hop, ref, atol=1e-8, rtol=0)
    assert float(hop.mean()) < float(exp.clean_values.mean()) - 0.2 * float(
        exp.clean_values.mean() - exp.corrupted_values.mean()
    )
