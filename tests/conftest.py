"""Shared pytest set-up.

Model classes (see tests/backends.py): TL 3.9 has ``HookedTransformer`` and
``TransformerBridge``, TL 4.x only the bridge.

* Parametrize a test over ``backends.model_backends()`` to run it on every class this TL has.
  Tests parametrized with ``backend="hooked"``, and tests marked ``@pytest.mark.requires_hooked``,
  are *deselected* (not skipped) where ``HookedTransformer`` does not exist.
* ``toy_model_factory(name, backend=None, dtype=torch.float32)`` loads a shipped toy model as
  either class (``backend=None``: ``backends.default_backend()``).
* ``collect_ignore_glob`` lists test files that cannot even be imported without
  ``HookedTransformer`` (none today: import it inside functions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from backends import HAS_HOOKED, default_backend

# The test models are tiny: torch's intra-op threads only contend with each other (and with
# other jobs on a shared CI machine); one thread made a bridge forward pass 40x faster here.
torch.set_num_threads(1)

# Test files whose module-level imports need HookedTransformer (ignored on TL 4.x).
_HOOKED_ONLY_FILES: list[str] = []
collect_ignore_glob = [] if HAS_HOOKED else list(_HOOKED_ONLY_FILES)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_hooked: needs HookedTransformer (deselected on TransformerLens 4.x)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_HOOKED:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "hooked" or item.get_closest_marker("requires_hooked"):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def toy_model_factory() -> Callable[..., Any]:
    """``factory(name, backend=None, dtype=torch.float32)`` -> a shipped toy model, cached."""
    cache: dict[tuple[str, str, torch.dtype], Any] = {}

    def factory(name: str, backend: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
        from apexlens.toys.models import load_model

        key = (name, backend or default_backend(), dtype)
        if key not in cache:
            cache[key] = load_model(name, backend=key[1], dtype=dtype)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Any:
    """GPT-2's real tokenizer, built offline from tests/data/gpt2-tokenizer (BPE files + LICENSE)."""
    from pathlib import Path

    from apexlens.toys.tokenizer import gpt2_tokenizer as build

    return build(Path(__file__).parent / "data" / "gpt2-tokenizer")
