"""The only layer that knows the model class: hooks, hook edits, and the :class:`Backend`.

* :mod:`~apexlens.model.hooks` -- attaching hooks without a trace; the per-model lock;
  :func:`~apexlens.model.hooks.inference_mode` (module flags restored exactly);
* :mod:`~apexlens.model.edits` -- every hook edit (*what* an intervention does);
* :class:`Backend` (:mod:`~apexlens.model.backend`) -- hook names, weights per layer, pieces of
  the forward pass, the head algebra; built by :func:`backend_for` over one of two sibling
  adapters found by type (:mod:`~apexlens.model.protocol`: ``HookedTransformer``,
  ``TransformerBridge``);
* :mod:`~apexlens.model.norms` -- norms and MLP activations as the model computes them;
* :mod:`~apexlens.model.grouped` -- a grouped-query head reading a key/value of its own;
* :mod:`~apexlens.model.convert` -- :func:`to_bridge` (HookedTransformer format -> bridge);
  :mod:`~apexlens.model.build` -- models from a config and weights (toy models, random GPT-2).
"""

from __future__ import annotations

from typing import Any

from apexlens.errors import ApexlensError
from apexlens.model.backend import Backend, HookNames
from apexlens.model.bridged import BridgeAdapter
from apexlens.model.dims import Dims, dims_of
from apexlens.model.hooked import HookedAdapter
from apexlens.model.protocol import ModelAdapter

ADAPTERS: tuple[type[HookedAdapter] | type[BridgeAdapter], ...] = (HookedAdapter, BridgeAdapter)
"""The model classes apexlens knows, each an adapter that says whether it ``matches``."""

__all__ = ["ADAPTERS", "Backend", "Dims", "HookNames", "ModelAdapter", "backend_for", "shape_of"]


def shape_of(model: Any) -> Dims:
    """A model's :class:`Dims`, read from its config alone (no adapter is built)."""
    return model.dims if isinstance(model, Backend) else dims_of(model.cfg)


def backend_for(model: Any) -> Backend:
    """The :class:`Backend` for ``model`` (a ``Backend`` is returned as it is)."""
    if isinstance(model, Backend):
        return model
    if not hasattr(model, "cfg") or not hasattr(model, "hooks"):
        raise ApexlensError(
            "expected a TransformerLens HookedTransformer or TransformerBridge, got "
            f"{type(model).__name__}"
        )
    for adapter in ADAPTERS:
        if adapter.matches(model):
            bk = Backend(model, adapter)
            if bk.device.type == "meta":
                raise ApexlensError(
                    "the model is on the meta device: it has shapes but no weights to compute "
                    "with; load its weights first (e.g. model.to_empty(device='cpu') then "
                    "model.load_state_dict(...)), or build it on a real device"
                )
            return bk
    raise ApexlensError(
        f"{type(model).__name__} is neither a HookedTransformer nor a TransformerBridge; "
        "apexlens computes exactly only on those two TransformerLens model classes"
    )
