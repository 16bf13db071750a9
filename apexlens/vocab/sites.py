"""Sites: where APEX puts noise, in the same vocabulary as nodes.

A site is a node (``"embed"`` = ``blocks.0.hook_resid_pre``, ``"r5"``, ``"m3"`` =
``hook_mlp_out``), a preset over layers (``"resid_post"``, ``"resid_pre:6"``, ``"z:0,1"``,
``"mlp_post"``...), or a raw hook name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apexlens.errors import ApexlensError
from apexlens.model import HookNames
from apexlens.vocab.nodes import parse_node

SITE_PRESETS: dict[str, Any] = {
    "resid_post": HookNames.resid_post,
    "resid_pre": HookNames.resid_pre,
    "resid_mid": HookNames.resid_mid,
    "attn_out": HookNames.attn_out,
    "mlp_out": HookNames.mlp_out,
    "z": HookNames.z,
}
"""Site preset -> hook name of layer ``l``; ``"preset:3,5"`` restricts it to layers."""


def parse_sites(spec: str | Sequence[str], n_layers: int) -> list[str]:
    """Hook names of a site spec: presets (optionally ``":layers"``), nodes (``"embed"``,
    ``"rL"``, ``"mL"``) or raw hook names, de-duplicated in order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ApexlensError("sites is empty: name at least one hook point or preset")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ApexlensError(f"sites must be strings (hook names or presets), got {item!r}")
        kind, colon, layers = item.partition(":")
        if kind in SITE_PRESETS:
            chosen = _site_layers(layers, n_layers, item) if colon else range(n_layers)
            names.extend(SITE_PRESETS[kind](layer) for layer in chosen)
            continue
        node = None
        if not colon and "." not in item:
            try:
                node = parse_node(item)
            except ApexlensError:
                node = None
        if node is not None and node.kind in ("embed", "resid", "mlp") and node.positions is None:
            if node.kind == "resid" and not 0 <= node.layer <= n_layers:
                raise ApexlensError(
                    f"site {item!r}: layer out of range for a {n_layers}-layer model"
                )
            if node.kind == "mlp" and not 0 <= node.layer < n_layers:
                raise ApexlensError(
                    f"site {item!r}: layer out of range for a {n_layers}-layer model"
                )
            if node.kind == "embed" or (node.kind == "resid" and node.layer < n_layers):
                names.append(HookNames.resid_pre(0 if node.kind == "embed" else node.layer))
            elif node.kind == "resid":
                names.append(HookNames.resid_post(n_layers - 1))
            else:
                names.append(HookNames.mlp_out(node.layer))
            continue
        names.append(item)
    return list(dict.fromkeys(names))


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
