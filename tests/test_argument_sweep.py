"""Every public function's numeric arguments, swept over odd values: only ApexlensError.

For each (function, argument) in :data:`TABLE` every value of its kind is tried -- wrong type,
wrong sign, NaN/inf, empty, wrong shape, bool for int, float for int. A value marked bad
must be refused with one :class:`ApexlensError`; any other value may be accepted, but
nothing may raise another exception (issue 23: raw ZeroDivisionError, IndexError, unpack and
Adam's errors came out of these before).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import apexlens
from apexlens import ApexlensError

from helpers import hook_count, random_model, random_tokens

NAN, INF = math.nan, math.inf
def _is(v: Any, ref: Any) -> bool:
    return type(v) is type(ref) and v == ref


COUNT_BAD = [-1, 2.5, True, "4", NAN, INF, [], torch.ones(2, 2), object()]
"""Never a count (an int >= 0 or >= 1)."""
COUNT_ODD = [0, None, torch.tensor(3)]
REAL_BAD = [NAN, INF, -INF, "0.1", True, [], torch.ones(2, 2), object()]
"""Never a finite real number."""
REAL_ODD = [-1.0, 0, 0.0, None, torch.tensor(0.5)]
SEQ_BAD = [[], [NAN], [[1.0, 2.0]], "abc", 2.5, torch.ones(2, 2), [True], [INF], object()]
"""Never a non-empty flat sequence of finite numbers (or ids)."""
SEQ_ODD = [[0], [-1.0], [1e30], (3,), torch.tensor([1, 2]), None]
KINDS = {
    "count": (COUNT_BAD, COUNT_ODD),
    "seed": ([v for v in COUNT_BAD if not _is(v, -1)], [-1, *COUNT_ODD]),  # any integer seeds
    "real": (REAL_BAD, REAL_ODD),
    "seq": (SEQ_BAD, SEQ_ODD),
    "prefix": ([v for v in SEQ_BAD if not _is(v, [])], [[], *SEQ_ODD]),  # no prefix: the default
}


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    model = random_model(31, n_layers=2, n_ctx=8)
    clean, corrupted = random_tokens(model, batch=2, n_pos=5, seed=3)
    metric = apexlens.LogitDiff(clean[:, -1], (clean[:, -1] + 1) % 41)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    scores = exp.attribute_edges(method="exact")
    return dict(model=model, clean=clean, corrupted=corrupted, metric=metric, exp=exp,
                scores=scores, fv=apexlens.visualize(model, "m0.n1", n_pos=4, steps=1,
                                                    restarts=1, refine_steps=0))


Call = Callable[[dict[str, Any], Any], Any]


def _pp(w: dict[str, Any], **kw: Any) -> Any:
    return apexlens.path_patch(w["model"], w["clean"], w["corrupted"], senders="0.0",
                               metric=w["metric"], **kw)


def _vis(w: dict[str, Any], **kw: Any) -> Any:
    base = dict(n_pos=4, steps=1, restarts=1, refine_steps=0)
    return apexlens.visualize(w["model"], "m0.n1", **{**base, **kw})


def _apex(w: dict[str, Any], **kw: Any) -> Any:
    base = dict(sigmas=[1.0], n_draws=1)
    return apexlens.apex(w["model"], w["clean"], **{**base, **kw})


def _noise(w: dict[str, Any], sigma: Any) -> Any:
    with apexlens.noise_hooks(w["model"], sigma):
        return w["model"](w["clean"])


TABLE: list[tuple[str, str, Call]] = [
    ("Experiment", "memory_budget", lambda w, v: apexlens.Experiment(
        w["model"], w["clean"], w["corrupted"], metric=w["metric"], memory_budget=v)),
    ("path_patch", "memory_budget", lambda w, v: _pp(w, memory_budget=v)),
    ("act_patch", "memory_budget", lambda w, v: apexlens.act_patch(
        w["model"], w["clean"], w["corrupted"], nodes="0.0", metric=w["metric"], memory_budget=v)),
    ("attribute_edges", "ig_steps", lambda w, v: w["exp"].attribute_edges(
        method="eap-ig", ig_steps=v, edges=[("0.0", "logits")])),
    ("faithfulness", "fractions", lambda w, v: w["exp"].faithfulness(w["scores"], fractions=v)),
    ("discover", "threshold", lambda w, v: w["exp"].discover(
        threshold=v, order=w["scores"], edges=[("0.0", "logits"), ("m1", "logits")])),
    ("discover", "batch_size", lambda w, v: w["exp"].discover(
        threshold=0.1, batch_size=v, edges=[("0.0", "logits")])),
    ("apex", "sigmas", lambda w, v: _apex(w, sigmas=v)),
    ("apex", "n_draws", lambda w, v: _apex(w, n_draws=v)),
    ("apex", "seed", lambda w, v: _apex(w, seed=v)),
    ("apex", "max_batch", lambda w, v: _apex(w, max_batch=v)),
    ("apex", "memory_budget", lambda w, v: _apex(w, memory_budget=v)),
    ("apex", "positions", lambda w, v: _apex(w, positions=v)),
    ("apex", "noise_positions", lambda w, v: _apex(w, noise_positions=v)),
    ("noise_hooks", "sigma", _noise),
    ("visualize", "n_pos", lambda w, v: _vis(w, n_pos=v)),
    ("visualize", "steps", lambda w, v: _vis(w, steps=v)),
    ("visualize", "seed", lambda w, v: _vis(w, seed=v)),
    ("visualize", "restarts", lambda w, v: _vis(w, restarts=v)),
    ("visualize", "refine_steps", lambda w, v: _vis(w, refine_steps=v)),
    ("visualize", "top_k", lambda w, v: _vis(w, refine_steps=1, top_k=v)),
    ("visualize", "lr", lambda w, v: _vis(w, lr=v)),
    ("visualize", "init_scale", lambda w, v: _vis(w, init_scale=v)),
    ("visualize", "entropy", lambda w, v: _vis(w, entropy=v)),
    ("visualize", "temperature", lambda w, v: _vis(w, temperature=v)),
    ("visualize", "prefix", lambda w, v: _vis(w, prefix=v)),
    ("visualize", "vocab", lambda w, v: _vis(w, vocab=v)),
    ("visualize", "direction", lambda w, v: apexlens.visualize(
        w["model"], "r1", direction=v, n_pos=4, steps=1, restarts=1, refine_steps=0)),
    ("top_examples", "k", lambda w, v: apexlens.top_examples(w["model"], "m0.n1", w["clean"], k=v)),
    ("top_examples", "batch_size", lambda w, v: apexlens.top_examples(
        w["model"], "m0.n1", w["clean"], batch_size=v)),
    ("top_examples", "positions", lambda w, v: apexlens.top_examples(
        w["model"], "m0.n1", w["clean"], positions=v)),
    ("fv_check", "k", lambda w, v: apexlens.fv_check(w["model"], "m0.n1", w["clean"], fv=w["fv"], k=v)),
    ("feature_values", "batch_size", lambda w, v: apexlens.feature_values(
        w["model"], "m0.n1", w["clean"], batch_size=v)),
    ("check", "tol", lambda w, v: apexlens.check(w["model"], tol=v)),
    ("task.batch", "n", lambda w, v: apexlens.get_task("induction").batch(v)),
    ("task.batch", "seed", lambda w, v: apexlens.get_task("induction").batch(4, seed=v)),
    ("EdgeScores.top", "k", lambda w, v: w["scores"].top(v)),
    ("EdgeScores.summary", "k", lambda w, v: w["scores"].summary(v)),
    ("LogitDiff", "answer", lambda w, v: apexlens.LogitDiff(v, torch.tensor([1, 2]))),
]
KIND = {
    "fractions": "seq", "sigmas": "seq", "positions": "seq", "noise_positions": "seq",
    "vocab": "seq", "temperature": "seq", "direction": "seq", "answer": "seq",
    "threshold": "real", "sigma": "real", "lr": "real", "init_scale": "real",
    "entropy": "real", "tol": "real", "seed": "seed", "prefix": "prefix",
}
CASES = [
    pytest.param(name, arg, call, value, bad, id=f"{name}-{arg}-{'bad' if bad else 'odd'}{i}")
    for name, arg, call in TABLE
    for bad_values, odd_values in [KINDS[KIND.get(arg, "count")]]
    for i, (value, bad) in enumerate([(v, True) for v in bad_values] + [(v, False) for v in odd_values])
]


@pytest.mark.parametrize("name, arg, call, value, bad", CASES)
def test_only_apexlens_errors(world, name, arg, call, value, bad):
    try:
        call(world, value)
    except ApexlensError as e:
        assert str(e), f"{name}({arg}={value!r}): an empty message"
        return
    except BaseException as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{name}({arg}={value!r}) raised {type(e).__name__}: {e}")
    finally:
        assert hook_count(world["model"]) == 0
    assert not bad, f"{name}({arg}={value!r}) was accepted"
