"""Every result type round-trips save -> load with equal values (JSON + safetensors, no
pickle), records its provenance, and refuses files that are not results."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

import apexlens
from apexlens.results import result_types
from apexlens.scoring import Scores


@pytest.fixture(scope="module")
def results(toy_model_factory):
    model = toy_model_factory("induction-2l")
    batch = apexlens.get_task("induction").batch(6, seed=0)
    metric = batch.logit_diff()
    exp = apexlens.Experiment(model, batch.clean_tokens, batch.corrupted_tokens, metric=metric)
    exact = exp.attribute_edges(method="exact")
    eap = exp.attribute_edges(method="eap")
    modadd = toy_model_factory("modadd-2l")
    natural = apexlens.get_task("modadd").batch(40, seed=0).clean_tokens
    fv = apexlens.visualize(modadd, "m1.n34", n_pos=4, steps=5, refine_steps=1, restarts=2)
    bd = apexlens.get_task("backdoor")
    sweep = apexlens.apex(
        toy_model_factory("backdoor"), bd.batch(4).clean_tokens, sigmas=[0.5, 2.0], n_draws=3,
        token_labels=bd.token_labels,
    )
    bd_tokens = bd.batch(8).clean_tokens
    bias = apexlens.apex_bias(toy_model_factory("backdoor"), bd_tokens, sigmas=[2.0, 8.0],
                              n_draws=3, token_labels=bd.token_labels)
    escape = apexlens.escape_noise(toy_model_factory("backdoor"), bd_tokens, n_draws=4,
                                   sigma_lo=0.1, sigma_hi=10.0, token_labels=bd.token_labels)
    out = {
        "bias": bias,
        "escape": escape,
        "escape_cmp": escape.compare(escape, n_boot=20),
        "path": exp.path_patch("all-heads", "logits"),
        "path_separate": exp.path_patch("all-heads", ["1.3.k", "1.2.q@-1"], separate=True),
        "act": exp.act_patch("all-heads"),
        "circuit": exp.evaluate_circuit([("0.1", "1.3.k"), ("1.3", "logits")]),
        "apex": sweep,
        "scores": exact,
        "audit": eap.compare(exact),
        "curve": exp.faithfulness(exact, fractions=[0.1, 0.5, 1.0]),
        "found": exp.discover(threshold=0.5, order=exact),
        "fv": fv,
        "natural": apexlens.top_examples(modadd, "m1.n34", natural, k=5),
        "check": apexlens.fv_check(
            modadd, "m1.n34", natural, fv=fv, k=5, n_pos=4, steps=5, refine_steps=1, restarts=2,
            peers=4, alpha=0.2,
        ),
    }
    return out


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Scores):
        return isinstance(b, Scores) and _equal(a.values, b.values)
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            _equal(getattr(a, f.name), getattr(b, f.name))
            for f in dataclasses.fields(a)
            if f.name != "token_labels"
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


def test_every_result_type_is_covered(results):
    assert {type(r).__name__ for r in results.values()} == set(result_types())


@pytest.mark.parametrize(
    "key", ["path", "act", "circuit", "apex", "bias", "escape", "escape_cmp", "scores", "audit",
            "curve", "found", "fv", "natural", "check"]
)
def test_round_trip(results, key, tmp_path):
    res = results[key]
    path = res.save(tmp_path / key)
    assert path.suffix == ".json"
    back = type(res).load(tmp_path / key)
    assert _equal(res, back)
    assert _equal(res, apexlens.load_result(path))  # by the JSON path too
    # the same tables come out of both
    for a, b in zip([res.to_frame()], [back.to_frame()], strict=True):
        pd.testing.assert_frame_equal(a, b)
    doc = json.loads(path.read_text())
    assert doc["type"] == type(res).__name__
    assert {"apexlens", "torch", "transformer_lens", "created"} <= set(doc["provenance"])


def test_labels_survive_as_a_table(results, tmp_path):
    res = results["apex"]
    back = type(res).load(res.save(tmp_path / "apex"))
    assert back.summary()["dominant_label"].tolist() == res.summary()["dominant_label"].tolist()


def test_circuit_result_holds_values_not_closures(results):
    res = results["circuit"]
    for f in dataclasses.fields(res):
        assert not callable(getattr(res, f.name)), f.name
    assert res.proportion_explained == pytest.approx(1 - res.aue / res.ate)


def test_load_refuses_what_is_not_a_result(tmp_path, results):
    E = apexlens.ApexlensError
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(E, match="not valid JSON"):
        apexlens.load_result(tmp_path / "x")
    (tmp_path / "y.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(E, match="not an apexlens result"):
        apexlens.load_result(tmp_path / "y.json")
    with pytest.raises(E, match="no saved result"):
        apexlens.load_result(tmp_path / "missing")
    path = results["path"].save(tmp_path / "p")
    with pytest.raises(E, match="not a CircuitResult"):
        apexlens.CircuitResult.load(path)
