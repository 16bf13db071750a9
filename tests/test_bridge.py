"""TransformerBridge support: weight conversion, and BridgeBackend against the equations.

Runs on TL 3.9 (where HookedTransformer is the second opinion) and on TL 4.x (where a
plain-torch forward pass written from the state dict is).
"""

from __future__ import annotations

import pytest
import torch

from apexlens.errors import ApexlensError
from apexlens.model import backend_for
from apexlens.model.bridged import BridgeAdapter
from apexlens.model.convert import convert_hooked_state_dict, is_bridge, to_bridge
from apexlens.model.hooked import HookedAdapter

from backends import (
    HAS_HOOKED,
    build,
    hooked_param_shapes,
    model_backends,
    random_state_dict,
    reference_forward,
)

BASE = dict(
    n_layers=3, d_model=24, d_head=6, n_heads=4, d_mlp=48, d_vocab=41, n_ctx=12, act_fn="gelu"
)
CONFIGS = {
    "ln-gelu": dict(BASE),
    "ln-gelu_new": dict(BASE, act_fn="gelu_new"),
    "lnpre-relu": dict(BASE, normalization_type="LNPre", act_fn="relu"),
    "nonorm-silu": dict(BASE, normalization_type=None, act_fn="silu"),
    "rms-gelu": dict(BASE, normalization_type="RMS"),
    "attn-only": dict(BASE, attn_only=True, d_mlp=None, act_fn=None, n_layers=2),
}
# TransformerLens' native RMSNorm computes in float32 whatever the model's dtype.
F64_TOL = {"rms-gelu": 1e-6}


def tokens(cfg: dict, batch: int = 3, n_pos: int = 9, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["d_vocab"], (batch, n_pos), generator=g)


def model_and_sd(name: str, backend: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    cfg = CONFIGS[name]
    sd = random_state_dict(cfg, seed, dtype)
    return build(cfg, sd, backend), sd


@pytest.fixture(scope="module")
def bridge64():
    model, sd = model_and_sd("ln-gelu", "bridge")
    return model, sd, tokens(CONFIGS["ln-gelu"])


# ------------------------------------------------------------------ the test support itself
@pytest.mark.requires_hooked
@pytest.mark.parametrize("name", CONFIGS)
def test_param_shapes_follow_hooked_transformer(name):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = CONFIGS[name]
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == hooked_param_shapes(cfg)


@pytest.mark.requires_hooked
def test_reference_forward_is_a_hooked_transformer():
    model, sd = model_and_sd("ln-gelu", "hooked")
    toks = tokens(CONFIGS["ln-gelu"])
    with torch.no_grad():
        torch.testing.assert_close(
            model(toks), reference_forward(CONFIGS["ln-gelu"], sd, toks), atol=1e-12, rtol=0
        )


# ------------------------------------------------------------------ conversion
@pytest.mark.parametrize("backend", model_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_plain_torch_forward(name, dtype, backend):
    cfg = CONFIGS[name]
    sd64 = random_state_dict(cfg, 0, torch.float64)
    model = build(cfg, {k: v.to(dtype) for k, v in sd64.items()}, backend)
    assert is_bridge(model) == (backend == "bridge")
    toks = tokens(cfg)
    with torch.no_grad():
        logits = model(toks)
    assert logits.dtype == dtype
    ref = reference_forward(cfg, sd64, toks)
    tol = 1e-5 if dtype == torch.float32 else F64_TOL.get(name, 1e-13)
    scale = ref.abs().max().item()  # relative to the largest logit (no-norm logits are large)
    torch.testing.assert_close(logits.double(), ref, atol=tol * max(scale, 1.0), rtol=0)
    assert ref.std() > 0.5  # weights far from init: a wrong map would show


@pytest.mark.requires_hooked
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["ln-gelu", "lnpre-relu", "attn-only"])
def test_to_bridge_of_a_hooked_transformer_matches_it(name, dtype):
    hooked, _ = model_and_sd(name, "hooked", dtype)
    bridge = to_bridge(hooked)
    assert is_bridge(bridge) and not bridge.training
    toks = tokens(CONFIGS[name])
    with torch.no_grad():
        diff = (hooked(toks) - bridge(toks)).abs().max().item()
    assert diff < (1e-4 if dtype == torch.float32 else 1e-12), diff


def test_state_dict_conversion_is_a_reshape():
    cfg = CONFIGS["ln-gelu"]
    sd = random_state_dict(cfg, 3)
    out = convert_hooked_state_dict(sd, cfg["n_heads"], cfg["d_head"])
    W_Q, W_O = sd["blocks.1.attn.W_Q"], sd["blocks.1.attn.W_O"]
    q, o = out["blocks.1.attn.q.weight"], out["blocks.1.attn.o.weight"]
    h, d = 2, 5  # head 2, dimension 5 of its d_head
    torch.testing.assert_close(q[h * cfg["d_head"] + d], W_Q[h, :, d], rtol=0, atol=0)
    torch.testing.assert_close(o[:, h * cfg["d_head"] + d], W_O[h, d], rtol=0, atol=0)
    torch.testing.assert_close(out["unembed.weight"], sd["unembed.W_U"].T, rtol=0, atol=0)
    assert sd["blocks.1.attn.W_Q"] is W_Q  # input untouched


def test_bad_configs_and_state_dicts_raise_one_clear_error():
    cfg = CONFIGS["ln-gelu"]
    sd = random_state_dict(cfg, 0)
    with pytest.raises(ApexlensError, match="positional_embedding_type"):
        to_bridge(dict(cfg, positional_embedding_type="rotary"), sd)
    with pytest.raises(ApexlensError, match="parallel_attn_mlp"):
        to_bridge(dict(cfg, parallel_attn_mlp=True), sd)
    with pytest.raises(ApexlensError, match="act_fn"):
        to_bridge(dict(cfg, act_fn="gelu_fast"), sd)
    with pytest.raises(ApexlensError, match="missing.*blocks.2.mlp.out.weight"):
        to_bridge(cfg, {k: v for k, v in sd.items() if k != "blocks.2.mlp.W_out"})
    with pytest.raises(ApexlensError, match="blocks.0.attn.rotary_sin"):
        to_bridge(cfg, {**sd, "blocks.0.attn.rotary_sin": torch.zeros(3)})
    with pytest.raises(ApexlensError, match="blocks.1.attn.W_K.*n_heads=4"):
        to_bridge(cfg, {**sd, "blocks.1.attn.W_K": torch.zeros(3, 24, 8, dtype=torch.float64)})
    with pytest.raises(ApexlensError, match="shape"):
        to_bridge(dict(cfg, d_mlp=40), sd)
    with pytest.raises(ApexlensError, match="already a TransformerBridge"):
        to_bridge(build(cfg, sd, "bridge"))


def test_a_bridge_without_compatibility_mode_is_used_as_it_is():
    """No compatibility-mode refusal and no silent switch: the backend reads what it needs."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    import apexlens

    raw = TransformerBridge.boot_native(
        TransformerBridgeConfig(
            d_model=8, d_head=4, n_heads=2, n_layers=1, n_ctx=4, d_vocab=7, act_fn="relu"
        )
    )
    before = getattr(raw, "compatibility_mode", False)
    assert isinstance(backend_for(raw).adapter, BridgeAdapter)
    result = apexlens.check(raw, torch.tensor([[1, 2, 3, 4]]))
    assert result.ok, result.first_failure
    assert getattr(raw, "compatibility_mode", False) == before


def stacked_weight(bk, name: str) -> torch.Tensor:
    """A Backend's per-layer attention weight ``name`` (``W_Q``, ``b_O``, ...) stacked over layers."""
    if name in ("W_U", "b_U"):
        return getattr(bk, name)
    if name[-1] == "O":
        per_layer = bk.W_O_stacked if name[0] == "W" else bk.b_O_stacked
    else:
        per_layer = (bk.W_in if name[0] == "W" else bk.b_in)(name[-1].lower())
    return torch.stack(list(per_layer))


# ------------------------------------------------------------------ BridgeBackend
NAMES = lambda bk, n: (  # noqa: E731
    [bk.resid_pre(0)]
    + [
        x
        for L in range(n)
        for x in (
            bk.resid_pre(L),
            bk.resid_mid(L),
            bk.resid_post(L),
            bk.attn_out(L),
            bk.mlp_out(L),
            bk.z(L),
            bk.pattern(L),
            *(bk.qkv(L, c) for c in "qkv"),
        )
    ]
)


def test_bridge_backend_pieces_agree_with_its_own_forward(bridge64):
    """Every Backend method on a bridge against the bridge's forward pass and the state dict."""
    model, sd, toks = bridge64
    bk = backend_for(model)
    assert type(bk.adapter) is BridgeAdapter
    n = bk.dims.n_layers
    assert (
        bk.dims.n_heads,
        bk.dims.d_head,
        bk.dims.d_model,
        bk.dims.d_vocab,
        bk.dims.has_mlps,
    ) == (4, 6, 24, 41, True)
    logits, c = bk.run_with_cache(toks, NAMES(bk, n))
    assert set(c) == set(NAMES(bk, n))
    torch.testing.assert_close(
        logits, reference_forward(CONFIGS["ln-gelu"], sd, toks), atol=1e-11, rtol=0
    )
    for name, t in c.items():
        assert t.shape[:2] == toks.shape or "pattern" in name
    assert c[bk.z(1)].shape == (3, 9, 4, 6) and c[bk.pattern(1)].shape == (3, 4, 9, 9)
    # weights are the state dict's, in HookedTransformer layout
    for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
        stacked = torch.stack([sd[f"blocks.{L}.attn.{w}"] for L in range(n)])
        torch.testing.assert_close(stacked_weight(bk, w), stacked, atol=0, rtol=0)
    torch.testing.assert_close(bk.W_U, sd["unembed.W_U"], atol=0, rtol=0)
    torch.testing.assert_close(bk.b_U, sd["unembed.b_U"], atol=0, rtol=0)
    assert bk.dtype == torch.float64 and not bk.W_in("q")[0].requires_grad
    tol = dict(atol=1e-12, rtol=0)
    for L in range(n):
        if L + 1 < n:
            torch.testing.assert_close(c[bk.resid_post(L)], c[bk.resid_pre(L + 1)], atol=0, rtol=0)
        torch.testing.assert_close(
            c[bk.resid_pre(L)] + c[bk.attn_out(L)], c[bk.resid_mid(L)], **tol
        )
        torch.testing.assert_close(
            c[bk.resid_mid(L)] + c[bk.mlp_out(L)], c[bk.resid_post(L)], **tol
        )
        head_out = torch.einsum("bphd,hdm->bpm", c[bk.z(L)], bk.W_O_stacked[L]) + sd[f"blocks.{L}.attn.b_O"]
        torch.testing.assert_close(head_out, c[bk.attn_out(L)], **tol)
        for ch in "qkv":
            torch.testing.assert_close(
                bk.head_input(L, ch, c[bk.resid_pre(L)]), c[bk.qkv(L, ch)], **tol
            )
            torch.testing.assert_close(
                bk.head_input(L, ch, c[bk.resid_pre(L)], slots=[3, 1]),
                c[bk.qkv(L, ch)][:, :, [3, 1]],
                **tol,
            )
        torch.testing.assert_close(
            bk.mlp_from_resid(L, c[bk.resid_mid(L)]), c[bk.mlp_out(L)], **tol
        )
        torch.testing.assert_close(
            bk.run_layers(c[bk.resid_pre(L)], L, L + 1), c[bk.resid_post(L)], **tol
        )
    final, _ = bk.run_with_cache(toks, [], logits=False)
    torch.testing.assert_close(final, c[bk.resid_post(n - 1)], atol=0, rtol=0)
    torch.testing.assert_close(bk.run_layers(c[bk.resid_pre(0)], 0), final, **tol)
    assert bk.run_layers(final, n) is final
    torch.testing.assert_close(bk.unembed(final), logits, **tol)
    cols = torch.tensor([7, 2, 40])
    torch.testing.assert_close(bk.unembed(final[:, -1], cols), logits[:, -1, cols], **tol)
    # ln pieces from the equations
    x = c[bk.resid_mid(1)]
    xn = (x - x.mean(-1, keepdim=True)) / (
        (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + 1e-5
    ).sqrt()
    torch.testing.assert_close(
        bk.ln2(1, x), xn * sd["blocks.1.ln2.w"] + sd["blocks.1.ln2.b"], **tol
    )
    torch.testing.assert_close(
        bk.ln1(1, x), xn * sd["blocks.1.ln1.w"] + sd["blocks.1.ln1.b"], **tol
    )
    torch.testing.assert_close(bk.ln_final(x), xn * sd["ln_final.w"] + sd["ln_final.b"], **tol)
    with pytest.raises(ApexlensError, match="outside"):
        bk.run_layers(final, 1, n + 1)


@pytest.mark.requires_hooked
@pytest.mark.parametrize("name", ["ln-gelu", "attn-only", "lnpre-relu"])
def test_bridge_backend_equals_hooked_backend(name):
    """Each Backend method returns the same tensors for a HookedTransformer and its bridge."""
    cfg = CONFIGS[name]
    sd = random_state_dict(cfg, 1)
    hb, bb = backend_for(build(cfg, sd, "hooked")), backend_for(build(cfg, sd, "bridge"))
    assert type(hb.adapter) is HookedAdapter and type(bb.adapter) is BridgeAdapter
    assert hb.dims == bb.dims
    n, toks, tol = hb.dims.n_layers, tokens(cfg), dict(atol=1e-11, rtol=0)
    names = [
        x for x in NAMES(hb, n) if hb.dims.has_mlps or ("resid_mid" not in x and "mlp" not in x)
    ]
    lh, ch = hb.run_with_cache(toks, names)
    lb, cb = bb.run_with_cache(toks, names)
    torch.testing.assert_close(lb, lh, **tol)
    assert set(cb) == set(ch) == set(names)
    for k in names:
        torch.testing.assert_close(cb[k], ch[k], **tol)
    for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "W_U", "b_U"):
        torch.testing.assert_close(stacked_weight(bb, w), stacked_weight(hb, w), atol=0, rtol=0)
    fh, _ = hb.run_with_cache(toks, [], logits=False)
    fb, _ = bb.run_with_cache(toks, [], logits=False)
    torch.testing.assert_close(fb, fh, **tol)
    x = ch[hb.resid_pre(1)]
    for layer in range(n):
        torch.testing.assert_close(bb.ln1(layer, x), hb.ln1(layer, x), **tol)
        torch.testing.assert_close(
            bb.heads_input(layer, "k", x[:, :, None].expand(-1, -1, 4, -1)),
            hb.heads_input(layer, "k", x[:, :, None].expand(-1, -1, 4, -1)),
            **tol,
        )
        if hb.dims.has_mlps:
            torch.testing.assert_close(bb.ln2(layer, x), hb.ln2(layer, x), **tol)
            torch.testing.assert_close(bb.mlp(layer, x), hb.mlp(layer, x), **tol)
        for stop in range(layer, n + 1):
            torch.testing.assert_close(
                bb.run_layers(x, layer, stop), hb.run_layers(x, layer, stop), **tol
            )
    torch.testing.assert_close(bb.ln_final(x), hb.ln_final(x), **tol)
    torch.testing.assert_close(bb.unembed(fb), hb.unembed(fh), **tol)


def test_training_flag_restored_and_no_grad():
    model, sd = model_and_sd("ln-gelu", "bridge", seed=2)
    bk = backend_for(model)
    toks = tokens(CONFIGS["ln-gelu"])
    with torch.no_grad():
        expected = model(toks)
    for flag in (True, False):
        model.train(flag)
        logits, c = bk.run_with_cache(toks, [bk.resid_pre(1)])
        outs = [
            logits,
            bk.run_layers(c[bk.resid_pre(1)], 1),
            bk.mlp(1, c[bk.resid_pre(1)]),
            bk.ln1(0, c[bk.resid_pre(1)]),
            bk.unembed(c[bk.resid_pre(1)]),
            bk.run_with_cache(toks, [], logits=False)[0],
        ]
        assert model.training is flag
        assert all(m.training is flag for m in model.modules())
        assert not any(t.requires_grad for t in outs)
        torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def _hook_state(model) -> list:
    return [
        (name, list(hp.fwd_hooks), list(hp._forward_hooks.items()))
        for name, hp in model.hook_dict.items()
    ]


def test_user_hooks_untouched_and_pieces_ignore_them(bridge64):
    model, sd, toks = bridge64
    bk = backend_for(model)
    _, c = bk.run_with_cache(toks, [bk.resid_pre(1), bk.resid_mid(1), bk.mlp_out(1)])
    calls: list[str] = []

    def doubling(act, hook):
        calls.append(hook.name)
        return 2 * act

    hp = model.hook_dict[bk.mlp_out(1)]
    hp.add_hook(doubling)  # the user's own, non-permanent
    model.hook_dict["blocks.1.ln2.hook_normalized"].add_hook(doubling, is_permanent=True)
    before = _hook_state(model)
    try:
        # pure pieces: the user's hooks neither fire nor change the result
        x = c[bk.resid_mid(1)]
        torch.testing.assert_close(bk.mlp_from_resid(1, x), c[bk.mlp_out(1)], atol=1e-12, rtol=0)
        assert calls == []
        # forward passes see them, once each: doubled normalised MLP input, doubled MLP output
        out = bk.run_layers(c[bk.resid_pre(1)], 1, 2)
        assert calls == ["blocks.1.ln2.hook_normalized", bk.mlp_out(1)]
        ln2_doubled = 2 * bk.ln2(1, x) - sd["blocks.1.ln2.b"]
        torch.testing.assert_close(out, x + 2 * bk.mlp(1, ln2_doubled), atol=1e-12, rtol=0)
    finally:
        after = _hook_state(model)
        model.reset_hooks(including_permanent=True)
    assert after == before
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_run_layers_hooks_fire_only_in_range_and_see_their_names(bridge64):
    model, sd, toks = bridge64
    bk = backend_for(model)
    _, c = bk.run_with_cache(toks, [bk.resid_pre(1)])
    seen: list[tuple[str, str]] = []

    def rec(name):
        def hook(act, hook):
            seen.append((name, hook.name))

        return hook

    names = (
        [bk.resid_pre(L) for L in range(3)]
        + [bk.resid_post(L) for L in range(3)]
        + ["hook_embed", bk.z(1)]
    )
    inp = c[bk.resid_pre(1)].clone()
    bk.run_layers(inp, 1, 2, [(n, rec(n)) for n in names])
    assert seen == [(bk.resid_pre(1),) * 2, (bk.z(1),) * 2, (bk.resid_post(1),) * 2]
    torch.testing.assert_close(inp, c[bk.resid_pre(1)], atol=0, rtol=0)  # input untouched
    seen.clear()
    bk.run_with_cache(toks, [bk.resid_pre(0)], [(bk.resid_post(2), rec(bk.resid_post(2)))])
    assert seen == [(bk.resid_post(2),) * 2]


def test_patching_through_hooks_matches_equations(bridge64):
    """An edit at hook_q or hook_attn_out reaches the logits exactly as the equations say."""
    model, sd, toks = bridge64
    bk = backend_for(model)
    logits, c = bk.run_with_cache(toks, [bk.resid_pre(2), bk.attn_out(2), bk.resid_mid(2)])
    delta = torch.randn(
        c[bk.attn_out(2)].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    patched, _ = bk.run_with_cache(toks, [], [(bk.attn_out(2), lambda a, hook: a + delta)])
    mid = c[bk.resid_mid(2)] + delta
    expected = bk.unembed(mid + bk.mlp_from_resid(2, mid))
    torch.testing.assert_close(patched, expected, atol=1e-11, rtol=0)
    assert (patched - logits).abs().max() > 0.1


def test_resid_mid_edit_reaches_only_the_mlp_on_a_bridge(bridge64):
    """TL fact apexlens works around (module docstring): hook_resid_mid is ln2's input."""
    model, sd, toks = bridge64
    bk = backend_for(model)
    _, c = bk.run_with_cache(toks, [bk.resid_mid(2)])
    delta = torch.ones_like(c[bk.resid_mid(2)])
    final, _ = bk.run_with_cache(
        toks, [], [(bk.resid_mid(2), lambda a, hook: a + delta)], logits=False
    )
    only_mlp = c[bk.resid_mid(2)] + bk.mlp_from_resid(2, c[bk.resid_mid(2)] + delta)
    torch.testing.assert_close(final, only_mlp, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ a Hugging Face GPT-2 bridge
def gpt2_bridge(processed: bool):
    """A ``boot_transformers``-style bridge around a random 2-layer GPT-2 (offline)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # HF initialises from the global generator
    hc = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    hf = GPT2LMHeadModel(hc).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # far from init, so that a wrong piece shows
        for p in hf.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hc, model_name="gpt2-random")
    bridge.enable_compatibility_mode(no_processing=not processed, disable_warnings=True)
    return bridge


@pytest.mark.parametrize("processed", [False, True], ids=["raw", "fold_ln"])
def test_bridge_backend_on_a_hugging_face_gpt2(processed):
    """What ``TransformerBridge.boot_transformers("gpt2")`` gives (with or without the default
    weight processing), on random weights: every Backend piece agrees with the forward pass."""
    bk = backend_for(gpt2_bridge(processed))
    n, toks = (
        bk.dims.n_layers,
        torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2)),
    )
    names = [
        x
        for L in range(n)
        for x in (
            bk.resid_pre(L),
            bk.resid_mid(L),
            bk.resid_post(L),
            bk.attn_out(L),
            bk.mlp_out(L),
            bk.z(L),
        )
        + tuple(bk.qkv(L, ch) for ch in "qkv")
    ]
    logits, c = bk.run_with_cache(toks, names)
    assert set(c) == set(names) and logits.shape == (2, 7, 50)

    def close(a, b):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)

    for L in range(n):
        close(bk.run_layers(c[bk.resid_pre(L)], L, L + 1), c[bk.resid_post(L)])
        close(bk.mlp_from_resid(L, c[bk.resid_mid(L)]), c[bk.mlp_out(L)])
        close(c[bk.resid_pre(L)] + c[bk.attn_out(L)], c[bk.resid_mid(L)])
        head_out = torch.einsum("bphd,hdm->bpm", c[bk.z(L)], bk.W_O_stacked[L]) + bk.model.b_O[L].detach()
        close(head_out, c[bk.attn_out(L)])
        for ch in "qkv":
            close(bk.head_input(L, ch, c[bk.resid_pre(L)]), c[bk.qkv(L, ch)])
    final, _ = bk.run_with_cache(toks, [], logits=False)
    close(final, c[bk.resid_post(n - 1)])
    close(bk.run_layers(c[bk.resid_pre(0)], 0), final)
    close(bk.unembed(final), logits)
    close(bk.unembed(final, torch.tensor([3, 9])), logits[..., [3, 9]])
    assert logits.std() > 0.5


# ------------------------------------------------------------------ the shipped toy models
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shipped_toy_models_as_bridges(toy_model_factory, dtype):
    """Every shipped model loads as a bridge computing its saved weights' function (and, on
    TL 3.9, the HookedTransformer's logits)."""
    from apexlens.toys.models import list_models, toy_state

    names = list_models()
    assert names, "no shipped toy models found"
    for name in names:
        cfg, sd = toy_state(name, torch.float64)
        toks = tokens(cfg, batch=4, n_pos=min(cfg["n_ctx"], 16))
        bridge = toy_model_factory(name, "bridge", dtype)
        assert is_bridge(bridge) and not bridge.training
        with torch.no_grad():
            logits = bridge(toks)
        assert logits.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(
            logits.double(), reference_forward(cfg, sd, toks), atol=tol, rtol=0
        )
        if HAS_HOOKED:
            with torch.no_grad():
                hooked = toy_model_factory(name, "hooked", dtype)(toks)
            torch.testing.assert_close(logits, hooked, atol=tol, rtol=0)
