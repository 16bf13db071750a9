"""The calibrated feature-visualization check (issue 29): its engine pieces against slow
references, the validity of its p-value under the null, and one clear error per bad input.

The decision on the shipped pair (``modadd-2l`` / ``-slingshot``) is in test_visualize.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import apexlens
from apexlens import ApexlensError
from apexlens.api.features import _plan
from apexlens.engines.features import (
    attribution,
    attribution_rows,
    climb,
    feature_grid,
    optimise,
    peer_test,
    top_contexts,
)
from apexlens.engines.features.measures import leave_one_out, ledoit_wolf, mahalanobis, rank_p
from apexlens.model import backend_for
from apexlens.model.hooks import inference_mode
from apexlens.reference import naive_climb
from apexlens.runs import progress_bar
from apexlens.toys.tasks.toy import ModAddTask
from apexlens.vocab import parse_feature

from backends import model_backends


def _plan_of(model, spec, **kw):
    s = dict(n_pos=4, steps=15, seed=3, restarts=3, prefix=(), vocab=None, direction=None,
             lr=0.1, init_scale=1.0, temperature=(1.0, 0.05), entropy=0.1, refine_steps=4,
             top_k=32)
    s.update(kw)
    return _plan(backend_for(model), model, spec, **s)


@pytest.mark.parametrize("backend", model_backends())
def test_peers_in_one_batch_are_the_visualizations_each_gets_alone(backend, toy_model_factory):
    model = toy_model_factory("modadd-2l", backend=backend, dtype=torch.float64)
    bk = backend_for(model)
    plan = _plan_of(model, "m1.n34")
    peers = tuple(parse_feature(model, s) for s in ("m1.n7", "m1.n43", "logit:3"))
    bar = progress_bar(1, "", False)
    with inference_mode(model, grad=True):
        together = optimise(bk, plan, bar, peers)
        for j, f in enumerate((plan.feature, *peers)):
            alone = optimise(bk, replace(plan, feature=f), bar)
            rows = slice(j * plan.restarts, (j + 1) * plan.restarts)
            assert torch.equal(together.tokens[rows], alone.tokens), f.spec
            torch.testing.assert_close(together.activation[rows], alone.activation, rtol=0,
                                       atol=1e-6)


@pytest.mark.parametrize("backend", model_backends())
def test_attribution_rows_equal_one_row_at_a_time(backend, toy_model_factory):
    model = toy_model_factory("modadd-2l", backend=backend, dtype=torch.float64)
    x = ModAddTask().batch(5, seed=2).clean_tokens
    feats = tuple(parse_feature(model, f"m1.n{i}") for i in (3, 34, 80))
    owner = torch.tensor([2, 0, 1, 1, 0])
    with inference_mode(model, grad=True):
        got = attribution_rows(model, feats, owner, x, 2)
        for i in range(x.shape[0]):
            one = attribution(model, replace(feats[int(owner[i])], position=2), x[i : i + 1])
            torch.testing.assert_close(got.scores[i], one.scores[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got.resid[i], one.resid[0], rtol=0, atol=0)
            torch.testing.assert_close(got.value[i], one.value[0], rtol=0, atol=0)
    grid = feature_grid(model, feats, x)
    for j, f in enumerate(feats):
        torch.testing.assert_close(grid[j], apexlens.feature_values(model, f, x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", model_backends())
def test_natural_start_climb_equals_the_exhaustive_loop(backend, toy_model_factory):
    """With proposals covering the vocabulary (top_k >= 25), the engine's climb is the naive
    best-single-swap loop, for a feature and a peer in one batch."""
    model = toy_model_factory("modadd-2l", backend=backend, dtype=torch.float64)
    plan = _plan_of(model, "m1.n34@2", refine_steps=6)
    peer = parse_feature(model, "m1.n7@2")
    starts = ModAddTask().batch(4, seed=5).clean_tokens
    with inference_mode(model, grad=True):
        found = climb(backend_for(model), plan, starts, progress_bar(1, "", False), (peer,))
    for j, f in enumerate((plan.feature, peer)):
        want = naive_climb(model, f, starts[2 * j : 2 * j + 2], 2, rounds=6)
        # the engine reports float32 values of the same discrete inputs
        torch.testing.assert_close(found.activation[2 * j : 2 * j + 2].double(), want,
                                   rtol=1e-6, atol=1e-6)


def test_top_contexts_keep_each_context_once():
    tokens = torch.tensor([[1, 2, 3], [1, 2, 4], [5, 2, 3]])
    values = torch.tensor([[0.0, 9.0, 1.0], [0.5, 9.0, 2.0], [0.1, 3.0, 8.0]])
    rows, cols = top_contexts(values, tokens, 4)
    # (0,1) and (1,1) are the same context [1, 2]: once, at its first place
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (2, 2), (2, 1), (1, 2)]
    values[0, 2] = math.nan
    rows, _ = top_contexts(values, tokens, 10)
    assert rows.numel() == 6  # 8 finite values; [1] and [1, 2] occur twice


def test_top_examples_drop_duplicate_contexts(toy_model_factory):
    model = toy_model_factory("modadd-2l")
    natural = ModAddTask().batch(200, seed=0).clean_tokens  # "BOS a" recurs at position 1
    nat = apexlens.top_examples(model, "m0.n5", natural, k=30)
    contexts = [tuple(natural[r, : c + 1].tolist()) for r, c in
                zip(nat.rows.tolist(), nat.cols.tolist(), strict=True)]
    assert len(set(contexts)) == len(contexts) == 30
    assert torch.all(nat.activations[:-1] >= nat.activations[1:])


def test_mahalanobis_and_ledoit_wolf_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g,
                                                                          dtype=torch.float64)
    n, p = X.shape
    # Ledoit & Wolf (2004), written out: S, mu, d^2, b^2 from per-sample outer products
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    mu = torch.trace(S) / p
    d2 = ((S - mu * torch.eye(p, dtype=X.dtype)) ** 2).sum()
    b2 = sum(((torch.outer(x, x) - S) ** 2).sum() for x in Xc) / n**2
    lam = min(b2, d2) / d2
    want = (1 - lam) * S + lam * mu * torch.eye(p, dtype=X.dtype)
    torch.testing.assert_close(ledoit_wolf(X), want, rtol=1e-6, atol=1e-9)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    d = x - X.mean(0)
    assert mahalanobis(x, X) == pytest.approx(float(d @ torch.linalg.inv(want) @ d) ** 0.5, rel=1e-6)
    s, null = leave_one_out(x, X)
    assert null[3] == pytest.approx(mahalanobis(X[3], torch.cat([X[:3], X[4:]])))


def test_p_value_is_valid_under_exchangeable_peers():
    """Honest feature and peers exchangeable (i.i.d. statistics, correlated across measures):
    P(p <= alpha) equals floor(alpha n) / n <= alpha, and the rank p-values are uniform."""
    g = torch.Generator().manual_seed(1)
    n, sims = 20, 3000
    mix = torch.tensor([[1.0, 0.8, 0.0, 0.3], [0.0, 0.6, 0.0, 0.3], [0.0, 0.0, 1.0, 0.9],
                        [0.0, 0.0, 0.0, 0.2]], dtype=torch.float64)
    ps = torch.tensor([peer_test(torch.randn(n, 4, generator=g, dtype=torch.float64) @ mix)[1]
                       for _ in range(sims)])
    for alpha in (0.05, 0.1, 0.25):
        want = math.floor(alpha * n) / n
        assert float((ps <= alpha + 1e-12).double().mean()) == pytest.approx(want, abs=0.02)
    counts = torch.bincount((ps * n).round().long(), minlength=n + 1)[1:]
    assert counts.min() > sims / n * 0.6 and counts.max() < sims / n * 1.4
    assert torch.equal(rank_p(torch.tensor([3.0, 1.0, 3.0, 2.0])),
                       torch.tensor([0.5, 1.0, 0.5, 0.75], dtype=torch.float64))


@pytest.fixture(scope="module")
def small_check(toy_model_factory):
    model = toy_model_factory("modadd-2l")
    natural = ModAddTask().batch(120, seed=0).clean_tokens
    kw = dict(n_pos=4, steps=20, restarts=2, refine_steps=2, k=10, peers=4, alpha=0.2)
    return model, natural, kw, apexlens.fv_check(model, "m1.n34", natural, **kw)


def test_check_frames_and_cached_peers(small_check):
    model, natural, kw, chk = small_check
    frame = chk.to_frame()
    for col in ("ratio", "start_ratio", "p_activation", "p_natural_start", "p_mechanism",
                "p_representation", "p_value", "alpha", "n_peers", "flagged"):
        assert col in frame.columns
    assert frame["n_peers"].iloc[0] == 4 and chk.statistics.shape == (5, 4)
    assert chk.p_value in {i / 5 for i in range(1, 6)}
    peers = chk.peer_frame()
    assert peers["checked"].tolist() == [True] + [False] * 4
    # the same peers, cached: the second feature's check uses their statistics as they were
    other = apexlens.fv_check(model, "m1.n43", natural, **kw)
    shared = set(chk.peers) & set(other.peers)
    for label in shared:
        a = chk.statistics[1 + chk.peers.index(label)]
        b = other.statistics[1 + other.peers.index(label)]
        assert torch.equal(a, b)
    # a given fv (made with the same settings) gives the same check
    fv = apexlens.visualize(model, "m1.n34", n_pos=4, steps=20, restarts=2, refine_steps=2)
    again = apexlens.fv_check(model, "m1.n34", natural, fv=fv, **kw)
    assert again.p_value == chk.p_value
    torch.testing.assert_close(again.statistics, chk.statistics, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"alpha must be in \(0, 1\)"),
        (dict(alpha=0.01), "could never flag"),
        (dict(peers=["m0.n3", "m1.n2", "m1.n5", "m1.n6"]), "same kind and layer"),
        (dict(peers=["m1.n34", "m1.n2", "m1.n5", "m1.n6"]), "must not include"),
        (dict(peers="m1.n2"), "peers must be an int or a list"),
        (dict(k=2), "k must be an int >= 3"),
        (dict(n_start=0), "n_start must be an int >= 1"),
        (dict(colour="red"), "unknown arguments"),
        (dict(peers=300), "live peers"),
    ],
)
def test_bad_check_arguments_get_one_clear_error(small_check, kwargs, match):
    model, natural, kw, _ = small_check
    with pytest.raises(ApexlensError, match=match):
        apexlens.fv_check(model, "m1.n34", natural, **{**kw, **kwargs})


def test_a_given_fv_must_match_the_settings(small_check):
    model, natural, kw, chk = small_check
    with pytest.raises(ApexlensError, match="pass the visualize settings"):
        apexlens.fv_check(model, "m1.n34", natural, fv=chk.fv, **{**kw, "restarts": 3})
    with pytest.raises(ApexlensError, match="visualizes 'm1.n34', not 'm1.n7'"):
        apexlens.fv_check(model, "m1.n7", natural, fv=chk.fv, **kw)
