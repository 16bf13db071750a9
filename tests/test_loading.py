"""Issue 12, item 10: loading a hub model fails fast, in one line, when the hub is unreachable."""

from __future__ import annotations

import socket
import time

import pytest

import apexlens
from apexlens.toys.models import load_model


# ----------------------------------------------------------------------------- 10. offline
def test_load_model_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(*a, **k):
        time.sleep(0.1)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t = time.perf_counter()
    with pytest.raises(apexlens.ApexlensError) as e:
        load_model("gpt2")
    assert time.perf_counter() - t < 2.0
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "huggingface.co" in msg and "induction-2l" in msg


def test_load_model_offline_mode_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(apexlens.ApexlensError, match="HF_HUB_OFFLINE") as e:
        load_model("gpt2")
    assert time.perf_counter() - t < 2.0 and len(str(e.value).splitlines()) == 1


def test_load_model_does_not_block_on_a_cached_model(monkeypatch):
    import apexlens.toys.models as models

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_in_hf_cache", lambda name: True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a))
    from helpers import random_model

    sentinel = random_model(0)  # a real model: load_model self-checks what it loaded
    monkeypatch.setattr(models, "pretrained", lambda *a, **k: sentinel)
    assert load_model("gpt2") is sentinel and calls == []


def test_load_model_fails_fast_in_a_fresh_process(tmp_path):
    """In a fresh interpreter (TransformerLens not imported yet, which alone takes seconds)
    loading a hub model with the hub unreachable fails in one line within 2 s."""
    import os
    import subprocess
    import sys

    code = (
        "import time, apexlens\n"
        "load = apexlens.load_model  # import apexlens is lazy: this imports torch, untimed\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load('gpt2')\n"
        "except apexlens.ApexlensError as e:\n"
        "    print(f'{time.perf_counter() - t:.3f}')\n"
        "    print(e)\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: unreachable, on any machine
    env["HF_HOME"] = str(tmp_path)  # an empty cache
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    seconds, message = r.stdout.splitlines()
    assert float(seconds) < 2.0, r.stdout
    assert "127.0.0.1:9" in message and "induction-2l" in message
    assert "transformer_lens" not in r.stderr
