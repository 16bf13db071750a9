"""Circuit evaluation and interactive patching, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

import apexlens
from apexlens.scoring import LogitDiff
from apexlens.vocab import full_graph

from backends import model_backends
from helpers import hook_count, random_model, random_tokens

TOL = 1e-9


@pytest.fixture(scope="module", params=model_backends())
def model(request):
    return random_model(2, backend=request.param)


@pytest.fixture(scope="module")
def toks(model):
    return random_tokens(model, batch=3, n_pos=7, seed=5)


@pytest.fixture(scope="module")
def exp(model, toks):
    metric = LogitDiff(torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9]))
    return apexlens.Experiment(model, *toks, metric=metric)


def test_full_and_empty_circuits(exp, model):
    g = full_graph(model)
    n = model.cfg.n_layers
    H = model.cfg.n_heads
    senders = 1 + n * (H + 1)
    assert len({s for s, _ in g}) == senders
    full = exp.evaluate_circuit(g)
    torch.testing.assert_close(full.scores.values, exp.clean_values, atol=TOL, rtol=0)
    assert full.recovery == pytest.approx(1.0) and full.proportion_explained == pytest.approx(1.0)
    empty = exp.evaluate_circuit([])
    torch.testing.assert_close(empty.scores.values, exp.corrupted_values, atol=TOL, rtol=0)
    assert abs(empty.recovery) < 1e-9 and abs(empty.proportion_explained) < 1e-9


def test_removing_one_edge_equals_direct_path_patch(exp, model):
    """Full graph minus (s -> r) under resample ablation == path patching s -> r with frozen MLPs."""
    g = full_graph(model)
    gen = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(g), generator=gen)[:6].tolist() + [len(g) - 1]
    for i in picks:
        s, r = g[i]
        res = exp.evaluate_circuit([e for e in g if e != (s, r)])
        pp = exp.path_patch([s], [r], mlps="frozen").per_example[0]
        torch.testing.assert_close(res.scores.values, pp, atol=TOL, rtol=0)


def _replace_all(model, clean, values):
    hooks = [("blocks.0.hook_resid_pre", lambda a, hook: values["embed"].expand_as(a))]
    for la in range(model.cfg.n_layers):
        hooks.append(
            (f"blocks.{la}.attn.hook_z", lambda a, hook, la=la: values[f"z{la}"].expand_as(a))
        )
        hooks.append(
            (f"blocks.{la}.hook_mlp_out", lambda a, hook, la=la: values[f"m{la}"].expand_as(a))
        )
    return model.run_with_hooks(clean, fwd_hooks=hooks)


def test_zero_and_mean_ablation_of_everything(exp, model, toks):
    clean, corrupted = toks
    metric = exp.readout.metric
    _, cache = model.run_with_cache(corrupted)
    n = model.cfg.n_layers
    zeros = {"embed": torch.zeros(1, 1, 1, dtype=torch.float64)}
    means = {"embed": cache["blocks.0.hook_resid_pre"].mean(0, keepdim=True)}
    for la in range(n):
        zeros[f"z{la}"] = torch.zeros(1, dtype=torch.float64)
        zeros[f"m{la}"] = torch.zeros(1, dtype=torch.float64)
        means[f"z{la}"] = cache[f"blocks.{la}.attn.hook_z"].mean(0, keepdim=True)
        means[f"m{la}"] = cache[f"blocks.{la}.hook_mlp_out"].mean(0, keepdim=True)
    for ablation, vals in (("zero", zeros), ("mean", means)):
        res = exp.evaluate_circuit([], ablation=ablation)
        expected = metric(_replace_all(model, clean, vals))
        torch.testing.assert_close(res.scores.values, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(res.corrupted.values, expected, atol=TOL, rtol=0)


@pytest.fixture(params=["slot-major", "token-major"])
def layout(request, monkeypatch):
    """The circuit buffer's two layouts (small models get the slot-major one by default)."""
    from apexlens.engines.circuits.buffer import SenderBuffer

    monkeypatch.setattr(SenderBuffer, "SLOT_MAJOR", 10**9 if request.param == "slot-major" else 0)
    return request.param


def test_circuit_matches_explicit_sum_over_senders(exp, model, toks, layout):
    """Slow reference: each receiver's input is built by summing its senders one by one."""
    from apexlens.model import backend_for

    clean, corrupted = toks
    bk = backend_for(model)
    g = full_graph(model)
    gen = torch.Generator().manual_seed(1)
    keep = [g[i] for i in torch.randperm(len(g), generator=gen)[: len(g) // 2].tolist()]
    keep_set = {(str(s), str(r)) for s, r in keep}
    fast = exp.evaluate_circuit(keep).scores.values

    _, corr = model.run_with_cache(corrupted)
    n, H = model.cfg.n_layers, model.cfg.n_heads
    b_O = model.b_O
    outs: dict[str, torch.Tensor] = {}  # sender outputs in this run
    abl: dict[str, torch.Tensor] = {"embed": corr["blocks.0.hook_resid_pre"]}
    for la in range(n):
        for h in range(H):
            abl[f"{la}.{h}"] = corr[f"blocks.{la}.attn.hook_z"][:, :, h] @ model.W_O[la, h]
        abl[f"m{la}"] = corr[f"blocks.{la}.hook_mlp_out"]
    _, cl = model.run_with_cache(clean)
    outs["embed"] = cl["blocks.0.hook_resid_pre"]

    def receiver_input(r: str, upto: list[str], bias_layers: int) -> torch.Tensor:
        total = sum(outs[s] if (s, r) in keep_set else abl[s] for s in upto)
        return total + b_O[:bias_layers].sum(0)

    done: list[str] = ["embed"]
    for la in range(n):
        qkv = {}
        for c in "qkv":
            per_head = [receiver_input(f"{la}.{h}.{c}", done, la) for h in range(H)]
            qkv[c] = torch.stack(
                [bk.head_input(la, c, x, [h])[..., 0, :] for h, x in enumerate(per_head)], dim=2
            )

        def put(c, qkv=qkv):
            return lambda a, hook: qkv[c]

        z = {}

        def grab(a, hook, z=z):
            z["z"] = a

        model.run_with_hooks(
            clean,
            fwd_hooks=[(f"blocks.{la}.attn.hook_{c}", put(c)) for c in "qkv"]
            + [(f"blocks.{la}.attn.hook_z", grab)],
            stop_at_layer=la + 1,
        )
        for h in range(H):
            outs[f"{la}.{h}"] = z["z"][:, :, h] @ model.W_O[la, h]
        done += [f"{la}.{h}" for h in range(H)]
        mlp_in = receiver_input(f"m{la}", done, la + 1)
        outs[f"m{la}"] = bk.mlp_from_resid(la, mlp_in)
        done.append(f"m{la}")
    final = receiver_input("logits", done, n)
    logits = bk.unembed(final)
    slow = exp.readout.metric(logits)
    torch.testing.assert_close(fast, slow, atol=1e-8, rtol=0)


def test_patched_context_matches_engines(exp, model, toks):
    clean, corrupted = toks
    metric = exp.readout.metric
    g = full_graph(model)
    edges = g[: len(g) // 3]
    n_hooks = hook_count(model)
    with apexlens.patched(model, apexlens.Circuit(edges), corrupted):
        inside = metric(model(clean))
        _, cache = model.run_with_cache(clean)  # any run works inside
    assert hook_count(model) == n_hooks
    torch.testing.assert_close(inside, exp.evaluate_circuit(edges).scores.values, atol=TOL, rtol=0)
    assert "blocks.0.hook_resid_pre" in cache
    for recv in (["2.1.q", "logits"], ["m1", "2.0.k"], ["logits"]):
        with apexlens.patched(model, apexlens.Paths(["0.1"], recv), corrupted):
            inside = metric(model(clean))
        torch.testing.assert_close(
            inside, exp.path_patch(["0.1"], recv).per_example[0], atol=TOL, rtol=0
        )
    # after the block the model is clean again
    torch.testing.assert_close(metric(model(clean)), exp.clean_values, atol=TOL, rtol=0)


def test_circuit_errors(exp, model, toks):
    E = apexlens.ApexlensError
    with pytest.raises(E, match="backwards"):
        exp.evaluate_circuit([("2.0", "1.1.q")])
    with pytest.raises(E, match="same layer"):
        exp.evaluate_circuit([("1.0", "1.1.q")])
    with pytest.raises(E, match="unknown node"):
        exp.evaluate_circuit([("0.0", "nowhere")])
    with pytest.raises(E, match="ablation"):
        exp.evaluate_circuit([], ablation="noise")
    with pytest.raises(E, match="pair"):
        exp.evaluate_circuit(["0.0"])
    g = full_graph(model)  # a backwards edge after many good ones, before a bad node
    with pytest.raises(E, match="2.0 -> 1.1.q goes backwards"):
        exp.evaluate_circuit([*g, ("2.0", "1.1.q"), ("0.0", "nowhere")])
    with pytest.raises(E, match="cannot send"):
        exp.evaluate_circuit([*g, ("1.0.q", "2.1")])
    with pytest.raises(E, match="shape"):
        with apexlens.patched(model, apexlens.Paths("0.1", "2.1.q"), toks[1]):
            model(toks[0][:2])


def test_edge_matrix_from_repeated_and_fresh_node_objects(exp):
    """Edges named by shared Node objects, fresh strings and positions give one matrix."""
    index = exp.edge_index()
    g = full_graph(exp.model)[::3]
    as_text = [(str(s), str(r)) for s, r in g]
    want = torch.zeros_like(index.valid)
    for s, r in g:
        want[index.sender_id(s), index.receiver_id(r)] = True
    assert torch.equal(index.keep(g), want)
    assert torch.equal(index.keep(as_text), want)
    assert torch.equal(index.keep(iter(list(as_text))), want)
    per_pos = index.keep([*g, ("0.0@1", "2.1.q")], n_pos=7)
    assert per_pos.shape == (*want.shape, 7)
    assert torch.equal(per_pos.all(-1), want)
    i = index.sender_id(apexlens.vocab.parse_node("0.0"))
    j = index.receiver_id(apexlens.vocab.parse_node("2.1.q"))
    assert per_pos[i, j].tolist() == [want[i, j].item() or p == 1 for p in range(7)]


def test_memory_reused_across_calls_and_uneven_chunks(model):
    """An Experiment keeps its circuit buffer between calls (on the CPU) and runs a last
    chunk smaller than the first in the same memory: a sequence of different circuits,
    ablations and edge graphs gives each one the numbers of a fresh Experiment."""
    clean, corrupted = random_tokens(model, batch=5, n_pos=6, seed=11)
    metric = LogitDiff(clean[:, -1] % 7, (clean[:, -1] + 1) % 7)
    d = model.cfg
    # two examples' worth of sender buffer: chunks of 2, 2 and 1 examples
    per_example = (1 + d.n_layers * (d.n_heads + 1)) * 6 * d.d_model * 8
    kw = dict(metric=metric, memory_budget=2 * per_example)
    g = full_graph(model)
    gen = torch.Generator().manual_seed(3)
    halves = [[g[i] for i in sorted(torch.randperm(len(g), generator=gen)[: len(g) // 2].tolist())] for _ in range(2)]
    embed_edges = [str(r) for s, r in g if str(s) == "embed"]
    split = [(e, r) for e in ("tok_embed", "pos_embed") for r in embed_edges][::2]
    split += [(s, r) for s, r in halves[1] if str(s) != "embed"]
    calls = [(halves[0], "resample"), (halves[1], "mean"), (split, "resample"), (halves[0], "zero"), (halves[0], "resample")]
    shared = apexlens.Experiment(model, clean, corrupted, **kw)
    for edges, ablation in calls:
        got = shared.evaluate_circuit(edges, ablation=ablation)
        fresh = apexlens.Experiment(model, clean, corrupted, **kw).evaluate_circuit(edges, ablation=ablation)
        one_pass = apexlens.Experiment(model, clean, corrupted, metric=metric).evaluate_circuit(edges, ablation=ablation)
        assert torch.equal(got.scores.values, fresh.scores.values)
        torch.testing.assert_close(got.scores.values, one_pass.scores.values, atol=TOL, rtol=0)
    scratch = shared.runs.scratch  # held for the next call (slot-major on small models)
    slot_major = "sender_buffer:slot" in scratch
    held = scratch["sender_buffer:slot" if slot_major else "sender_buffer"]
    assert held.shape[1 if slot_major else 0] == 2


def test_buffer_layouts_and_plans_agree(model, toks, monkeypatch):
    """Every way the circuit engine plans and sums (through excluded or kept senders, a few
    slots or all, one column shared or one per slot, per position, per row) in both buffer
    layouts gives the same numbers: a random half, a sparse circuit, per-position edges and
    a batch of hypotheses as rows, on a fresh Experiment each."""
    from apexlens.engines.circuits.buffer import SenderBuffer

    clean, corrupted = toks
    metric = LogitDiff(torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9]))
    g = full_graph(model)
    gen = torch.Generator().manual_seed(4)
    half = [g[i] for i in torch.randperm(len(g), generator=gen)[: len(g) // 2].tolist()]
    sparse = [g[i] for i in torch.randperm(len(g), generator=gen)[:5].tolist()]
    at_pos = [(s, r.at(p)) for s, r in half[::3] for p in (2, 6)]
    got = {}
    for big in (10**9, 0):
        monkeypatch.setattr(SenderBuffer, "SLOT_MAJOR", big)
        exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
        got[big] = [
            *(exp.evaluate_circuit(c).scores.values for c in (half, sparse, at_pos)),
            exp.evaluate_circuits([half, sparse, [], g]),
            exp.evaluate_circuits([at_pos, half]),
        ]
    for a, b in zip(got[10**9], got[0], strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    rows = got[0][3]
    torch.testing.assert_close(rows[0], got[0][0], atol=TOL, rtol=0)
    torch.testing.assert_close(rows[1], got[0][1], atol=TOL, rtol=0)
    torch.testing.assert_close(got[0][4][0], got[0][2], atol=TOL, rtol=0)


def test_plans_kept_per_hypothesis(exp, model):
    """A re-evaluated hypothesis reuses its plan (the most recent ones are kept, the oldest
    dropped) and gives the numbers of a fresh plan, also after the model's weights changed
    in place (the stacked q/k/v weights are looked up again)."""
    from apexlens.engines.circuits.plan import PLANS_KEPT

    g = full_graph(model)
    gen = torch.Generator().manual_seed(9)
    hyps = [[g[i] for i in torch.randperm(len(g), generator=gen)[: len(g) // 2].tolist()] for _ in range(PLANS_KEPT + 1)]
    first = [exp.evaluate_circuit(h).scores.values for h in hyps]
    plans = exp.runs.scratch["circuit-plans"]
    assert len(plans) == PLANS_KEPT  # the first hypothesis' plan was dropped
    kept = {id(p) for _, p in plans.values()}
    again = exp.evaluate_circuit(hyps[-1]).scores.values
    assert torch.equal(again, first[-1]) and {id(p) for _, p in plans.values()} == kept
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        reused = exp.evaluate_circuit(hyps[-1]).scores.values
        plans.clear()
        planned = exp.evaluate_circuit(hyps[-1]).scores.values
        assert torch.equal(reused, planned) and not torch.allclose(reused, first[-1])
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)


def test_replaced_projections_skipped_only_where_no_other_hook(exp, model):
    """A circuit pass sets whole q/k/v values without reading the model's: a
    HookedTransformer's attention then skips those projections for the pass (and is restored
    after it, also after an exception); a hook of the user's at the point keeps the model's
    own projection, which it sees, and the numbers are the same either way."""
    from apexlens.model import edits
    from apexlens.model.skips import hooked_pass

    g = full_graph(model)
    half = g[::2]
    plain = exp.evaluate_circuit(half).scores.values
    hooked = apexlens.model.backend_for(model).name == "HookedTransformer"
    attns = [b.attn for b in model.blocks] if hooked else []
    assert all("calculate_qkv_matrices" not in a.__dict__ for a in attns)
    seen = []
    user = ("blocks.1.attn.hook_q", lambda act, hook: seen.append(act.detach().clone()))
    model.add_hook(*user)
    try:
        observed = exp.evaluate_circuit(half).scores.values
    finally:
        model.reset_hooks()
    assert torch.equal(observed, plain) and seen and torch.isfinite(seen[0]).all()
    if not attns:  # a bridge: nothing is skipped
        return
    seen.clear()  # a torch hook registered on the hook point directly, not through TL
    handle = model.blocks[1].attn.hook_q.register_forward_hook(
        lambda mod, inp, out: seen.append(out.detach().clone())
    )
    try:
        direct = exp.evaluate_circuit(half).scores.values
    finally:
        handle.remove()
    assert torch.equal(direct, plain) and seen
    toks = exp.clean_tokens
    logits, cache = model.run_with_cache(toks)
    names = [f"blocks.{la}.attn.hook_{c}" for la in (0, 1) for c in "qk"]
    hooks = [(n, edits.overwrite(lambda n=n: cache[n])) for n in names]
    got = {}

    def other(act, hook):  # a second hook at layer 1's k: that projection is computed
        got["k"] = act.clone()
        got["patched"] = ["calculate_qkv_matrices" in a.__dict__ for a in attns]
        # a skipped value's hook is not attached: nothing runs at that hook point
        got["attached"] = [len(b.attn.hook_q.fwd_hooks) for b in model.blocks[:2]]

    hooks.append(("blocks.1.attn.hook_k", other))
    with hooked_pass(model, hooks):
        out = model(toks)
    assert got["patched"] == [True, True] + [False] * (len(attns) - 2)
    assert got["attached"] == [0, 0]
    assert all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())
    assert torch.equal(got["k"], cache["blocks.1.attn.hook_k"])
    assert torch.equal(out, logits)
    with pytest.raises(RuntimeError, match="inside"):
        with hooked_pass(model, hooks):
            raise RuntimeError("inside")
    assert all("calculate_qkv_matrices" not in a.__dict__ for a in attns)
