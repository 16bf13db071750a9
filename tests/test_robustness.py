"""No silent failures: threads, overflowing noise, empty input, odd metrics, odd outputs.

Each test here failed before the fix it guards (issue 12): it returned a wrong number or a
raw error from deep inside torch/TransformerLens instead of one clear ApexlensError.
"""

from __future__ import annotations

import threading

import pytest
import torch

import apexlens
from apexlens import ApexlensError
from apexlens.reference import naive_act_patch, naive_path_patch

from backends import build, model_backends, random_state_dict
from helpers import hook_count, random_config, random_model, random_tokens

E = ApexlensError


def _metric(model, clean):
    answers = clean[:, -1] % model.cfg.d_vocab
    wrong = (answers + 1) % model.cfg.d_vocab
    return apexlens.LogitDiff(answers, wrong)


# ------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("backend", model_backends())
def test_concurrent_calls_on_one_model_are_each_exact(backend):
    model = random_model(3, backend=backend)
    clean, corrupted = random_tokens(model, batch=3, n_pos=6)
    metric = _metric(model, clean)
    expected = {
        recv: apexlens.path_patch(model, clean, corrupted, senders="all-heads", receivers=recv, metric=metric).per_example
        for recv in ("logits", "2.1.q")
    }
    results: list[tuple[str, torch.Tensor | BaseException]] = []

    def work(recv: str) -> None:
        for _ in range(5):
            try:
                res = apexlens.path_patch(model, clean, corrupted, senders="all-heads", receivers=recv, metric=metric)
                results.append((recv, res.per_example))
            except BaseException as err:  # noqa: BLE001 - recorded and asserted below
                results.append((recv, err))

    threads = [threading.Thread(target=work, args=(r,)) for r in ("logits", "2.1.q", "logits", "2.1.q")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    for recv, value in results:
        assert isinstance(value, torch.Tensor), f"{recv}: {value!r}"
        torch.testing.assert_close(value, expected[recv], atol=0, rtol=0)
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------ APEX
def test_apex_reports_overflowing_noise_instead_of_counting_nan_as_predictions():
    model = random_model(4, dtype=torch.float32)
    clean, _ = random_tokens(model, batch=4, n_pos=6)
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        res = apexlens.apex(model, clean, sigmas=[0.1, 1e38], n_draws=4, sites="resid_post")
    frame = res.summary()
    assert res.nonfinite is not None
    assert int(res.nonfinite[0]) == 0 and int(res.nonfinite[1]) == 4 * 4
    assert frame["nonfinite"].tolist() == [0.0, 1.0]
    row = frame.iloc[1]
    assert row["dominant_token"] == -1
    assert all(pd_isnan(row[c]) for c in ("entropy", "top1_share", "kl", "flip_rate", "escaped"))
    assert (res.predictions[1] == -1).all()
    assert frame.iloc[0]["top1_share"] <= 1.0 and not pd_isnan(frame.iloc[0]["entropy"])


def pd_isnan(x) -> bool:
    return bool(x != x)


# ------------------------------------------------------------------------------ input
@pytest.mark.parametrize("backend", model_backends())
def test_empty_and_odd_tokens_get_one_clear_error(backend):
    model = random_model(5, backend=backend)
    clean, corrupted = random_tokens(model, batch=3, n_pos=6)
    metric = _metric(model, clean)

    def custom(logits):
        return logits[:, -1, 0]

    for m in (metric, custom):
        with pytest.raises(E, match="no rows"):
            apexlens.path_patch(model, clean[:0], corrupted[:0], senders="all-heads", metric=m)
        with pytest.raises(E, match="no positions"):
            apexlens.path_patch(model, clean[:, :0], corrupted[:, :0], senders="all-heads", metric=m)
    for dtype in (torch.uint8, torch.bool):
        with pytest.raises(E, match="integer tensor"):
            apexlens.path_patch(model, clean.to(dtype), corrupted.to(dtype), senders="all-heads", metric=metric)
    with pytest.raises(E, match="no rows"):
        apexlens.apex(model, clean[:0], sigmas=[1.0], n_draws=1)
    with pytest.raises(E, match="no positions"):
        apexlens.apex(model, clean[:, :0], sigmas=[1.0], n_draws=1)
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", model_backends())
def test_sender_sets_are_checked(backend):
    model = random_model(6, backend=backend)
    clean, corrupted = random_tokens(model, batch=2, n_pos=5)
    metric = _metric(model, clean)
    with pytest.raises(E, match="given twice"):
        apexlens.path_patch(model, clean, corrupted, senders=["0.1", "0.1"], metric=metric)
    with pytest.raises(E, match="nodes are given as a string"):
        apexlens.path_patch(model, clean, corrupted, senders=3, metric=metric)  # type: ignore[arg-type]
    with pytest.raises(E, match="given twice"):
        apexlens.act_patch(model, clean, corrupted, nodes=["m1", "m1"], metric=metric)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda lg: lg[:, -1, :2], r"shape \(3, 2\).*one value per example"),
        (lambda lg: lg[:, -1, 0].mean(), "drop the .mean"),
        (lambda lg: 1.5, "returned float"),
        (lambda lg: None, "returned NoneType"),
        (lambda lg: "good", "returned str"),
    ],
)
def test_metric_of_the_wrong_kind_gets_one_clear_error(bad, match):
    model = random_model(7)
    clean, corrupted = random_tokens(model, batch=3, n_pos=5)
    with pytest.raises(E, match=match):
        apexlens.path_patch(model, clean, corrupted, senders="heads:0", metric=bad)
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------ metrics
def test_plain_function_metric_runs_all_rows_at_once_with_the_same_numbers():
    model = random_model(8)
    clean, corrupted = random_tokens(model, batch=3, n_pos=6)
    metric = _metric(model, clean)
    calls = {"n": 0}

    def fn(logits):  # written with ... so it accepts a leading axis of runs
        calls["n"] += 1
        a, w = metric.answer.to(logits.device), metric.wrong.to(logits.device)
        last = logits[..., -1, :]
        return last.gather(-1, a.expand(*last.shape[:-2], -1)[..., None])[..., 0] - last.gather(
            -1, w.expand(*last.shape[:-2], -1)[..., None]
        )[..., 0]

    exp = apexlens.Experiment(model, clean, corrupted, metric=fn)
    calls["n"] = 0  # (the probe calls it a few times on the clean run)
    fast = exp.path_patch("all-heads", "2.0.q")
    ref = apexlens.path_patch(model, clean, corrupted, senders="all-heads", receivers="2.0.q", metric=metric)
    torch.testing.assert_close(fast.per_example, ref.per_example, atol=1e-10, rtol=0)
    assert calls["n"] < 12  # not one call per sender (12 senders): all rows at once

    def per_example_only(logits):  # indexes the batch axis explicitly: must fall back
        return logits[torch.arange(logits.shape[0]), -1, metric.answer] - logits[
            torch.arange(logits.shape[0]), -1, metric.wrong
        ]

    slow = apexlens.path_patch(model, clean, corrupted, senders="all-heads", receivers="2.0.q", metric=per_example_only)
    torch.testing.assert_close(slow.per_example, ref.per_example, atol=1e-10, rtol=0)


@pytest.mark.requires_hooked
def test_single_logit_output_says_why_proportion_explained_is_undefined():
    cfg = random_config(d_vocab=7)
    cfg["d_vocab_out"] = 1
    model = build(cfg, random_state_dict(cfg, 9, torch.float64), "hooked")
    clean, corrupted = random_tokens(model, batch=4, n_pos=5)
    metric = apexlens.scoring.OutputSquaredError(model(clean))
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    res = exp.evaluate_circuit([("embed", "logits")])
    with pytest.warns(RuntimeWarning, match="single output"):
        assert res.proportion_explained != res.proportion_explained  # NaN, with the reason
    assert res.recovery == res.recovery  # recovery works with the squared-error metric
    assert float(exp.clean_values.abs().max()) < 1e-24  # 0 up to float64 rounding


# ------------------------------------------------------------------------------ results
@pytest.mark.parametrize("backend", model_backends())
def test_act_patch_normalises_as_restoration(backend):
    model = random_model(10, backend=backend)
    clean, corrupted = random_tokens(model, batch=3, n_pos=5)
    metric = _metric(model, clean)
    res = apexlens.act_patch(model, clean, corrupted, nodes=["r0", "r3", "0.0"], metric=metric)
    assert isinstance(res, apexlens.ActPatchResult)
    norm = res.normalized()
    torch.testing.assert_close(norm[:2], torch.ones(2, dtype=norm.dtype), atol=1e-9, rtol=0)
    assert res.kind == "act_patch"


@pytest.mark.requires_hooked
def test_act_patch_per_position_matches_transformerlens_by_pos():
    from transformer_lens import patching as tl_patching

    model = random_model(11, backend="hooked")
    clean, corrupted = random_tokens(model, batch=2, n_pos=5)
    metric = _metric(model, clean)
    res = apexlens.act_patch(model, clean, corrupted, nodes="all-heads", metric=metric, per_position=True)
    _, cache = model.run_with_cache(clean)
    tl = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, lambda lg: metric(lg).mean())
    assert res.values.shape == tl.shape  # [layer, pos, head]
    # TransformerLens stores its sweep in float32: compare at float32 resolution
    torch.testing.assert_close(res.values, tl.to(res.values.dtype), atol=1e-6, rtol=0)
    one = naive_act_patch(model, clean, corrupted, nodes=[("blocks.1.attn.hook_z", 2)], metric=metric)
    assert one.shape == (1, 2)


def test_circuit_result_reads_well():
    model = random_model(12)
    clean, corrupted = random_tokens(model, batch=3, n_pos=5)
    res = apexlens.evaluate_circuit(model, clean, corrupted, [("embed", "logits")], metric=_metric(model, clean))
    text = repr(res)
    assert "tensor(" not in text and "recovery" in text and len(text) < 300
    summary = res.summary()
    assert summary["n_edges"].dtype.kind == "i" and int(summary["n_edges"].iloc[0]) == 1
    assert set(res.to_frame().columns) >= {"metric", "clean", "ablated", "recovery", "aue", "ate"}


@pytest.mark.requires_hooked
@pytest.mark.parametrize("act_fn", ["gelu_new", "gelu", "relu", "silu", "gelu_pytorch_tanh", "gelu_fast"])
def test_backend_mlp_equals_the_model_module(act_fn):
    """The engine's MLP (fused activations for TL's plain MLP) is the model's own function,
    and calling it fires none of the user's hooks."""
    from apexlens.model import backend_for

    cfg = random_config()
    cfg["act_fn"] = act_fn
    model = build(cfg, random_state_dict(cfg, 13, torch.float64), "hooked")
    bk = backend_for(model)
    x = torch.randn(2, 3, 5, cfg["d_model"], dtype=torch.float64)
    fired = []
    model.blocks[1].mlp.hook_post.add_hook(lambda act, hook: fired.append(act.shape))
    expected = torch.stack([model.blocks[1].mlp(row) for row in x])
    fired.clear()
    torch.testing.assert_close(bk.mlp(1, x), expected, atol=1e-12, rtol=0)
    assert fired == []
    model.reset_hooks()


@pytest.mark.requires_hooked
@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre"])
def test_backend_norms_equal_the_model_modules(norm):
    """The engine's normalisations (fused kernels for TL's norms) are the model's own."""
    from apexlens.model import backend_for

    cfg = random_config(normalization_type=norm)
    model = build(cfg, random_state_dict(cfg, 14, torch.float64), "hooked")
    bk = backend_for(model)
    x = 3 * torch.randn(2, 5, 4, cfg["d_model"], dtype=torch.float64)
    torch.testing.assert_close(bk.ln1(1, x), model.blocks[1].ln1(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(bk.ln2(2, x), model.blocks[2].ln2(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(bk.ln_final(x), model.ln_final(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_circuits_in_example_chunks_equal_one_pass(ablation):
    """A tiny memory budget runs the circuit one example at a time: same numbers."""
    model = random_model(15)
    clean, corrupted = random_tokens(model, batch=4, n_pos=5)
    metric = _metric(model, clean)
    edges = apexlens.full_graph(model)[::3]
    one = apexlens.Experiment(model, clean, corrupted, metric=metric).evaluate_circuit(edges, ablation=ablation)
    tiny = apexlens.Experiment(model, clean, corrupted, metric=metric, memory_budget=1)
    chunked = tiny.evaluate_circuit(edges, ablation=ablation)
    torch.testing.assert_close(chunked.scores.values, one.scores.values, atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked.corrupted.values, one.corrupted.values, atol=1e-12, rtol=0)


def test_plain_metric_reads_are_found_verified_and_exact():
    """A plain function metric is probed on the clean run: the positions and columns it
    reads are found (traced) and verified (NaN elsewhere gives the same values); only
    those are computed, with the numbers of the declared metric. A read without a gradient
    (0 * x) is a read all the same: its position and column are computed too."""
    model = random_model(16)
    clean, corrupted = random_tokens(model, batch=3, n_pos=6)
    metric = _metric(model, clean)
    a, w = metric.answer, metric.wrong

    def plain(logits):
        last = logits[..., -1, :]
        lead = last.shape[:-2]
        return (
            last.gather(-1, a.expand(*lead, -1)[..., None])[..., 0]
            - last.gather(-1, w.expand(*lead, -1)[..., None])[..., 0]
        )

    def log_prob(logits):
        return logits[..., -1, :].log_softmax(-1)[..., 0]

    def hidden_read(logits):
        return plain(logits) + 0 * logits[..., 0, 0]

    ref = apexlens.path_patch(model, clean, corrupted, senders="all-heads", metric=metric)
    for fn, idx, cols in ((plain, [5], 2), (log_prob, [5], None), (hidden_read, [0, 5], 3)):
        exp = apexlens.Experiment(model, clean, corrupted, metric=fn)
        assert exp.readout.probed
        assert exp.readout.idx.tolist() == [idx] * 3
        assert (exp.readout.tokens is None) == (cols is None)
        got = exp.path_patch("all-heads", "logits")
        expected = ref.per_example if fn is not log_prob else None
        if expected is not None:
            torch.testing.assert_close(got.per_example, expected, atol=1e-10, rtol=0)
        else:
            naive = naive_path_patch(model, clean, corrupted, senders="all-heads", metric=fn)
            torch.testing.assert_close(got.per_example, naive, atol=1e-10, rtol=0)


@pytest.mark.requires_hooked
@pytest.mark.parametrize("parallel", [False, True])
def test_edge_index_validity_equals_has_edge(parallel):
    from apexlens.model import backend_for
    from apexlens.vocab import EdgeIndex, has_edge

    cfg = random_config()
    cfg["parallel_attn_mlp"] = parallel
    bk = backend_for(build(cfg, random_state_dict(cfg, 17, torch.float64), "hooked"))
    idx = EdgeIndex(bk)
    slow = [[has_edge(bk.dims, s, r) for r in idx.receivers] for s in idx.senders]
    assert idx.valid.tolist() == slow
    assert bool((~idx.valid).any())


def test_plain_metric_gets_the_read_positions_alone_only_when_that_gives_its_values():
    model = random_model(18)
    clean, corrupted = random_tokens(model, batch=3, n_pos=6)

    def last(logits):  # reads the last position through ...: the compact form works
        return logits[..., -1, :].log_softmax(-1)[..., 2]

    def absolute(logits):  # reads position 4 by its index: needs the full shape
        return logits[..., 4, :].log_softmax(-1)[..., 2]

    for fn, compact in ((last, True), (absolute, False)):
        exp = apexlens.Experiment(model, clean, corrupted, metric=fn)
        assert exp.readout.probed and exp.readout.compact is compact
        got = exp.path_patch("all-heads", ["2.1.q", "logits"]).per_example
        naive = naive_path_patch(model, clean, corrupted, senders="all-heads", receivers=["2.1.q", "logits"], metric=fn)
        torch.testing.assert_close(got, naive, atol=1e-10, rtol=0)


def test_index_on_gives_slices_or_one_cached_tensor():
    """Device indices are made once: a contiguous run is a slice (no index tensor), any
    other list one cached tensor per (integers, device), with the same rows as the list."""
    from apexlens.model.indexing import index_on

    cpu = torch.device("cpu")
    assert index_on([3, 4, 5], cpu) == slice(3, 6)
    a, b = index_on([4, 1, 2], cpu), index_on((4, 1, 2), cpu)
    assert isinstance(a, torch.Tensor) and a is b and a.tolist() == [4, 1, 2]
    x = torch.arange(24.0).reshape(6, 4)
    for rows in ([0, 2, 5], [5, 4], [1, 2, 3], [2]):
        assert torch.equal(x[index_on(rows, cpu)], x[rows])


def test_plain_metric_rows_run_together_and_its_logits_are_built_in_pieces(monkeypatch):
    """A probed plain metric that reads a few columns is charged what it reads, not
    full-vocabulary logits per row: it ran one row (sender) per chunk where the declared
    metric ran all of them (10x slower on a Llama-shaped model). The full-shaped logits it
    is given are built a few rows at a time, with the declared metric's numbers."""
    from apexlens.runs import Readout

    model = random_model(8, d_vocab=2000)
    clean, corrupted = random_tokens(model, batch=3, n_pos=6)
    metric = _metric(model, clean)
    a, w = metric.answer, metric.wrong
    lead_rows: list[int] = []

    def plain(logits):
        if logits.ndim == 4:
            lead_rows.append(logits.shape[0])
        last = logits[..., -1, :]
        lead = last.shape[:-2]
        return last.gather(-1, a.expand(*lead, -1)[..., None])[..., 0] - last.gather(
            -1, w.expand(*lead, -1)[..., None]
        )[..., 0]

    def absolute(logits):  # needs the full shape (compact=False)
        return logits[..., 5, :].log_softmax(-1)[..., 2]

    declared = apexlens.Experiment(model, clean, corrupted, metric=metric, memory_budget=1 << 20)
    probed = apexlens.Experiment(model, clean, corrupted, metric=plain, memory_budget=1 << 20)
    n = len(declared.nodes("all-heads"))
    assert declared.runs.rows_per_chunk(n, 3, False, declared.readout) == n
    assert probed.readout.probed and probed.runs.rows_per_chunk(n, 3, False, probed.readout) == n

    piece = 2 * 3 * 1 * 2000 * 8  # two rows of [batch, 1, vocab] float64 logits
    monkeypatch.setattr(Readout, "PIECE_BYTES", piece)
    ref = declared.path_patch("all-heads", "logits").per_example
    got = probed.path_patch("all-heads", "logits").per_example
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    assert lead_rows and max(lead_rows) == 2 and sum(lead_rows) >= n

    exp = apexlens.Experiment(model, clean, corrupted, metric=absolute, memory_budget=1 << 20)
    assert exp.readout.probed and not exp.readout.compact
    monkeypatch.setattr(Readout, "PIECE_BYTES", 3 * 3 * 6 * 2000 * 8)  # three rows, full shape
    naive = naive_path_patch(model, clean, corrupted, senders="all-heads", metric=absolute)
    torch.testing.assert_close(exp.path_patch("all-heads", "logits").per_example, naive, atol=1e-10, rtol=0)
