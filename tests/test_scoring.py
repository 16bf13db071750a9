"""Metrics against their obvious definitions (float64), broadcasting, and Scores statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apexlens import ApexlensError
from apexlens.scoring import (
    AnswerLogProb,
    AnswerProb,
    FunctionMetric,
    KLDivergence,
    LogitDiff,
    LogitDiffRecovery,
    Scores,
    all_finite,
    check_finite,
    recovery,
    scores_frame,
)

g = torch.Generator().manual_seed(0)
LOGITS = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
ANS = torch.tensor([1, 2, 3, 4])
WRONG = torch.tensor([5, 6, 7, 8])
B = torch.arange(4)


def test_logit_diff_definitions():
    expected = LOGITS[B, -1, ANS] - LOGITS[B, -1, WRONG]
    torch.testing.assert_close(LogitDiff(ANS, WRONG)(LOGITS), expected)
    pos = torch.tensor([0, 2, 4, 5])
    torch.testing.assert_close(
        LogitDiff(ANS, WRONG, positions=pos)(LOGITS), LOGITS[B, pos, ANS] - LOGITS[B, pos, WRONG]
    )
    # several positions per example: mean over them
    pos2 = torch.tensor([[1, 2], [3, 4], [0, 5], [2, 2]])
    a2, w2 = ANS[:, None].expand(4, 2), WRONG[:, None].expand(4, 2)
    want = torch.stack(
        [(LOGITS[b, pos2[b], a2[b]] - LOGITS[b, pos2[b], w2[b]]).mean() for b in range(4)]
    )
    torch.testing.assert_close(LogitDiff(a2, w2, positions=pos2)(LOGITS), want)
    torch.testing.assert_close(
        LogitDiff([1, 2, 3, 4], [5, 6, 7, 8])(LOGITS), expected
    )  # python lists


def test_reduce_broadcasts_over_leading_dims():
    metric = LogitDiff(ANS, WRONG, positions=-1)
    idx = metric.read_positions(4, 6)
    stacked = torch.randn(3, 4, 6, 11, generator=g, dtype=torch.float64)
    sel = stacked.gather(2, idx[None, ..., None].expand(3, -1, -1, 11))[..., metric.tokens]
    torch.testing.assert_close(metric.reduce(sel), torch.stack([metric(x) for x in stacked]))
    kl = KLDivergence(LOGITS)
    sel_full = stacked.gather(2, idx[None, ..., None].expand(3, -1, -1, 11))
    torch.testing.assert_close(kl.reduce(sel_full), torch.stack([kl(x) for x in stacked]))


def test_reduce_on_changing_shapes_gives_each_shapes_values():
    """The answer/wrong columns are built once per shape: shapes in turn (and back) each get
    their own, equal to the obvious loop."""
    metric = LogitDiff(ANS, WRONG)
    for lead in [(), (3,), (2, 5), (), (3,)]:
        sel = torch.randn(*lead, 4, 2, 8, generator=g, dtype=torch.float64)
        ai, wi = metric._ai, metric._wi
        want = torch.stack(
            [(sel[..., b, :, ai[b]] - sel[..., b, :, wi[b]]).mean(-1) for b in range(4)], -1
        )
        torch.testing.assert_close(metric.reduce(sel), want, rtol=0, atol=0)
    with pytest.raises(ApexlensError, match="answers for a batch"):
        metric.reduce(torch.randn(3, 2, 8, generator=g))


def test_all_finite_is_the_elementwise_check():
    big = torch.finfo(torch.float32).max
    cases = [
        torch.tensor([1.0, 2.0]),
        torch.tensor([1.0, math.nan]),
        torch.tensor([math.inf, 1.0]),
        torch.tensor([math.inf, -math.inf]),  # sums to NaN
        torch.tensor([big, big]),  # finite values whose sum overflows
        torch.tensor([-big, -big, 1.0]),
        torch.tensor([], dtype=torch.float64),
        torch.tensor([3, 4]),
        torch.tensor([True, False]),
        torch.tensor([1.0, math.nan], dtype=torch.float16),
    ]
    for t in cases:
        assert all_finite(t) is bool(torch.isfinite(t).all()), t


def test_kl_and_probabilities():
    other = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    p, q = F.softmax(LOGITS[:, -1], -1), F.softmax(other[:, -1], -1)
    want = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(KLDivergence(LOGITS)(other), want)
    assert KLDivergence(LOGITS)(LOGITS).abs().max() < 1e-12
    torch.testing.assert_close(AnswerProb(ANS)(other), q[B, ANS])
    torch.testing.assert_close(AnswerLogProb(ANS)(other), q[B, ANS].log())


def test_recovery():
    clean, corrupted = LogitDiff(ANS, WRONG)(LOGITS), LogitDiff(ANS, WRONG)(LOGITS.flip(0))
    rec = LogitDiffRecovery(ANS, WRONG, clean, corrupted)
    torch.testing.assert_close(rec(LOGITS), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(
        rec(LOGITS.flip(0)), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert float(recovery(torch.tensor(1.5), 2.0, 1.0)) == 0.5
    with pytest.raises(ApexlensError, match="equal"):
        LogitDiffRecovery(ANS, WRONG, clean, clean)
    with pytest.raises(ApexlensError, match="equal"):
        recovery(torch.tensor(1.0), 1.0, 1.0)


def test_function_metric_and_errors():
    fm = FunctionMetric(lambda sel: sel[..., 0, 0] - sel[..., 0, 1], positions=-1, tokens=[3, 9])
    torch.testing.assert_close(fm(LOGITS), LOGITS[:, -1, 3] - LOGITS[:, -1, 9])
    with pytest.raises(ApexlensError, match="NaN"):
        check_finite(torch.tensor([1.0, math.nan]))
    with pytest.raises(ApexlensError, match="same shape"):
        LogitDiff(ANS, WRONG[:3])
    with pytest.raises(ApexlensError, match="out of range"):
        LogitDiff(ANS, WRONG, positions=9)(LOGITS)
    with pytest.raises(ApexlensError, match="integer"):
        LogitDiff(ANS.float(), WRONG)
    with pytest.raises(ApexlensError, match="batch"):
        LogitDiff(ANS, WRONG, positions=torch.tensor([1, 2]))(LOGITS)


def test_scores_statistics():
    v = torch.tensor([1.0, 2.0, 4.0, 7.0, 11.0])
    s = Scores(v)
    assert s.mean == pytest.approx(5.0)
    assert s.sem == pytest.approx(float(v.std(unbiased=True)) / math.sqrt(5))
    lo, hi = s.ci(seed=3)
    assert lo < s.mean < hi and (lo, hi) == s.ci(seed=3) and (lo, hi) != s.ci(seed=4)
    wide = s.ci(level=0.99, seed=3)
    assert wide[0] <= lo and wide[1] >= hi
    assert list(s.to_frame().columns) == ["example", "value"] and len(s.to_frame()) == 5
    frame = scores_frame({"a": s, "b": Scores(v * 2)})
    assert list(frame["name"]) == ["a", "b"] and frame["mean"].tolist() == [5.0, 10.0]
    assert {"sem", "ci_low", "ci_high", "n"} <= set(frame.columns)
    with pytest.raises(ApexlensError, match="level"):
        s.ci(level=1.5)
