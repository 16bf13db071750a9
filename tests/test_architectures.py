"""Every architecture option that changes the forward pass x every engine, against the naive
loops of :mod:`apexlens.reference` in float64 (issue 10).

Models are tiny (3 layers, d_model <= 32, batch 2, 5 tokens) so the whole file runs in
well under a minute:

* ``HookedTransformer`` (TL 3.9 only, deselected on TL 4): one random-init model per
  ``HookedTransformerConfig`` option (:data:`OPTIONS`), biases and norm weights pushed away
  from their initial values so nothing is trivially zero;
* ``TransformerBridge`` without compatibility mode, built offline over random-weight Hugging
  Face models (:data:`HF`, TL 3.9 and 4.3): GPT-2, GPT-NeoX/Pythia (partial rotary, parallel
  attention and MLP), Llama (grouped-query, rotary, RMS, gated MLP), Qwen2 (the same with
  q/k/v biases), Gemma-2 (grouped-query, pre+post norms, attention and logit soft caps,
  sliding windows).

Engines (:func:`check_engines`): path patching to logits (live and frozen MLPs), to q/k/v
(query heads >= n_kv_heads, KV heads ``L.kvJ``), MLP receivers and positions (live and
frozen), a multi-hop path through a key input; activation patching; APEX (hook names, the
``block_in`` protocol, ``mlp_pre``); circuits (full,
empty, and full-minus-one-edge == the naive frozen path patch of that edge, both for one
query head's key and for a whole KV head); ``apexlens.patched`` with Paths and a Circuit;
and :func:`apexlens.api.check`. Tolerance 1e-9, except two bridges whose Hugging Face modules
compute parts in float32 even in a float64 model, so that the engine and the loop, reaching
the same activation by different sums, can differ by float32 rounding: GPT-NeoX (1e-8; TL's
NeoX bridge computes its rotary embedding in float32, its forward differs from the HF model
by ~1e-9) and Gemma-2 (1e-7; ``Gemma2RMSNorm`` normalises ``x.float()``).

``APEXLENS_TEST_DEVICE=cuda pytest tests/test_architectures.py`` runs the same matrix with
every model and input on a GPU (still float64, same tolerances; the naive loops run there too).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

import apexlens
from apexlens.reference import naive_act_patch, naive_apex, naive_path_patch
from apexlens.scoring import LogitDiff
from apexlens.vocab import full_graph

TOL = 1e-9
DEVICE = os.environ.get("APEXLENS_TEST_DEVICE", "cpu")
BATCH, N_POS, VOCAB = 2, 5, 40

BASE = dict(
    n_layers=3,
    d_model=16,
    n_heads=4,
    d_head=4,
    d_mlp=32,
    d_vocab=VOCAB,
    n_ctx=12,
    act_fn="gelu_new",
    normalization_type="LN",
)
GEMMA = dict(
    normalization_type="RMS",
    use_normalization_before_and_after=True,
    attn_scores_soft_cap=1.5,
    output_logits_soft_cap=0.8,
    positional_embedding_type="rotary",
    rotary_dim=4,
    n_key_value_heads=2,
    gated_mlp=True,
    act_fn="gelu_pytorch_tanh",
    use_local_attn=True,
    attn_types=["local", "global", "local"],
    window_size=2,
)
OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "gqa": dict(n_key_value_heads=2),
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=4),
    "rotary-partial": dict(positional_embedding_type="rotary", rotary_dim=2),
    "parallel_attn_mlp": dict(parallel_attn_mlp=True),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "pre+post-norms": dict(normalization_type="RMS", use_normalization_before_and_after=True),
    "attn_scores_soft_cap": dict(attn_scores_soft_cap=1.5),
    "output_logits_soft_cap": dict(output_logits_soft_cap=0.8),
    "local-window": dict(
        use_local_attn=True, attn_types=["local", "global", "local"], window_size=2
    ),
    "use_qk_norm": dict(use_qk_norm=True, normalization_type="RMS"),
    "gated_mlp": dict(gated_mlp=True, act_fn="silu"),
    "norm-LNPre": dict(normalization_type="LNPre"),
    "norm-RMS": dict(normalization_type="RMS"),
    "norm-RMSPre": dict(normalization_type="RMSPre"),
    "norm-None": dict(normalization_type=None),
    "final_rms": dict(final_rms=True),
    "alibi": dict(positional_embedding_type="alibi"),
    "llama-like": dict(
        n_key_value_heads=2,
        positional_embedding_type="rotary",
        rotary_dim=4,
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        final_rms=True,
    ),
    "gemma2-like": GEMMA,
}


# ---------------------------------------------------------------------------- models
def hooked(opts: dict[str, Any]) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **{**BASE, **opts, "dtype": torch.float64, "seed": 0, "device": "cpu"}
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("b") or "ln" in name or "norm" in name:
                p += 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return on_device(model.eval())


def on_device(model: Any) -> Any:
    return None if model is None else model.to(DEVICE)


def _hf_configs() -> dict[str, tuple[str, Any]]:
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    return {
        "gpt2": (
            "GPT2LMHeadModel",
            GPT2Config(
                n_layer=3,
                n_embd=32,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=16,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        "pythia": (
            "GPTNeoXForCausalLM",
            GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True),
        ),
        "llama": ("LlamaForCausalLM", LlamaConfig(**common, num_key_value_heads=2)),
        "qwen2": ("Qwen2ForCausalLM", Qwen2Config(**common, num_key_value_heads=2)),
        "gemma2": (
            "Gemma2ForCausalLM",
            Gemma2Config(
                **common,
                num_key_value_heads=2,
                head_dim=8,
                sliding_window=3,
                query_pre_attn_scalar=8,
                attn_logit_softcapping=1.5,
                final_logit_softcapping=3.0,
            ),
        ),
    }


HF = ["gpt2", "pythia", "llama", "qwen2", "gemma2"]
BRIDGE_TOL = {"pythia": 1e-8, "gemma2": 1e-7}  # float32 inside the HF modules (docstring)


def _hf_model(cfg: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "ln" in n or n.endswith("bias"):
                p += 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return hf.eval()


def _ungrouped_hf(hf: Any) -> Any:
    """The same HF model with one key/value head per query head (weights repeated)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(hf.config)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    cfg.num_key_value_heads = n_heads
    twin = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float64)
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            v = v.reshape(n_kv, d_head, *v.shape[1:]).repeat_interleave(n_heads // n_kv, 0)
            v = v.reshape(n_heads * d_head, *v.shape[2:])
        sd[k] = v
    twin.load_state_dict(sd, strict=True)
    return twin.eval()


def bridge(name: str) -> tuple[Any, Any]:
    """A bridge over a random HF model, and (for grouped-query models) its ungrouped twin."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    arch, cfg = _hf_configs()[name]
    hf = _hf_model(cfg)
    build = lambda m: build_bridge_from_module(copy.deepcopy(m), arch, hf_config=m.config)  # noqa: E731
    twin = None
    if getattr(cfg, "num_key_value_heads", None) not in (None, cfg.num_attention_heads):
        twin = on_device(build(_ungrouped_hf(hf)))
    return on_device(build(hf)), twin


def data() -> tuple[torch.Tensor, torch.Tensor, LogitDiff]:
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, VOCAB, (BATCH, N_POS), generator=g).to(DEVICE)
    corrupted = torch.randint(0, VOCAB, (BATCH, N_POS), generator=g).to(DEVICE)
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]), positions=-1)
    return clean, corrupted, metric


# ---------------------------------------------------------------------------- the matrix
def check_engines(model: Any, tol: float, ungrouped: Any = None) -> None:
    clean, corrupted, metric = data()
    bk = apexlens.model.backend_for(model)
    grouped = bk.dims.group > 1
    result = apexlens.check(model, clean)
    assert result.ok, result.first_failure

    def same(fast: torch.Tensor, slow: torch.Tensor) -> None:
        assert fast.shape == slow.shape
        assert fast.device.type == clean.device.type  # results stay on the model's device
        torch.testing.assert_close(fast, slow.to(fast), atol=tol, rtol=0)

    def naive(**kw: Any) -> torch.Tensor:
        return naive_path_patch(model, clean, corrupted, metric=metric, ungrouped=ungrouped, **kw)

    exp = apexlens.Experiment(model, clean, corrupted, metric=metric, positions={"end": -1})
    receivers = ["2.1.q", "2.3.k", "2.2.v@end", "m2"] + (["2.kv1.v", "1.kv0.k"] if grouped else [])
    cases = [
        dict(senders=["embed", "0.1", "m0", "1.2", "1.3"], receivers="logits"),
        dict(senders=["embed", "0.1@2", "m0", "1.2"], receivers=receivers),
        dict(senders=["embed", "0.1", "0.2"], receivers="logits", via=["1.3.k"]),
    ]
    moved = 0.0
    for case in cases:
        for mlps in ("live", "frozen"):
            kw = dict(case, mlps=mlps)
            fast = exp.path_patch(kw["senders"], kw["receivers"], via=kw.get("via", ()), mlps=mlps)
            slow = naive(**kw, positions={"end": -1})
            same(fast.per_example, slow)
            moved = max(moved, float((slow - exp.clean_values).abs().max()))
    assert moved > 1e-3  # the patches did something

    # position-restricted receivers (issue 27): propagation at their positions, then the
    # run from their earliest position on (a prefix's keys/values where the model runs
    # suffixes); separate=True: one value per receiver, each patched alone
    restricted = ["2.1.q@end", "2.3.k@3", "m2@end", "logits"]
    for mlps in ("live", "frozen"):
        sep = exp.path_patch(["embed", "0.1", "m0", "1.2@2"], restricted, mlps=mlps, separate=True)
        for j, r in enumerate(restricted):
            slow = naive(senders=["embed", "0.1", "m0", "1.2@2"], receivers=[r], mlps=mlps,
                         positions={"end": -1})
            same(sep.per_example[:, j], slow)
        joint = exp.path_patch(["0.1", "m1", "1.3"], ["2.2.v@2", "2.0.q@end"], mlps=mlps)
        slow = naive(senders=["0.1", "m1", "1.3"], receivers=["2.2.v@2", "2.0.q@end"], mlps=mlps,
                     positions={"end": -1})
        same(joint.per_example, slow)

    # exact per-position edge scores: each row runs from its position on
    if not bk.post_norms:
        # edges into every layer: the rows of earlier receivers run later blocks whole and the
        # last one at the read position only (its keys/values from every position)
        # (under grouped-query attention, "2.3.k" is a query head's own key: packed runs)
        pe = [("m0", "m1"), ("1.2", "2.0.q"), ("embed", "logits"), ("0.2", "1.1.q")]
        pe += [("0.1", "2.3.k"), ("embed", "1.0.v")]
        sc = exp.attribute_edges(method="exact", per_position=True, edges=pe)
        for i, (s_, r_) in enumerate(sc.edges):
            if i % 2 == 0 or s_.startswith("embed"):
                slow = naive(senders=[s_], receivers=[r_], mlps="frozen")[0] - exp.clean_values
                same(sc.per_example[i], slow)

    # activation patching (also at positions: a run from the first patched position on)
    nodes = [("blocks.0.attn.hook_z", 1), ("blocks.2.attn.hook_z", 3)]
    nodes += [("blocks.1.hook_mlp_out", None), ("blocks.1.hook_resid_pre", None)]
    slow = naive_act_patch(model, clean, corrupted, nodes=nodes, metric=metric)
    same(exp.act_patch(["0.1", "2.3", "m1", "r1"]).per_example, slow)
    at = [("blocks.0.attn.hook_z", 1, -1), ("blocks.1.attn.hook_z", 2, 2)]
    at += [("blocks.1.hook_mlp_out", None, 3), ("blocks.2.hook_resid_pre", None, 1)]
    slow = naive_act_patch(model, clean, corrupted, nodes=at, metric=metric)
    same(exp.act_patch(["0.1@end", "1.2@2", "m1@3", "r2@1"]).per_example, slow)

    # APEX: hook names, and the default protocol (block_in) and an MLP preset, relative noise
    sigmas, sites = [0.0, 0.5, 2.0], ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
    res = apexlens.apex(model, clean, sigmas=sigmas, n_draws=2, sites=sites, seed=7, relative=False)
    preds, probs = naive_apex(model, clean, sigmas, 2, sites, seed=7)
    assert torch.equal(res.predictions.cpu(), preds.cpu())
    torch.testing.assert_close(res.mean_probs.cpu(), probs.cpu(), rtol=1e-8, atol=1e-10)
    from apexlens.api.apex import resolve_sites

    for preset in ("block_in", "mlp_pre") if bk.dims.has_mlps else ("block_in",):
        res = apexlens.apex(model, clean, sigmas=[0.5, 2.0], n_draws=2, sites=preset, seed=7)
        preds, probs = naive_apex(model, clean, [0.5, 2.0], 2, resolve_sites(model, preset),
                                  seed=7, relative=True)
        assert torch.equal(res.predictions.cpu(), preds.cpu()), preset
        torch.testing.assert_close(res.mean_probs.cpu(), probs.cpu(), rtol=1e-8, atol=1e-10)

    # circuits (refused with norms after attention and the MLP)
    g = full_graph(model)
    if bk.post_norms:
        with pytest.raises(apexlens.ApexlensError, match="not additive"):
            exp.evaluate_circuit(g)
    else:
        same(exp.evaluate_circuit(g).scores.values, exp.clean_values)
        same(exp.evaluate_circuit([]).scores.values, exp.corrupted_values)
        edges = [("0.1", "2.3.k"), ("embed", "1.2.v"), ("m0", "m1"), ("1.0", "logits")]
        if grouped:
            edges.append(("0.2", "2.kv1.k"))
        for s, r in edges:
            expanded = {(str(a), str(b)) for a, b in _edges(exp, s, r)}
            keep = [e for e in g if (str(e[0]), str(e[1])) not in expanded]
            res_c = exp.evaluate_circuit(keep)
            same(res_c.scores.values, naive(senders=[s], receivers=[r], mlps="frozen")[0])
        with apexlens.patched(model, apexlens.Circuit(keep), corrupted):
            logits = model(clean)
        same(metric(logits), res_c.scores.values)

    # patched paths: any forward pass under a path patch
    with apexlens.patched(model, apexlens.Paths("0.1", "2.3.k"), corrupted):
        logits = model(clean)
    same(metric(logits), naive(senders=["0.1"], receivers="2.3.k")[0])


def _edges(exp: Any, s: str, r: str) -> list[tuple[Any, Any]]:
    """The query-head edges an edge stands for (a KV head: every query head of its group)."""
    from apexlens.vocab import parse_node

    node = parse_node(r)
    if node.kind != "kv":
        return [(parse_node(s), node)]
    g = exp.bk.dims.group
    return [
        (parse_node(s), parse_node(f"{node.layer}.{h}.{node.channel}"))
        for h in range(node.head * g, (node.head + 1) * g)
    ]


@pytest.mark.requires_hooked
@pytest.mark.parametrize("option", OPTIONS)
def test_hooked_transformer_option(option):
    with torch.no_grad():
        check_engines(hooked(OPTIONS[option]), TOL)


@pytest.mark.parametrize("name", HF)
def test_bridge_over_hf_model(name):
    model, twin = bridge(name)
    assert not getattr(model, "compatibility_mode", False)
    with torch.no_grad():
        check_engines(model, BRIDGE_TOL.get(name, TOL), ungrouped=twin)
    assert not getattr(model, "compatibility_mode", False)  # never switched on behind our back


def test_to_bridge_native_model():
    from backends import build, random_state_dict

    cfg = {**BASE, "act_fn": "gelu"}
    model = on_device(build(cfg, random_state_dict(cfg, 0), "bridge"))
    with torch.no_grad():
        check_engines(model, TOL)


def test_to_bridge_gated_mlp_and_what_it_refuses():
    """to_bridge maps gated MLPs (the native bridge's has no biases: zero ones are dropped,
    others refused by name); rotary and grouped-query attention are refused by name."""
    from apexlens.model.convert import to_bridge

    from backends import random_state_dict

    cfg = {**BASE, "n_layers": 2, "act_fn": "silu", "gated_mlp": True}
    sd = random_state_dict({**cfg, "gated_mlp": False}, 0)
    g = torch.Generator().manual_seed(2)
    for la in range(2):
        sd[f"blocks.{la}.mlp.W_gate"] = 0.4 * torch.randn(16, 32, generator=g, dtype=torch.float64)
        sd[f"blocks.{la}.mlp.b_in"] = torch.zeros(32, dtype=torch.float64)
        sd[f"blocks.{la}.mlp.b_out"] = torch.zeros(16, dtype=torch.float64)
    model = on_device(to_bridge(cfg, sd))
    result = apexlens.check(model, data()[0])
    assert result.ok, result.first_failure
    try:
        from backends import build

        twin = on_device(build(cfg, sd, "hooked"))  # the same function, HookedTransformer
    except ImportError:
        twin = None
    if twin is not None:
        with torch.no_grad():
            torch.testing.assert_close(model(data()[0]), twin(data()[0]), atol=1e-10, rtol=0)
    sd["blocks.1.mlp.b_in"] = sd["blocks.1.mlp.b_in"] + 0.1
    with pytest.raises(apexlens.ApexlensError, match="gated_mlp=True with a nonzero MLP bias"):
        to_bridge(cfg, sd)
    for opts, name in (
        (dict(n_key_value_heads=2), "n_key_value_heads=2"),
        (
            dict(positional_embedding_type="rotary", rotary_dim=4),
            "positional_embedding_type='rotary'",
        ),
    ):
        with pytest.raises(apexlens.ApexlensError, match=name):
            to_bridge({**BASE, **opts}, random_state_dict(BASE, 0))


# ---------------------------------------------------------------------------- refusals
@pytest.mark.requires_hooked
def test_olmo2_post_norm_is_refused_by_name():
    model = hooked(dict(normalization_type="RMS", original_architecture="Olmo2ForCausalLM"))
    with pytest.raises(apexlens.ApexlensError, match="OLMo-2-style post-norm"):
        apexlens.check(model)


@pytest.mark.requires_hooked
def test_grouped_query_reference_is_an_ungrouped_copy_and_leaves_the_model_alone():
    from apexlens.reference import ungrouped_copy

    model = hooked(OPTIONS["gqa"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = ungrouped_copy(model)
    assert twin is not model and not model.cfg.ungroup_grouped_query_attention
    clean, _, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(twin(clean), model(clean), atol=1e-12, rtol=0)
        _, cache = twin.run_with_cache(clean)
    assert cache["blocks.0.attn.hook_k"].shape[2] == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kv_head_spelling():
    from apexlens.vocab import parse_node

    assert str(parse_node("2.kv1.k")) == "2.kv1.k"
    with pytest.raises(apexlens.ApexlensError, match="a KV head has no query input"):
        parse_node("2.kv1.q")


@pytest.mark.requires_hooked
def test_kv_head_out_of_range_and_not_a_sender():
    model = hooked(OPTIONS["gqa"])
    clean, corrupted, metric = data()
    with pytest.raises(apexlens.ApexlensError, match="2 key/value heads"):
        apexlens.path_patch(
            model, clean, corrupted, senders="0.1", receivers="2.kv2.k", metric=metric
        )
    with pytest.raises(apexlens.ApexlensError, match="receiver only"):
        apexlens.path_patch(
            model, clean, corrupted, senders="1.kv0", receivers="logits", metric=metric
        )
