"""Features: named scalars of a forward pass, read exactly, with their upstream attribution.

Feature visualization (:mod:`apexlens.api.features`) maximises a *feature*: one number per
example that a forward pass computes at a read position. The vocabulary follows the node
vocabulary of :mod:`apexlens.vocab.nodes`:

==========================  =====================================================  ==========
spelling                    the scalar                                             needs
==========================  =====================================================  ==========
``"m1.n37"``, ``"mlp1.n37"``  neuron 37 of MLP 1 (``blocks.1.mlp.hook_post[37]``)
``"1.3"``                   head 1.3's output ``z @ W_O`` along a direction         direction
``"1.3.attn:0"``            head 1.3's attention from the read position to key 0
``"r2"``                    the residual stream entering block 2 along a direction  direction
``"logit:17"``              the logit of token 17
``"<hook>[i]"``             any hook point's activation at trailing index ``i``
                            (``"blocks.0.attn.hook_z[2,5]"``: head 2, channel 5)
==========================  =====================================================  ==========

``"@p"`` sets the read position (default ``-1``, the last; negative counts from the end).
:func:`feature_values` reads a feature at *every* position (how natural examples are ranked);
the reference is a plain ``run_with_cache`` and an index, which the tests compare against.

:func:`apexlens.engines.features.attribution` splits a feature into what each upstream component wrote: the token and
position embeddings, every attention head (``z @ W_O``), every MLP, as gradient x activation
summed over positions -- exact for a feature that is linear in the residual stream (a logit, a
residual direction), the first-order share otherwise. It is how :func:`apexlens.fv_check`
asks whether a visualization reaches its activation *through the same components* as the
natural examples that excite the feature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import backend_for

FeatureKind = Literal["neuron", "head", "attn", "resid", "logit", "hook"]

_NEURON = re.compile(r"^(?:m|mlp)(\d+)\.n(\d+)$")
_HEAD = re.compile(r"^(\d+)\.(\d+)$")
_ATTN = re.compile(r"^(\d+)\.(\d+)\.attn:(-?\d+)$")
_RESID = re.compile(r"^(?:r|resid)(\d+)$")
_LOGIT = re.compile(r"^logits?[:.](\d+)$")
_HOOK = re.compile(r"^([A-Za-z_][\w.]*)\[(-?\d+(?:\s*,\s*-?\d+)*)\]$")
_SYNTAX = (
    "expected 'mL.nI' (neuron I of MLP L), 'L.H' (head output, with direction=), "
    "'L.H.attn:K' (attention to key position K), 'rL' (residual stream, with direction=), "
    "'logit:T', or '<hook name>[i]', optionally followed by '@position'"
)


@dataclass(frozen=True)
class Feature:
    """One scalar per example and position: where it is read and how it is reduced."""

    spec: str
    kind: FeatureKind
    hook: str
    layer: int
    index: tuple[int, ...] = ()
    direction: Tensor | None = field(default=None, compare=False)
    position: int = -1

    def __str__(self) -> str:
        return self.spec

    @property
    def label(self) -> str:
        """The spelling with its read position."""
        return f"{self.spec}@{self.position}"

    def values(self, act: Tensor, model: Any) -> Float[Tensor, "batch pos"]:
        """The feature at every position, from the activation at :attr:`hook`."""
        if self.kind in ("neuron", "logit", "hook"):
            idx: tuple[Any, ...] = (Ellipsis, *self.index)
            fits = self.kind == "hook" and act.ndim - 2 >= len(self.index)
            trailing = act.shape[act.ndim - len(self.index) :] if fits else ()
            for i, size in zip(self.index, trailing, strict=False):
                if not -size <= i < size:
                    raise ApexlensError(
                        f"feature {self.spec!r}: index {list(self.index)} is out of range for "
                        f"{self.hook}, whose activations are {tuple(act.shape)} "
                        f"[batch, pos, ...]: the last {len(self.index)} axes have "
                        f"{list(trailing)} entries"
                    )
            out = act[idx] if self.kind == "hook" else act[..., self.index[0]]
            if out.ndim != 2:
                raise ApexlensError(
                    f"feature {self.spec!r}: indexing {self.hook} {tuple(act.shape)} with "
                    f"{list(self.index)} leaves shape {tuple(out.shape)}, not [batch, pos]; "
                    "give one index per trailing axis"
                )
            return out
        if self.kind == "attn":
            head, key = self.index
            pat = act[:, head]  # [batch, query, key]
            k = key if key >= 0 else pat.shape[-1] + key
            if not 0 <= k < pat.shape[-1]:
                raise ApexlensError(
                    f"feature {self.spec!r}: key position {key} is outside a sequence of "
                    f"{pat.shape[-1]} positions"
                )
            return pat[..., k]
        assert self.direction is not None
        if self.kind == "head":
            bk = backend_for(model)
            w_o = bk.W_O_stacked[self.layer][self.index[0]]
            out = act[:, :, self.index[0]] @ w_o.to(act.dtype)
            return out @ self.direction.to(act)
        return act @ self.direction.to(act)  # resid


def parse_feature(model: Any, spec: str | Feature, *, direction: Any = None) -> Feature:
    """A :class:`Feature` from its spelling, checked against ``model``."""
    if isinstance(spec, Feature):
        return spec
    if not isinstance(spec, str):
        raise ApexlensError(f"a feature is a string ({_SYNTAX}), got {type(spec).__name__}")
    bk = backend_for(model)
    dims = bk.dims
    text, _, pos_text = spec.strip().partition("@")
    text = text.strip()
    position = -1
    if pos_text:
        try:
            position = int(pos_text)
        except ValueError:
            raise ApexlensError(
                f"feature {spec!r}: the read position after '@' must be an integer, got {pos_text!r}"
            ) from None

    def layer_ok(layer: int, n: int) -> int:
        if not 0 <= layer < n:
            raise ApexlensError(f"feature {spec!r}: layer {layer} out of range 0..{n - 1}")
        return layer

    def head_ok(head: int) -> int:
        if not 0 <= head < dims.n_heads:
            raise ApexlensError(f"feature {spec!r}: head {head} out of range 0..{dims.n_heads - 1}")
        return head

    def need_direction(size: int, what: str) -> Tensor:
        if direction is None:
            raise ApexlensError(
                f"feature {spec!r} is {what}, a vector: pass direction= (a tensor [{size}], "
                "e.g. a row of W_U or a probe) to read one number from it"
            )
        try:
            d = torch.as_tensor(direction)
        except (TypeError, ValueError, RuntimeError):
            raise ApexlensError(
                f"feature {spec!r}: direction must be a float tensor of shape [{size}], got "
                f"{type(direction).__name__}"
            ) from None
        if d.shape != (size,) or not d.is_floating_point():
            raise ApexlensError(
                f"feature {spec!r}: direction must be a float tensor of shape [{size}], got "
                f"{tuple(d.shape)} {d.dtype}"
            )
        if d.device.type == "meta" or not bool(torch.isfinite(d).all()):
            raise ApexlensError(
                f"feature {spec!r}: direction must hold finite numbers (it has NaN or inf, or "
                "no values on the meta device)"
            )
        if not bool((d != 0).any()):
            raise ApexlensError(
                f"feature {spec!r}: direction is all zeros: the feature would be 0 everywhere"
            )
        return d.to(device=bk.device, dtype=bk.dtype)

    if direction is not None and not (_HEAD.match(text) or _RESID.match(text)):
        raise ApexlensError(
            f"feature {spec!r} is already one number per position; direction= is only for "
            "a head's output ('L.H') or the residual stream ('rL')"
        )
    if m := _NEURON.match(text):
        layer, n = int(m[1]), int(m[2])
        layer_ok(layer, dims.n_layers)
        if not dims.has_mlps:
            raise ApexlensError(f"feature {spec!r}: the model has no MLPs (attention-only)")
        if not 0 <= n < dims.d_mlp:
            raise ApexlensError(f"feature {spec!r}: neuron {n} out of range 0..{dims.d_mlp - 1}")
        return Feature(
            f"m{layer}.n{n}",
            "neuron",
            bk.mlp_post(layer),
            layer,
            (n,),
            position=position,
        )
    if m := _ATTN.match(text):
        layer, head, key = layer_ok(int(m[1]), dims.n_layers), head_ok(int(m[2])), int(m[3])
        return Feature(
            f"{layer}.{head}.attn:{key}",
            "attn",
            bk.pattern(layer),
            layer,
            (head, key),
            position=position,
        )
    if m := _HEAD.match(text):
        layer, head = layer_ok(int(m[1]), dims.n_layers), head_ok(int(m[2]))
        d = need_direction(dims.d_model, "a head's output")
        return Feature(f"{layer}.{head}", "head", bk.z(layer), layer, (head,), d, position)
    if m := _RESID.match(text):
        layer = layer_ok(int(m[1]), dims.n_layers + 1)
        d = need_direction(dims.d_model, "the residual stream")
        hook = bk.resid_pre(layer) if layer < dims.n_layers else bk.resid_post(layer - 1)
        return Feature(f"r{layer}", "resid", hook, layer, (), d, position)
    if m := _LOGIT.match(text):
        token = int(m[1])
        if not 0 <= token < dims.d_vocab:
            raise ApexlensError(
                f"feature {spec!r}: token {token} out of range 0..{dims.d_vocab - 1}"
            )
        return Feature(f"logit:{token}", "logit", "", dims.n_layers, (token,), position=position)
    if m := _HOOK.match(text):
        hook = m[1]
        if not bk.has_hook(hook):
            raise ApexlensError(f"feature {spec!r}: the model has no hook point named {hook!r}")
        index = tuple(int(i) for i in m[2].split(","))
        layer_m = re.match(r"^blocks\.(\d+)\.", hook)
        layer = int(layer_m[1]) if layer_m else (0 if "embed" in hook else dims.n_layers)
        return Feature(
            f"{hook}[{','.join(map(str, index))}]", "hook", hook, layer, index, position=position
        )
    raise ApexlensError(f"cannot parse feature {spec!r}: {_SYNTAX}")


def read_position(feature: Feature, n_pos: int) -> int:
    """The read position as an index into ``n_pos`` positions (one clear error if outside)."""
    p = feature.position if feature.position >= 0 else n_pos + feature.position
    if not 0 <= p < n_pos:
        raise ApexlensError(
            f"feature {feature.label!r} reads position {feature.position}, outside a sequence "
            f"of {n_pos} positions"
        )
    return p
