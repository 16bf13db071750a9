"""Where a model lives: one device (models split across devices are refused until tested)
and how much memory that device has free.

**Models split across devices** -- a ``HookedTransformer`` with ``cfg.n_devices > 1``, a
bridge over a Hugging Face model dispatched with a ``device_map`` over several devices, any
model whose parameters sit on more than one device -- would need every patched pass to move
each residual delta to its block's device. That code path has not been run against the
naive loops on a machine with two devices, so such a model is refused with one clear error
instead of guessed at (:func:`check_one_device`). Scale past one device by sharding the
prompts instead (``apexlens.sharded()`` under ``torchrun``: one model copy per GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apexlens.errors import ApexlensError


def _device_map_places(model: Any) -> set[str]:
    """The devices of a bridge's Hugging Face ``hf_device_map`` (empty: none)."""
    inner = model.__dict__.get("original_model") if hasattr(model, "__dict__") else None
    device_map = getattr(inner, "hf_device_map", None) or getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return set()
    return {str(torch.device(f"cuda:{d}") if isinstance(d, int) else d) for d in device_map.values()}


def check_one_device(model: Any) -> None:
    """Refuse a model split across devices (module docstring), naming how it is split."""
    why = []
    n_devices = getattr(model.cfg, "n_devices", 1) or 1
    if isinstance(n_devices, int) and n_devices > 1:
        why.append(f"cfg.n_devices={n_devices}")
    places = _device_map_places(model)
    if len(places) > 1:
        why.append(f"hf_device_map over {', '.join(sorted(places))}")
    params = getattr(model, "parameters", None)
    on = sorted({str(p.device) for p in params()}) if callable(params) else []
    if len(on) > 1:
        why.append(f"parameters on {', '.join(on)}")
    if why:
        raise ApexlensError(
            f"this model is split across devices ({'; '.join(why)}): apexlens has not yet "
            "verified its patched passes on such models (each delta must move to its block's "
            "device; that needs a test on a machine with two devices), so it refuses them "
            "rather than guess. Load the model on one device (n_devices=1, no device_map, or "
            "model.to(device)); to use several GPUs, shard the prompts instead: one model copy "
            "per GPU under torchrun, questions inside `with apexlens.sharded():`"
        )


def free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now: CUDA's ``mem_get_info``; on the CPU the machine's
    ``MemAvailable`` (``/proc/meminfo``); ``None`` where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None
