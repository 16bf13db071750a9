"""Issue 23's list, case by case: NaN accepted where it made a plausible answer, input
silently changed, raw errors instead of one ApexlensError (the sweep in
test_argument_sweep.py covers the numeric arguments wholesale)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import apexlens
from apexlens import ApexlensError

from backends import model_backends
from helpers import hook_count, random_model, random_tokens

E = ApexlensError
NAN = math.nan


@pytest.fixture(scope="module")
def world():
    model = random_model(51, n_layers=2)
    clean, corrupted = random_tokens(model, batch=2, n_pos=5)
    metric = apexlens.LogitDiff(clean[:, -1], (clean[:, -1] + 1) % 41)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    return model, clean, corrupted, metric, exp, exp.attribute_edges(method="exact")


def _vis(model, feature="m0.n1", **kw):
    return apexlens.visualize(model, feature, **{"n_pos": 4, "steps": 2, "restarts": 1,
                                                  "refine_steps": 0, **kw})


# ----------------------------------------------------------------- NaN accepted (item 2)
def test_nan_never_makes_a_plausible_answer(world):
    model, clean, corrupted, metric, exp, scores = world
    nan_dir = torch.full((24,), NAN, dtype=torch.float64)
    for feature in ("0.1", "r1"):
        with pytest.raises(E, match="finite"):
            _vis(model, feature, direction=nan_dir)
        with pytest.raises(E, match="finite"):
            apexlens.feature_values(model, feature, clean, direction=nan_dir)
    with pytest.raises(E, match="all zeros"):
        _vis(model, "r1", direction=torch.zeros(24, dtype=torch.float64))
    with pytest.raises(E, match="entropy"):
        _vis(model, entropy=NAN)
    with pytest.raises(E, match="init_scale"):
        _vis(model, init_scale=math.inf)
    bad = copy.deepcopy(scores)
    bad.scores[3] = NAN
    with pytest.raises(E, match="NaN"):
        apexlens.edge_auc(bad, [bad.edges[0]])
    with pytest.raises(E, match="NaN"):
        exp.faithfulness(bad)
    with pytest.raises(E, match="NaN"):
        exp.discover(threshold=0.1, order=bad)


# ----------------------------------------------------------------- input changed (item 3)
def test_token_ids_are_never_truncated_or_flattened(world):
    model = world[0]
    with pytest.raises(E, match="integer token ids"):
        _vis(model, prefix=[1.7])
    with pytest.raises(E, match="integer token ids"):
        _vis(model, vocab=[2.5, 3.9])
    with pytest.raises(E, match="1-D"):
        _vis(model, prefix=torch.tensor([[1, 2]]))
    with pytest.raises(E, match="n_pos"):
        _vis(model, n_pos=True)


# ----------------------------------------------------------------- raw errors
def test_gradient_methods_without_gradients_say_so(world):
    model, clean, corrupted, metric, exp, scores = world

    def argmax_metric(lg):
        return lg[..., -1, :].argmax(-1).to(lg.dtype)

    for method in ("eap", "eap-ig"):
        with pytest.raises(E, match="method='exact'"):
            apexlens.attribute_edges(model, clean, corrupted, metric=argmax_metric, method=method)
    with torch.no_grad():  # fine: apexlens turns gradients on where it needs them
        under_no_grad = exp.attribute_edges(method="eap")
    with torch.inference_mode():
        with pytest.raises(E, match="inference_mode"):
            exp.attribute_edges(method="eap")
        with pytest.raises(E, match="inference_mode"):
            apexlens.attribute_edges(model, clean, corrupted, metric=metric, method="eap")
        with pytest.raises(E, match="inference_mode"):
            _vis(model)
        exact = exp.attribute_edges(method="exact")  # needs no gradient: works
    assert torch.equal(exact.scores, scores.scores)
    assert under_no_grad.scores.abs().sum() > 0
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", model_backends())
def test_meta_device_models_and_tokens_are_refused(backend):
    model = random_model(52, backend=backend, n_layers=2)
    clean, corrupted = random_tokens(model, batch=2, n_pos=5)
    metric = apexlens.LogitDiff(clean[:, -1], (clean[:, -1] + 1) % 41)
    with pytest.raises(E, match="meta device"):
        apexlens.path_patch(model, clean.to("meta"), corrupted, senders="0.0", metric=metric)
    meta = model.to("meta")
    for call in (
        lambda: apexlens.path_patch(meta, clean, corrupted, senders="0.0", metric=metric),
        lambda: _vis(meta),
        lambda: apexlens.check(meta),
    ):
        with pytest.raises(E, match="meta device"):
            call()


def test_visualize_arguments_each_get_one_clear_error(world):
    model = world[0]
    for kw, match in [
        (dict(temperature=(0, 0.05)), "temperature"),
        (dict(temperature=(-1, 0.05)), "temperature"),
        (dict(temperature=(1.0,)), "temperature"),
        (dict(lr=NAN), "lr"),
        (dict(lr=-0.1), "lr"),
        (dict(seed=1.5), "seed"),
    ]:
        with pytest.raises(E, match=match):
            _vis(model, **kw)
    with pytest.raises(E, match=r"9999.*out of range"):
        _vis(model, "blocks.0.hook_resid_post[9999]")
    with pytest.raises(E, match="out of range"):
        apexlens.feature_values(model, "blocks.0.hook_resid_post[-25]", world[1])


def test_other_arguments_each_get_one_clear_error(world):
    model, clean, corrupted, metric, exp, scores = world
    for bs in (0, -3):
        with pytest.raises(E, match="batch_size"):
            apexlens.top_examples(model, "m0.n1", clean, batch_size=bs)
    for bs in (2.5, "4"):
        with pytest.raises(E, match="batch_size"):
            exp.discover(threshold=0.1, batch_size=bs)
    with pytest.raises(E, match="EdgeScores"):
        exp.discover(threshold=0.1, order=list(scores.edges))
    with pytest.raises(E, match="FeatureVisualization"):
        apexlens.fv_check(model, "m0.n1", clean, fv="fv")
    with pytest.raises(E, match="pairs"):
        apexlens.edge_auc(scores, ["0.1"])
    for budget in ("lots", -5, 2.5, True, 0):
        with pytest.raises(E, match="memory_budget"):
            apexlens.Experiment(model, clean, corrupted, metric=metric, memory_budget=budget)
