"""Sites: where APEX puts noise, in the same vocabulary as nodes.

A site is a node (``"embed"`` = ``blocks.0.hook_resid_pre``, ``"r5"``, ``"m3"`` =
``hook_mlp_out``), a preset over layers (``"block_in"``, ``"resid_post"``, ``"resid_pre:6"``,
``"z:0,1"``...), or a raw hook name. Each resolves to :class:`Site` objects: a hook point, the
name of its noise stream (the same on both model classes), and the axes along which one noise
value is shared.

=================  ======================================================================
``"block_in"``     what every sublayer reads: ``blocks.{l}.ln1.hook_normalized`` (attention)
                   and ``blocks.{l}.ln2.hook_normalized`` (the MLP), the residual stream
                   itself left clean (APEX's protocol on a transformer; the default)
``"embed"``        the input to block 0, ``blocks.0.hook_resid_pre`` (input perturbation)
``"resid_pre"``    every block's input ``blocks.{l}.hook_resid_pre``
``"resid_mid"``    ``blocks.{l}.hook_resid_mid``
``"resid_post"``   every block's output ``blocks.{l}.hook_resid_post``
``"attn_out"``     ``blocks.{l}.hook_attn_out``
``"mlp_out"``      ``blocks.{l}.hook_mlp_out``
``"mlp_pre"``      an MLP's pre-activation ``z_l``, ``blocks.{l}.mlp.hook_pre``
``"mlp_post"``     an MLP's activation ``phi(z_l)``, ``blocks.{l}.mlp.hook_post`` (the paper's
                   words taken literally)
``"z"``            head outputs ``blocks.{l}.attn.hook_z`` (every head of the layer)
=================  ======================================================================

``block_in`` in a model without norms (``normalization_type=None``): a ``TransformerBridge``
keeps identity norms with hook points, so ``blocks.{l}.ln1.hook_out`` / ``ln2.hook_out``; a
``HookedTransformer`` has none, so ``blocks.{l}.hook_attn_in`` (one noise value shared by
every head: all heads read the same perturbed input) and ``blocks.{l}.hook_mlp_in`` (apexlens
switches on the flags that make them fire for the call, :func:`apexlens.model.hooks.firing`).
Both read the noise stream named after ``ln1``/``ln2.hook_normalized``, so the two model
classes get the same noise. Attention-only models have no ``ln2`` sites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.model import Backend, HookNames
from apexlens.vocab.nodes import parse_node


@dataclass(frozen=True)
class Site:
    """A hook point that gets noise.

    ``key`` names its noise stream (default: the hook name), so that the same site on the
    other model class, reached through another hook, gets the same noise. ``shared_axes``:
    axes of the per-example activation (0 = position) along which one noise value is shared
    (the head axis of ``hook_attn_in``, whose heads all read one residual stream).
    """

    hook: str
    key: str = ""
    shared_axes: tuple[int, ...] = ()

    @property
    def stream(self) -> str:
        return self.key or self.hook

    def __str__(self) -> str:
        return self.hook


def _block_in(bk: Backend, layer: int) -> list[Site]:
    norms = ["ln1"] + (["ln2"] if bk.dims.has_mlps else [])
    sites = []
    for norm in norms:
        key = HookNames.normalized(layer, norm)
        if bk.has_hook(key):
            sites.append(Site(key))
        elif bk.has_hook(f"blocks.{layer}.{norm}.hook_out"):  # a bridge's identity norm
            sites.append(Site(f"blocks.{layer}.{norm}.hook_out", key))
        elif norm == "ln1":
            sites.append(Site(f"blocks.{layer}.hook_attn_in", key, (1,)))  # [pos, head, d]
        else:
            sites.append(Site(f"blocks.{layer}.hook_mlp_in", key))
    return sites


def _mlp_hook(name: Callable[[int], str]) -> Callable[[Backend, int], list[Site]]:
    def sites(bk: Backend, layer: int) -> list[Site]:
        if not bk.dims.has_mlps:
            raise ApexlensError(
                f"site preset {name(layer).rsplit('.', 1)[-1]!r}: the model is attention-only "
                "(no MLPs); use 'block_in', 'z' or 'resid_pre'"
            )
        return [Site(name(layer))]

    return sites


def _each(name: Callable[[int], str]) -> Callable[[Backend, int], list[Site]]:
    return lambda bk, layer: [Site(name(layer))]


SITE_PRESETS: dict[str, Callable[[Backend, int], list[Site]]] = {
    "block_in": _block_in,
    "resid_post": _each(HookNames.resid_post),
    "resid_pre": _each(HookNames.resid_pre),
    "resid_mid": _each(HookNames.resid_mid),
    "attn_out": _each(HookNames.attn_out),
    "mlp_out": _each(HookNames.mlp_out),
    "mlp_pre": _mlp_hook(HookNames.mlp_pre),
    "mlp_post": _mlp_hook(HookNames.mlp_post),
    "z": _each(HookNames.z),
}
"""Site preset -> the sites of layer ``l``; ``"preset:3,5"`` restricts it to layers."""

DEFAULT_SITES = "block_in"
"""Where APEX puts noise unless told otherwise (the module docstring says why)."""


def parse_sites(spec: str | Sequence[str], bk: Backend | int) -> list[Site]:
    """The sites of a spec: presets (optionally ``":layers"``), nodes (``"embed"``, ``"rL"``,
    ``"mL"``) or raw hook names, de-duplicated in order. ``bk``: the model's backend (an int
    ``n_layers`` is enough for every preset but ``block_in``, ``mlp_pre`` and ``mlp_post``)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ApexlensError("sites is empty: name at least one hook point or preset")
    n_layers = bk if isinstance(bk, int) else bk.dims.n_layers
    sites: list[Site] = []
    for item in items:
        if not isinstance(item, str):
            raise ApexlensError(f"sites must be strings (hook names or presets), got {item!r}")
        kind, colon, layers = item.partition(":")
        if kind in SITE_PRESETS:
            chosen = _site_layers(layers, n_layers, item) if colon else range(n_layers)
            if isinstance(bk, int) and kind in ("block_in", "mlp_pre", "mlp_post"):
                raise ApexlensError(f"site preset {kind!r} needs the model, not only n_layers")
            for layer in chosen:
                sites.extend(SITE_PRESETS[kind](bk, layer))  # type: ignore[arg-type]
            continue
        sites.append(Site(_node_site(item, n_layers) or item))
    return list(dict.fromkeys(sites))


def _node_site(item: str, n_layers: int) -> str | None:
    """The hook name of a node spelled as a site (``"embed"``, ``"r5"``, ``"m3"``), or None."""
    if ":" in item or "." in item:
        return None
    try:
        node = parse_node(item)
    except ApexlensError:
        return None
    if node.kind not in ("embed", "resid", "mlp") or node.positions is not None:
        return None
    if node.kind == "resid" and not 0 <= node.layer <= n_layers:
        raise ApexlensError(f"site {item!r}: layer out of range for a {n_layers}-layer model")
    if node.kind == "mlp" and not 0 <= node.layer < n_layers:
        raise ApexlensError(f"site {item!r}: layer out of range for a {n_layers}-layer model")
    if node.kind == "embed" or (node.kind == "resid" and node.layer < n_layers):
        return HookNames.resid_pre(0 if node.kind == "embed" else node.layer)
    if node.kind == "resid":
        return HookNames.resid_post(n_layers - 1)
    return HookNames.mlp_out(node.layer)


def _site_layers(spec: str, n_layers: int, item: str) -> list[int]:
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            layer = int(part)
        except ValueError:
            raise ApexlensError(
                f"site {item!r}: expected comma-separated layer numbers after ':', got {part!r}"
            ) from None
        if not -n_layers <= layer < n_layers:
            raise ApexlensError(
                f"site {item!r}: layer {layer} out of range for a {n_layers}-layer model"
            )
        layers.append(layer % n_layers)
    return layers


def describe_sites(sites: Sequence[Any]) -> str:
    """A short, readable list of hook names for messages and reports."""
    names = [str(s) for s in sites]
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ... ({len(names)})"
