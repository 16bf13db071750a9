"""Circuit discovery: every fast path against a slow loop in float64, and ground truth."""

from __future__ import annotations

import pytest
import torch
from groundtruth import (
    INDUCTION_EDGES,
    MLP_EDGES,
    copy_prev_data,
    induction_data,
    induction_model,
    mlp_model,
)

import apexlens
from apexlens.api.functions import attribute_edges, discover, faithfulness
from apexlens.reference import naive_edge_attribution, naive_path_patch
from apexlens.results import EdgeScores, edge_auc, spearman
from apexlens.scoring import LogitDiff

from backends import model_backends
from helpers import random_model, random_tokens

TOL = 1e-9


@pytest.fixture(scope="module", params=model_backends())
def model(request):
    return random_model(2, backend=request.param)


@pytest.fixture(scope="module")
def data(model):
    clean, corrupted = random_tokens(model, batch=3, n_pos=7, seed=5)
    return clean, corrupted, LogitDiff(torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9]))


@pytest.fixture(scope="module")
def exact(model, data):
    return attribute_edges(model, *data[:2], metric=data[2], method="exact")


def _sample(n: int, k: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


# ---------------------------------------------------------------------------- exact
def test_exact_is_full_graph_minus_one_edge(model, data, exact):
    clean, corrupted, metric = data
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    g = [(str(s), str(r)) for s, r in apexlens.full_graph(model)]
    assert set(exact.edges) == set(g) and len(exact) == len(g)
    for i in _sample(len(g), 8, 0) + [len(g) - 1]:
        s, r = exact.edges[i]
        minus = exp.evaluate_circuit([e for e in g if e != (s, r)]).scores.values
        torch.testing.assert_close(exact.per_example[i], minus - exp.clean_values, atol=TOL, rtol=0)
        slow = naive_path_patch(
            model, clean, corrupted, senders=[s], receivers=[r], metric=metric, mlps="frozen"
        )[0]
        torch.testing.assert_close(exact.per_example[i], slow - exp.clean_values, atol=TOL, rtol=0)


def test_exact_on_a_subset_and_receiver_expansion(model, data, exact):
    clean, corrupted, metric = data
    sub = attribute_edges(
        model,
        clean,
        corrupted,
        metric=metric,
        method="exact",
        edges=[("0.1", "1.2"), ("m0", "logits")],
    )
    assert sub.edges == [("0.1", "1.2.q"), ("0.1", "1.2.k"), ("0.1", "1.2.v"), ("m0", "logits")]
    for e in sub.edges:
        assert sub.score(*e) == pytest.approx(exact.score(*e), abs=TOL)


# ---------------------------------------------------------------------------- EAP / EAP-IG
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_gradient_scores_equal_the_hand_written_reference(model, data, method):
    clean, corrupted, metric = data
    fast = attribute_edges(model, clean, corrupted, metric=metric, method=method, ig_steps=3)
    alphas = (1.0,) if method == "eap" else (0.0, 1 / 3, 2 / 3)
    picks = _sample(len(fast), 40, 1) + [len(fast) - 1]
    edges = [fast.edges[i] for i in picks]
    slow = naive_edge_attribution(
        model, clean, corrupted, metric=metric, edges=edges, alphas=alphas
    )
    torch.testing.assert_close(fast.scores[picks], slow, atol=TOL, rtol=0)


@pytest.mark.requires_hooked
def test_eap_is_the_derivative_of_the_exact_effect():
    """Central finite differences of m(receiver input + eps * Delta_s) -- no autograd."""
    model = random_model(3, backend="hooked", n_layers=2)
    clean, corrupted = random_tokens(model, batch=2, n_pos=6, seed=2)
    metric = LogitDiff(torch.tensor([2, 7]), torch.tensor([5, 1]))
    eap = attribute_edges(model, clean, corrupted, metric=metric, method="eap")
    _, cc = model.run_with_cache(clean)
    _, kc = model.run_with_cache(corrupted)
    eps = 1e-5

    def run(r: str, add: torch.Tensor) -> float:
        node = apexlens.parse_node(r)
        if node.kind == "logits":
            hooks = [("blocks.1.hook_resid_post", lambda a, hook: a + add)]
        elif node.kind == "mlp":
            blk = model.blocks[node.layer]
            hooks = [
                (
                    f"blocks.{node.layer}.hook_mlp_out",
                    lambda a, hook: blk.mlp(
                        blk.ln2(cc[f"blocks.{node.layer}.hook_resid_mid"] + add)
                    ),
                )
            ]
        else:
            blk, la, h, ch = model.blocks[node.layer], node.layer, node.head, node.channel

            def put(a, hook):
                a = a.clone()
                W = getattr(model, f"W_{ch.upper()}")[la, h]
                b = getattr(model, f"b_{ch.upper()}")[la, h]
                a[:, :, h] = blk.ln1(cc[f"blocks.{la}.hook_resid_pre"] + add) @ W + b
                return a

            hooks = [(f"blocks.{la}.attn.hook_{ch}", put)]
        with torch.no_grad():
            return float(metric(model.run_with_hooks(clean, fwd_hooks=hooks)).mean())

    def delta(s: str) -> torch.Tensor:
        n = apexlens.parse_node(s)
        if n.kind == "embed":
            return kc["blocks.0.hook_resid_pre"] - cc["blocks.0.hook_resid_pre"]
        if n.kind == "mlp":
            return kc[f"blocks.{n.layer}.hook_mlp_out"] - cc[f"blocks.{n.layer}.hook_mlp_out"]
        z = f"blocks.{n.layer}.attn.hook_z"
        return (kc[z][:, :, n.head] - cc[z][:, :, n.head]) @ model.W_O[n.layer, n.head]

    for s, r in [
        ("embed", "0.1.q"),
        ("0.2", "1.3.k"),
        ("embed", "1.0.v"),
        ("0.3", "m1"),
        ("m0", "logits"),
    ]:
        d = delta(s).detach()
        fd = (run(r, eps * d) - run(r, -eps * d)) / (2 * eps)
        assert eap.score(s, r) == pytest.approx(fd, rel=1e-6, abs=1e-8), (s, r)


def test_one_ig_step_is_eap_at_the_corrupted_input(model, data):
    clean, corrupted, metric = data
    ig1 = attribute_edges(model, clean, corrupted, metric=metric, method="eap-ig", ig_steps=1)
    picks = _sample(len(ig1), 20, 3)
    slow = naive_edge_attribution(
        model, clean, corrupted, metric=metric, edges=[ig1.edges[i] for i in picks], alphas=(0.0,)
    )
    torch.testing.assert_close(ig1.scores[picks], slow, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- positions
def test_position_aware_edges(model, data):
    clean, corrupted, metric = data
    whole = attribute_edges(model, clean, corrupted, metric=metric, method="eap")
    per = attribute_edges(model, clean, corrupted, metric=metric, method="eap", per_position=True)
    n_pos = clean.shape[1]
    assert len(per) == n_pos * len(whole)
    # a gradient score is linear in the sender's delta: the positions add up to the edge
    summed = per.scores.reshape(len(whole), n_pos).sum(-1)
    torch.testing.assert_close(summed, whole.scores, atol=TOL, rtol=0)
    # exact position-aware scores: full graph minus (s@p -> r@p), and the naive loop
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    g = [(str(s), str(r)) for s, r in apexlens.full_graph(model)]
    for s, r, p in [
        ("0.1", "1.2.k", 4),
        ("embed", "m1", 6),
        ("m0", "logits", 6),
        ("1.3", "2.0.v", 2),
    ]:
        ex = attribute_edges(
            model, clean, corrupted, metric=metric, method="exact", edges=[(f"{s}@{p}", f"{r}@{p}")]
        )
        assert ex.edges == [(f"{s}@{p}", f"{r}@{p}")]
        others = [(f"{s}@{q}", f"{r}@{q}") for q in range(n_pos) if q != p]
        circ = exp.evaluate_circuit([e for e in g if e != (s, r)] + others)
        torch.testing.assert_close(
            ex.per_example[0], circ.scores.values - exp.clean_values, atol=TOL, rtol=0
        )
        slow = naive_path_patch(
            model,
            clean,
            corrupted,
            senders=[f"{s}@{p}"],
            receivers=[f"{r}@{p}"],
            metric=metric,
            mlps="frozen",
        )[0]
        torch.testing.assert_close(ex.per_example[0], slow - exp.clean_values, atol=TOL, rtol=0)
    # a full position-aware graph is the clean run; one side's positions apply to both
    every = [(f"{s}@{q}", f"{r}@{q}") for s, r in g for q in range(n_pos)]
    torch.testing.assert_close(
        exp.evaluate_circuit(every).scores.values, exp.clean_values, atol=TOL, rtol=0
    )
    a = exp.evaluate_circuit([e for e in g if e != ("0.1", "1.2.k")] + [("0.1@3", "1.2.k")])
    b = exp.evaluate_circuit([e for e in g if e != ("0.1", "1.2.k")] + [("0.1@3", "1.2.k@3")])
    torch.testing.assert_close(a.scores.values, b.scores.values, atol=0, rtol=0)


def test_position_errors(model, data):
    clean, corrupted, metric = data
    exp = apexlens.Experiment(
        model, clean, corrupted, metric=metric, positions={"end": torch.tensor([6, 5, 6])}
    )
    E = apexlens.ApexlensError
    with pytest.raises(E, match="same position"):
        exp.evaluate_circuit([("0.1@3", "1.3.k@5")])
    with pytest.raises(E, match="same positions for every example"):
        exp.evaluate_circuit([("0.1@end", "1.3.k")])
    with pytest.raises(E, match="out of range"):
        exp.evaluate_circuit([("0.1@9", "1.3.k")])
    with pytest.raises(E, match="sequence length"):
        from apexlens.model import backend_for
        from apexlens.vocab import EdgeIndex

        EdgeIndex(backend_for(model)).mask([("0.1@3", "1.3.k@3")])


# ---------------------------------------------------------------------------- split embed
def test_split_embed(model, data):
    clean, corrupted, metric = data
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    whole = attribute_edges(model, clean, corrupted, metric=metric, method="exact")
    split = attribute_edges(
        model, clean, corrupted, metric=metric, method="exact", split_embed=True
    )
    assert len(split) == len(whole) + sum(1 for s, _ in whole.edges if s == "embed")
    for s, r in whole.edges:
        if s == "embed":  # resample: same positions, so only the token embedding moves
            assert split.score("tok_embed", r) == pytest.approx(whole.score(s, r), abs=TOL)
            assert split.score("pos_embed", r) == pytest.approx(0.0, abs=TOL)
    g_split = [(s, r) for s, r in split.edges]
    full = exp.evaluate_circuit(g_split)
    torch.testing.assert_close(full.scores.values, exp.clean_values, atol=TOL, rtol=0)
    zero = exp.evaluate_circuit([e for e in g_split if e[0] != "pos_embed"], ablation="zero")
    assert not torch.allclose(zero.scores.values, exp.clean_values)  # zeroing W_pos matters
    with pytest.raises(apexlens.ApexlensError, match="split"):
        exp.evaluate_circuit([("tok_embed", "0.1.q"), ("embed", "0.2.q")])
    with pytest.raises(apexlens.ApexlensError, match="circuit-discovery sender"):
        exp.path_patch("tok_embed", "logits")


# ---------------------------------------------------------------------------- batched circuits
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_circuit_rows_equal_one_circuit_at_a_time(model, data, ablation):
    clean, corrupted, metric = data
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    idx = exp.edge_index()
    abl = exp.ablation(ablation)
    g = torch.Generator().manual_seed(4)
    keeps = (
        torch.rand(5, *idx.valid.shape, generator=g)
        < torch.tensor([0.05, 0.3, 0.6, 0.9, 1.0])[:, None, None]
    ) & idx.valid
    fast = exp.evaluate_keeps(keeps, abl)
    for i in range(len(keeps)):
        edges = [
            (idx.senders[a].name, idx.receivers[b].name) for a, b in keeps[i].nonzero().tolist()
        ]
        slow = exp.evaluate_circuit(edges, ablation=ablation).scores.values
        torch.testing.assert_close(fast[i], slow, atol=TOL, rtol=0)
    # position-aware rows
    keeps_p = (torch.rand(3, *idx.valid.shape, exp.n_pos, generator=g) < 0.5) & idx.valid[..., None]
    fast_p = exp.evaluate_keeps(keeps_p, abl)
    for i in range(3):
        edges = [
            (f"{idx.senders[a].name}@{p}", f"{idx.receivers[b].name}@{p}")
            for a, b, p in keeps_p[i].nonzero().tolist()
        ]
        slow = exp.evaluate_circuit(edges, ablation=ablation).scores.values
        torch.testing.assert_close(fast_p[i], slow, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- faithfulness
@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_faithfulness_curve(model, data, exact, ablation):
    clean, corrupted, metric = data
    res = faithfulness(model, clean, corrupted, exact, metric=metric, ablation=ablation)
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    empty = exp.evaluate_circuit([], ablation=ablation).scores.mean
    assert res.full == pytest.approx(float(exp.clean_values.mean()), abs=TOL)
    assert res.empty == pytest.approx(empty, abs=TOL)
    order = torch.argsort(-exact.scores.abs(), stable=True).tolist()
    f = []
    for q, n, v in zip(res.fractions, res.n_edges, res.values, strict=True):
        assert n == int(q * len(exact))
        circ = exp.evaluate_circuit([exact.edges[i] for i in order[:n]], ablation=ablation)
        torch.testing.assert_close(v, circ.scores.values, atol=TOL, rtol=0)
        f.append((circ.scores.mean - empty) / (res.full - empty))
    x = res.fractions
    cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(x) - 1))
    cmd = sum(
        (x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(len(x) - 1)
    )
    assert res.cpr == pytest.approx(cpr, abs=1e-9) and res.cmd == pytest.approx(cmd, abs=1e-9)
    assert res.f[-1] == pytest.approx(1.0, abs=TOL)
    assert list(res.to_frame().columns) == ["fraction", "n_edges", "metric", "faithfulness"]


def test_faithfulness_errors(model, data, exact):
    clean, corrupted, metric = data
    E = apexlens.ApexlensError
    with pytest.raises(E, match="fractions"):
        faithfulness(model, clean, corrupted, exact, metric=metric, fractions=[0.5, 0.1])
    with pytest.raises(E, match="EdgeScores"):
        faithfulness(model, clean, corrupted, {"a": 1}, metric=metric)


# ---------------------------------------------------------------------------- audit / AUC
def test_compare_and_auc_by_hand():
    edges = [("embed", f"0.{h}.q") for h in range(5)]
    ex = EdgeScores(edges, torch.tensor([5.0, -4.0, 0.1, 0.0, 2.0]), "exact")
    ap = EdgeScores(edges, torch.tensor([4.0, 0.05, 0.2, 0.0, -3.0]), "eap")
    audit = ap.compare(ex, k=2)
    assert audit.reference == "exact" and audit.approximation == "eap"
    assert audit.spearman == pytest.approx(spearman(ex.scores, ap.scores))
    # exact's top 2: 0.0, 0.1; eap's top 2: 0.0, 0.4
    assert audit.overlap[2] == 0.5
    assert audit.missed["receiver"].tolist() == ["0.1.q"]
    assert ex.top(2) == [edges[0], edges[1]]
    # AUC: true edges 0.0 and 0.4 (|score| 5, 2) vs others (4, 0.1, 0): 2 wins, 1 loss... by hand
    auc = edge_auc(ex, [edges[0], edges[4]])
    assert auc == pytest.approx((3 + 2) / 6)
    assert edge_auc(ex, apexlens.Circuit([edges[0], edges[4]])) == auc  # a Circuit is an edge list
    tie = EdgeScores(edges, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]), "x")
    assert edge_auc(tie, [edges[0]]) == pytest.approx((0.5 + 3) / 4)
    with pytest.raises(apexlens.ApexlensError, match="without a score"):
        edge_auc(ex, [("embed", "1.0.q")])
    # rank correlation against scipy's definition (average ranks for ties)
    a, b = torch.tensor([1.0, 2, 2, 3, 5]), torch.tensor([2.0, 1, 4, 4, 9])
    ra, rb = torch.tensor([0, 1.5, 1.5, 3, 4]), torch.tensor([1, 0, 2.5, 2.5, 4])
    expected = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert spearman(a, b) == pytest.approx(expected)


# ---------------------------------------------------------------------------- discover
def _naive_acdc(exp, edges, threshold, prio, receivers_order):
    """ACDC, one exact circuit evaluation per tried edge."""
    keep = list(edges)
    cur = float(exp.evaluate_circuit(keep).scores.mean)
    for r in receivers_order:
        r_sender = r.rsplit(".", 1)[0] if r.count(".") == 2 else r
        if r != "logits" and not any(s == r_sender for s, _ in keep):
            keep = [e for e in keep if e[1] != r]
            continue
        cands = sorted([e for e in keep if e[1] == r], key=lambda e: (prio[e], e))
        for e in cands:
            trial = [x for x in keep if x != e]
            v = float(exp.evaluate_circuit(trial).scores.mean)
            if abs(v - cur) < threshold:
                keep, cur = trial, v
    return keep


def test_discover_equals_sequential_acdc(model, data, exact):
    clean, corrupted, metric = data
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    thr = 0.08
    res = discover(model, clean, corrupted, metric=metric, threshold=thr, order=exact, batch_size=5)
    prio = {e: abs(exact.score(*e)) for e in exact.edges}
    # tie-break by sender index like the fast path
    from apexlens.model import backend_for
    from apexlens.vocab import EdgeIndex

    idx = EdgeIndex(backend_for(model))
    s_id = {n.name: i for i, n in enumerate(idx.senders)}
    prio = {e: (v, s_id[e[0]]) for e, v in prio.items()}
    n = model.cfg.n_layers
    order = [r.name for r in sorted(idx.receivers, key=lambda r: -r.order(n))]
    slow = _naive_acdc(exp, exact.edges, thr, {e: p for e, p in prio.items()}, order)
    assert sorted(res.edges) == sorted(slow)
    assert res.recovery == pytest.approx(exp.evaluate_circuit(slow).recovery, abs=TOL)
    assert len(res.edges) < len(exact.edges)
    assert res.steps["removed"].sum() == len(exact.edges) - len(res.edges)


def test_discover_errors(model, data):
    clean, corrupted, metric = data
    E = apexlens.ApexlensError
    with pytest.raises(E, match="threshold"):
        discover(model, clean, corrupted, metric=metric, threshold=-1)
    with pytest.raises(E, match="method"):
        attribute_edges(model, clean, corrupted, metric=metric, method="acdc")
    with pytest.raises(E, match="ig_steps"):
        attribute_edges(model, clean, corrupted, metric=metric, ig_steps=0)
    with pytest.raises(E, match="backwards"):
        attribute_edges(
            model, clean, corrupted, metric=metric, method="exact", edges=[("1.0", "0.1.q")]
        )


# ---------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize(
    "make, data_fn, truth",
    [(induction_model, induction_data, INDUCTION_EDGES), (mlp_model, copy_prev_data, MLP_EDGES)],
    ids=["induction", "mlp-copy"],
)
@pytest.mark.parametrize("backend", model_backends())
def test_ground_truth_models(make, data_fn, truth, backend):
    model = make(backend)
    clean, corrupted, metric = data_fn()
    exact = attribute_edges(model, clean, corrupted, metric=metric, method="exact")
    assert edge_auc(exact, truth) == 1.0
    # exactly the planted edges move the metric; every other edge is exactly inert
    planted = set(truth)
    for e, v in zip(exact.edges, exact.scores.tolist(), strict=True):
        assert (abs(v) > 0.1) if e in planted else v == 0.0, (e, v)
    found = discover(model, clean, corrupted, metric=metric, threshold=1e-6, order=exact)
    assert sorted(found.edges) == sorted(truth)
    assert found.recovery == pytest.approx(1.0, abs=1e-9)
    for method in ("eap", "eap-ig"):
        s = attribute_edges(model, clean, corrupted, metric=metric, method=method)
        assert edge_auc(s, truth) == 1.0
