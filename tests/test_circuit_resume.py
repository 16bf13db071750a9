"""Incremental circuit evaluation (``incremental=True``, the workbench's toggle) equals a whole
pass bit-for-bit after random sequences of changes: single edges, whole nodes, logits edges,
undo, per-position edges, across ablations, model classes and architectures."""

from __future__ import annotations

import pytest
import torch
from test_architectures import OPTIONS, bridge, hooked

import apexlens
from apexlens.engines.circuits.resume import KEY
from apexlens.scoring import LogitDiff

from backends import model_backends
from helpers import random_model, random_tokens


def _experiment(model, seed: int = 5) -> apexlens.Experiment:
    clean, corrupted = random_tokens(model, batch=3, n_pos=6, seed=seed)
    metric = LogitDiff(torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9]))
    return apexlens.Experiment(model, clean, corrupted, metric=metric)


def _changes(index, steps: int, seed: int, n_pos: int | None = None):
    """Keep-matrices, one a step: a random half to start, then single edges (some into the
    logits), every outgoing or incoming edge of a node on or off, and undo (the one before)."""
    g = torch.Generator().manual_seed(seed)
    valid = index.valid if n_pos is None else index.valid[..., None].expand(-1, -1, n_pos)
    keep = valid & (torch.rand(valid.shape, generator=g) < 0.5)
    history = [keep]
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    for step in range(steps):
        keep = history[-1].clone()
        kind = step % 5
        if kind in (0, 1):  # one edge (kind 1: into the logits)
            cells = valid.nonzero()
            if kind == 1:
                cells = cells[cells[:, 1] == index.logits]
            keep[tuple(cells[pick(len(cells))])] ^= True
        elif kind == 2:  # a node: all its outgoing edges
            s = pick(len(index.senders) - 1)
            keep[s] = valid[s] & ~keep[s].any()
        elif kind == 3:  # a node: all its incoming edges
            r = pick(len(index.receivers))
            keep[:, r] = valid[:, r] & ~keep[:, r].any()
        else:  # undo
            keep = history[-2].clone() if len(history) > 1 else keep
        history.append(keep)
        yield keep


def _check(exp: apexlens.Experiment, steps: int, seed: int = 0, ablation: str = "resample",
           n_pos: int | None = None, split_embed: bool = False) -> dict[str, int]:
    index = exp.edge_index(split_embed)
    for keep in _changes(index, steps, seed, n_pos):
        kw = dict(ablation=ablation, split_embed=split_embed)
        inc = exp.evaluate_keep(keep, incremental=True, **kw)
        whole = exp.evaluate_keep(keep, **kw)
        assert torch.equal(inc.scores.values, whole.scores.values)
        assert torch.equal(inc.kl_circuit.values, whole.kl_circuit.values)
        assert inc.recovery == whole.recovery
    again = exp.evaluate_keep(keep, incremental=True, **kw)  # the same hypothesis: kept
    assert torch.equal(again.scores.values, whole.scores.values)
    return exp.runs.scratch[KEY].passes


@pytest.mark.parametrize("backend", model_backends())
def test_incremental_equals_whole_pass_bit_for_bit(backend):
    exp = _experiment(random_model(2, backend=backend, n_layers=3))
    passes = _check(exp, steps=15)
    # the sequence exercised every way a pass can run
    assert passes["resumed"] > 0 and passes["logits"] > 0 and passes["same"] > 0
    # a whole pass in between (another ablation, other hypotheses) leaves the kept one intact
    _check(exp, steps=6, seed=1, ablation="mean")
    names = exp.edge_index().senders, exp.edge_index().receivers
    keep = next(_changes(exp.edge_index(), 1, 7))
    edges = [(names[0][i].name, names[1][j].name) for i, j in keep.nonzero().tolist()]
    assert torch.equal(
        exp.evaluate_keep(keep, incremental=True).scores.values,
        exp.evaluate_circuit(edges).scores.values,
    )


def test_incremental_at_positions_and_split_embed():
    exp = _experiment(random_model(4, n_layers=2))
    passes = _check(exp, steps=8, n_pos=exp.n_pos, seed=2)
    assert passes["resumed"] > 0
    _check(exp, steps=6, split_embed=True, seed=3)


@pytest.mark.requires_hooked
@pytest.mark.parametrize("option", ["llama-like", "parallel_attn_mlp", "shortformer"])
def test_incremental_on_other_architectures(option):
    exp = _experiment(hooked(OPTIONS[option]), seed=6)
    assert _check(exp, steps=8, seed=4)["resumed"] > 0


@pytest.mark.parametrize("name", ["llama", "pythia"])  # grouped-query; parallel attention/MLP
def test_incremental_on_bridges_over_hf_models(name):
    with torch.no_grad():
        exp = _experiment(bridge(name)[0], seed=6)
        assert _check(exp, steps=6, seed=5)["resumed"] > 0


def test_weights_changed_between_calls_run_a_whole_pass():
    model = random_model(5, n_layers=2, attn_only=True)
    exp = _experiment(model)
    keep = exp.edge_index().valid.clone()
    exp.evaluate_keep(keep, incremental=True)
    with torch.no_grad():
        model.blocks[1].attn.W_Q.mul_(1.5)
    keep[0, 0] = False
    exp.runs.scratch.pop("circuit-plans", None)
    got = exp.evaluate_keep(keep, incremental=True)
    assert exp.runs.scratch[KEY].passes["whole"] == 2  # not resumed over stale weights
    assert torch.equal(got.scores.values, exp.evaluate_keep(keep).scores.values)
