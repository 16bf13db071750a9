"""Plain function metrics read soundly (issue 23, item 1).

A plain function is traced once on the clean logits (:mod:`apexlens.runs.reads`) to prove
which logits it reads; only those are computed from then on. Before, the reads came from
the gradient and were "verified" with NaN in every other logit -- a read used only inside a
comparison (``torch.where(a > b, a, b)``) has no gradient where the comparison goes one way,
and ``NaN > x`` is simply False, so the check passed and every engine gave wrong numbers.

Each pattern below must give, in every engine, the numbers of a slow loop that calls the
metric on whole forward passes' logits: Experiment values (``metric(model(tokens))``),
``path_patch`` and ``act_patch`` (:mod:`apexlens.reference`), ``evaluate_circuit``
(``metric(model(clean))`` inside :func:`apexlens.patched`) and exact edge attribution (one
frozen-MLP path patch per edge).
"""

from __future__ import annotations

import random

import pytest
import torch

import apexlens
from apexlens.reference import naive_act_patch, naive_path_patch
from apexlens.runs.reads import traced_reads

from backends import model_backends
from helpers import hook_count, random_model

TOL = 1e-10
A, B = 5, 3  # clean inputs: logit A beats logit B at the last position
MASK = torch.zeros(41, dtype=torch.bool)
MASK[[3, 5, 11]] = True
PER_POS = torch.tensor([7, 5, 6])
PER_TOK = torch.tensor([3, 5, 9])


def where(lg):  # the issue's reproduction: B read only inside the comparison on clean runs
    return torch.where(lg[..., -1, B] > lg[..., -1, A], lg[..., -1, B], lg[..., -1, A])


def branch(lg):  # Python control flow on values: unprovable, gets the full logits
    return lg[..., -1, A] if bool((lg[..., -1, A] > lg[..., -1, B]).all()) else lg[..., -1, B]


PATTERNS = {
    "where": where,
    "gate": lambda lg: lg[..., -1, A] * (1 + (lg[..., -1, B] > lg[..., -1, A]).to(lg.dtype)),
    "maximum": lambda lg: torch.maximum(lg[..., -1, B], lg[..., -1, A]),
    "argmax": lambda lg: lg[..., -1, :].argmax(-1).to(lg.dtype) + lg[..., -1, A],
    "argmax-gather": lambda lg: lg[..., -1, :].gather(-1, lg[..., -2, :].argmax(-1, keepdim=True))[..., 0],
    "topk": lambda lg: lg[..., -1, :].topk(2, -1).values[..., 1] - lg[..., -1, A],
    "sort": lambda lg: lg[..., -1, [A, B, 7]].sort(-1).values[..., 1],
    "masking": lambda lg: lg[..., -1, :].masked_fill(~MASK, -1e9).max(-1).values,
    "max-min": lambda lg: lg[..., -1, [A, B]].max(-1).values - lg[..., -2, [A, B]].min(-1).values,
    "bool-index": lambda lg: lg[..., -1, :][..., MASK].logsumexp(-1),
    "data-index": lambda lg: lg[torch.arange(3), -1, lg[..., 0, :].argmax(-1)],
    "control-flow": branch,
    "logsumexp": lambda lg: lg[..., -1, A] - lg[..., -1, :].logsumexp(-1),
    "softmax-slice": lambda lg: lg[..., -1, [A, B]].softmax(-1)[..., 0],
    "log-softmax-all": lambda lg: lg.log_softmax(-1)[..., -1, A],
    "per-example": lambda lg: lg[..., torch.arange(3), PER_POS, PER_TOK],
    "float-cast": lambda lg: lg.float().double()[..., -1, A] * 2,
    "item": lambda lg: lg[..., -1, A] * float(lg[0, -1, B] > 0),
}


def _model_and_tokens(backend: str):
    model = random_model(23, backend=backend, n_layers=2, attn_only=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(200):  # clean: A beats B everywhere; corrupted: B wins somewhere
            clean = torch.randint(0, 41, (3, 8), generator=g)
            corrupted = torch.randint(0, 41, (3, 8), generator=g)
            c, k = model(clean)[:, -1], model(corrupted)[:, -1]
            if bool((c[:, A] > c[:, B]).all()) and bool((k[:, B] > k[:, A]).any()):
                return model, clean, corrupted
    raise AssertionError("no such inputs")


@pytest.fixture(scope="module", params=model_backends())
def setup(request):
    return _model_and_tokens(request.param)


def test_the_issue_reproduction_gives_the_metric_of_the_corrupted_logits(setup):
    model, clean, corrupted = setup
    exp = apexlens.Experiment(model, clean, corrupted, metric=where)
    with torch.no_grad():
        expected = where(model(corrupted))
    torch.testing.assert_close(exp.corrupted_values, expected, atol=TOL, rtol=0)
    assert exp.readout.probed and exp.readout.tokens is not None
    assert sorted(exp.readout.tokens.tolist()) == [B, A]  # both read, though B never wins


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_engine_equals_the_naive_loops(setup, name):
    model, clean, corrupted = setup
    fn = PATTERNS[name]
    exp = apexlens.Experiment(model, clean, corrupted, metric=fn)
    with torch.no_grad():
        torch.testing.assert_close(exp.clean_values, fn(model(clean)), atol=TOL, rtol=0)
        torch.testing.assert_close(exp.corrupted_values, fn(model(corrupted)), atol=TOL, rtol=0)

    got = exp.path_patch("all-heads", ["1.0.q", "logits"]).per_example
    slow = naive_path_patch(
        model, clean, corrupted, senders="all-heads", receivers=["1.0.q", "logits"], metric=fn
    )
    torch.testing.assert_close(got, slow, atol=TOL, rtol=0)

    nodes = exp.nodes("all-heads")
    got = exp.act_patch("all-heads").per_example
    slow = naive_act_patch(
        model,
        clean,
        corrupted,
        nodes=[(f"blocks.{n.layer}.attn.hook_z", n.head) for n in nodes],
        metric=fn,
    )
    torch.testing.assert_close(got, slow, atol=TOL, rtol=0)

    edges = apexlens.full_graph(model)[::2]
    with apexlens.patched(model, apexlens.Circuit(edges), corrupted), torch.no_grad():
        slow = fn(model(clean))
    torch.testing.assert_close(exp.evaluate_circuit(edges).scores.values, slow, atol=TOL, rtol=0)

    pick = [("0.1", "1.0.v"), ("embed", "logits"), ("1.1", "logits")]
    scores = apexlens.attribute_edges(exp, None, None, metric=fn, method="exact", edges=pick)
    for (s, r), per_example in zip(scores.edges, scores.per_example, strict=True):
        slow = naive_path_patch(
            model, clean, corrupted, senders=[s], receivers=[r], metric=fn, mlps="frozen"
        )[0]
        torch.testing.assert_close(per_example, slow - exp.clean_values, atol=TOL, rtol=0)
    assert hook_count(model) == 0


def test_reads_are_tight_where_they_can_be():
    """The trace finds exactly the logits a metric reads for the common forms (the fast
    path stays fast); value-dependent control flow and boolean masks are not proven."""
    x = torch.randn(3, 8, 41, dtype=torch.float64)

    def reads(fn):
        r = traced_reads(fn, x)
        return None if r is None else (r.any(-1).nonzero()[:, 1].unique().tolist(),
                                       r.any(0).any(0).nonzero().flatten().tolist())

    assert reads(lambda lg: lg[..., -1, A] - lg[..., -1, B]) == ([7], [B, A])
    assert reads(where) == ([7], [B, A])
    assert reads(PATTERNS["masking"]) == ([7], [3, 5, 11])
    assert reads(PATTERNS["bool-index"]) == ([7], [3, 5, 11])
    assert reads(PATTERNS["max-min"]) == ([6, 7], [B, A])
    assert reads(PATTERNS["per-example"]) == ([5, 6, 7], [3, 5, 9])
    assert reads(PATTERNS["float-cast"]) == ([7], [A])
    assert reads(PATTERNS["log-softmax-all"]) == ([7], list(range(41)))  # the whole row
    assert reads(PATTERNS["argmax"]) == ([7], list(range(41)))
    assert reads(lambda lg: (lg - lg.logsumexp(-1, keepdim=True))[..., -1, A]) == ([7], list(range(41)))
    assert reads(lambda lg: lg[..., -1, A] + 0 * lg[..., 0, 0]) == ([0, 7], [0, A])
    for unproven in (
        branch,
        PATTERNS["item"],
        lambda lg: lg[lg > 0].sum().expand(3),  # shape depends on values
        lambda lg: torch.tensor([max(r) for r in lg[:, -1].tolist()]),  # values leave torch
        lambda lg: lg.mean((-1, -2)),  # reads everything
    ):
        assert reads(unproven) is None


def test_a_read_refuted_by_the_refill_check_gets_the_full_logits(monkeypatch):
    """The second check: if the proven reads were ever short, a refill of the other logits
    changes the values and the metric gets everything."""
    import apexlens.runs.readout as readout

    model, clean, corrupted = _model_and_tokens(model_backends()[0])
    only_a = torch.zeros(3, 8, 41, dtype=torch.bool)
    only_a[:, -2, A] = True  # short: the metric reads position 7
    monkeypatch.setattr(readout, "traced_reads", lambda fn, x: only_a.clone())
    exp = apexlens.Experiment(model, clean, corrupted, metric=where)
    assert not exp.readout.probed
    with torch.no_grad():
        torch.testing.assert_close(exp.corrupted_values, where(model(corrupted)), atol=TOL, rtol=0)


# ------------------------------------------------------------------ random programs
def _random_metric(rng: random.Random):
    """A random metric over ``[3, 6, 11]`` logits, built from views, selections, masks,
    element-wise ops, comparisons, along-dimension ops and value-dependent indexing (every
    step keeps the batch axis first; the result is ``[3]``)."""
    V = 11
    cols = sorted(rng.sample(range(V), rng.randint(1, 4)))
    mask = torch.zeros(V, dtype=torch.bool)
    mask[cols] = True
    p1, p2 = rng.randrange(6), rng.randrange(-6, 0)

    def branch(lg):  # another tensor derived from the logits, [3, V]
        return rng_choice[0](lg)

    views = [
        lambda lg: lg[:, p1, :],
        lambda lg: lg[..., p2, :],
        lambda lg: lg[:, [p1, p2], :].sum(1),
        lambda lg: lg.transpose(1, 2)[:, :, p1],
        lambda lg: lg.log_softmax(-1)[:, p2],
        lambda lg: (lg - lg.logsumexp(-1, keepdim=True))[:, p1],
    ]
    rng_choice = [rng.choice(views)]
    steps = [
        lambda t, lg: t * 2 + 1,
        lambda t, lg: t.tanh(),
        lambda t, lg: t + branch(lg)[:, : t.shape[-1]],
        lambda t, lg: torch.maximum(t, branch(lg)[:, : t.shape[-1]]),
        lambda t, lg: torch.where(t > branch(lg)[:, : t.shape[-1]], t, -t),
        lambda t, lg: torch.where(mask[: t.shape[-1]], t, branch(lg)[:, : t.shape[-1]]),
        lambda t, lg: t.masked_fill(~mask[: t.shape[-1]], -1e4),
        lambda t, lg: t[:, mask[: t.shape[-1]]] if mask[: t.shape[-1]].any() else t,
        lambda t, lg: t[:, [c for c in cols if c < t.shape[-1]] or [0]],
        lambda t, lg: t.gather(-1, torch.zeros(3, 1, dtype=torch.long) + min(cols[0], t.shape[-1] - 1)),
        lambda t, lg: t.softmax(-1),
        lambda t, lg: t.cumsum(-1),
        lambda t, lg: t.sort(-1).values,
        lambda t, lg: t.topk(min(2, t.shape[-1]), -1).values,
        lambda t, lg: t.max(-1, keepdim=True).values,
        lambda t, lg: t.logsumexp(-1, keepdim=True),
        lambda t, lg: t.argmax(-1, keepdim=True).to(t.dtype),
        lambda t, lg: t.gather(-1, t.argmax(-1, keepdim=True)),
        lambda t, lg: branch(lg).gather(-1, t.argmin(-1, keepdim=True).clamp(max=V - 1)),
        lambda t, lg: torch.cat([t, branch(lg)[:, cols]], -1),
        lambda t, lg: torch.stack([t[:, 0], branch(lg)[:, cols[-1]]], -1),
        lambda t, lg: t.flip(-1),
        # a reduction over a few columns mixed with single columns (spreads and plain reads)
        lambda t, lg: t[:, [c % t.shape[-1] for c in cols]].amax(-1, keepdim=True) + branch(lg)[:, p1 % V : p1 % V + 1],
        lambda t, lg: torch.where(mask[:3, None], t[:, [c % t.shape[-1] for c in cols]].amin(-1, keepdim=True), branch(lg)[:, :1]),
        lambda t, lg: torch.cat([branch(lg)[:, -1:], t[:, [c % t.shape[-1] for c in cols]].logsumexp(-1, keepdim=True)], -1),
    ]
    program = [rng.choice(steps) for _ in range(rng.randint(1, 5))]
    finish = rng.choice([lambda t: t.sum(-1), lambda t: t[:, -1], lambda t: t.amin(-1)])

    def metric(lg):
        t = rng_choice[0](lg)
        for step in program:
            t = step(t, lg)
        return finish(t)

    return metric


def test_random_metrics_never_read_outside_their_proven_reads():
    """The soundness property itself, on a few hundred random metrics: whatever the logits outside the
    proven reads hold -- random, huge, very negative -- the values do not change."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 11, dtype=torch.float64, generator=g)
    proven = tried = 0
    for i in range(250):
        fn = _random_metric(rng)
        try:
            ref = fn(x)
        except (RuntimeError, IndexError):  # a program whose shapes do not fit: skip it
            continue
        tried += 1
        read = traced_reads(fn, x)
        if read is None:
            continue
        proven += 1
        for fill in (1e6, -1e6, None, None, None):
            noise = torch.randn(x.shape, dtype=x.dtype, generator=g) * 10 if fill is None else fill
            y = torch.where(read, x, noise)
            torch.testing.assert_close(fn(y), ref, atol=0, rtol=0, equal_nan=True, msg=f"metric {i}")
    assert tried > 150 and proven > 0.8 * tried, (tried, proven)
