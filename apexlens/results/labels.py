"""Labels for tokens and nodes in result tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.vocab import parse_node

TokenLabels = Callable[[Tensor], Sequence[str]] | Sequence[str]


def node_fields(name: str) -> tuple[int | None, int | None]:
    try:
        node = parse_node(name)
    except ApexlensError:
        return None, None
    layer = node.layer if node.kind in ("head", "mlp", "resid") else None
    return layer, node.head



def labels_of(tokens: Tensor, token_labels: TokenLabels | None) -> list[str]:
    if token_labels is None:
        return [str(int(t)) for t in tokens]
    if callable(token_labels):
        return [str(t) for t in token_labels(tokens)]
    return [str(token_labels[int(t)]) for t in tokens]
