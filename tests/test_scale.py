"""Past one device, on one machine: models split across devices are refused (until a test on
two devices has run), and the memory preflight (``apexlens.estimate_memory``) against the
peaks torch's profiler measures."""

from __future__ import annotations

import pytest
import torch

import apexlens
from apexlens import ApexlensError

from backends import model_backends
from helpers import random_model, random_tokens


@pytest.mark.parametrize("backend", model_backends())
def test_a_model_split_across_devices_is_refused(backend):
    model = random_model(0, backend=backend)
    clean, corrupted = random_tokens(model)
    metric = apexlens.LogitDiff(clean[:, -1] % 7, corrupted[:, -1] % 7)
    apexlens.path_patch(model, clean, corrupted, senders="heads:0", metric=metric)  # one device
    model.cfg.n_devices = 2
    with pytest.raises(ApexlensError, match=r"split across devices \(cfg.n_devices=2\)"):
        apexlens.path_patch(model, clean, corrupted, senders="heads:0", metric=metric)
    model.cfg.n_devices = 1
    if backend == "bridge":  # a Hugging Face device map over two devices
        model.original_model.hf_device_map = {"transformer.h.0": 0, "transformer.h.1": "cpu"}
        with pytest.raises(ApexlensError, match=r"hf_device_map over cpu, cuda:0"):
            apexlens.apex(model, clean, sigmas=[1.0], n_draws=2)
        del model.original_model.hf_device_map
    block = model.blocks[1]
    block.to("meta")  # one block elsewhere
    with pytest.raises(ApexlensError, match=r"parameters on cpu, meta.*apexlens.sharded"):
        apexlens.Experiment(model, clean, corrupted, metric=metric)


def test_the_default_budget_follows_free_memory(monkeypatch):
    from apexlens.model import backend_for
    from apexlens.runs import cache

    bk = backend_for(random_model(0))
    plenty = cache.default_budget(bk, 64, 12)
    monkeypatch.setattr(cache, "free_bytes", lambda device: 64 << 20)
    assert cache.default_budget(bk, 64, 12) == min(plenty, 32 << 20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the machine
    assert cache.default_budget(bk, 64, 12) == 16 << 20  # never below 16 MiB
    monkeypatch.setattr(cache, "free_bytes", lambda device: None)
    assert cache.default_budget(bk, 64, 12) == plenty


# ----------------------------------------------------------------------------- the preflight
def peak_bytes(fn) -> int:
    """The peak of the bytes torch allocated while ``fn`` ran, beyond what was allocated
    before: torch's own allocation records (the profiler's memory timeline), which on the
    CPU see every tensor storage, unlike RSS (the allocator keeps freed pages) or tracemalloc
    (blind to torch)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live: dict[object, int] = {}
    now = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live[key] = size
            now += size
            peak = max(peak, now)
        elif action == Action.DESTROY and key in live:
            now -= live.pop(key)
    return peak


@pytest.fixture(scope="module")
def held_out():
    """A shape the estimates were not fitted on (2 layers, d_model 80, 5 heads of 16, d_mlp
    320), float32, batch 4 x 16."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=80, n_ctx=32, d_head=16, n_heads=5,
                                  d_mlp=320, d_vocab=400, act_fn="gelu_new",
                                  normalization_type="LN", seed=0, device="cpu")
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    clean, corrupted = (torch.randint(0, 400, (4, 16), generator=g) for _ in range(2))
    return model, clean, corrupted, apexlens.LogitDiff(clean[:, -1], corrupted[:, -1])


def _ask(question, model, clean, corrupted, metric):
    half = [e for i, e in enumerate(apexlens.full_graph(model)) if i % 2 == 0]
    return {
        "path_patch": lambda: apexlens.path_patch(
            model, clean, corrupted, senders="heads:0", receivers="1.1.q", metric=metric),
        "act_patch": lambda: apexlens.act_patch(model, clean, corrupted, metric=metric),
        "circuit": lambda: apexlens.evaluate_circuit(model, clean, corrupted, half, metric=metric),
        "attribute_edges:exact": lambda: apexlens.attribute_edges(
            model, clean, corrupted, metric=metric, method="exact"),
        "attribute_edges:eap-ig": lambda: apexlens.attribute_edges(
            model, clean, corrupted, metric=metric, method="eap-ig"),
        "apex": lambda: apexlens.apex(model, clean, sigmas=[0.5, 1, 2], n_draws=4),
    }[question]


@pytest.mark.requires_hooked  # fitted on HookedTransformer's forward pass
@pytest.mark.parametrize("question, options", [
    ("path_patch", dict(senders="heads:0", receivers="1.1.q")),
    ("act_patch", {}),
    ("circuit", {}),
    ("attribute_edges:exact", {}),
    ("attribute_edges:eap-ig", {}),
    ("apex", dict(n_sigmas=3, n_draws=4)),
])
def test_estimate_memory_is_within_a_quarter_of_the_measured_peak(question, options, held_out):
    model, clean, corrupted, metric = held_out
    estimate = apexlens.estimate_memory(model, tuple(clean.shape), question, **options)
    measured = peak_bytes(_ask(question, model, clean, corrupted, metric))
    assert 0.75 <= estimate / measured <= 1.25, (question, estimate, measured)


def test_estimate_memory_refuses_what_it_does_not_know():
    model = random_model(0)
    with pytest.raises(ApexlensError, match="question must be one of"):
        apexlens.estimate_memory(model, (4, 8), "discover")
    with pytest.raises(ApexlensError, match=r"tokens_shape must be \(batch, pos\)"):
        apexlens.estimate_memory(model, 4, "path_patch")
    small = apexlens.estimate_memory(model, (4, 8), "circuit")
    assert apexlens.estimate_memory(model, (8, 8), "circuit") > small  # grows with the batch
