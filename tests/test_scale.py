"""Past one device, on one machine: models split across devices are refused (until a test on
two devices has run), and the memory preflight (``apexlens.estimate_memory``) against the
peaks torch's profiler measures."""

from __future__ import annotations

import pytest

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
