"""What a user names, parsed and checked once at the boundary.

* :mod:`~apexlens.vocab.nodes` -- nodes ``"embed"``, ``"9.9"``, ``"9.9.q"``, ``"m3"``,
  ``"r5"``, ``"logits"``, ``"2.kv1.k"``, sets ``"all-heads"``, ``"heads:3"``, ``"all-mlps"``;
  their roles (sender, receiver) and order in the forward pass;
* :mod:`~apexlens.vocab.positions` -- ``"@-1"``, ``"@3,4"``, ``"@end"``; where an edge acts;
* :mod:`~apexlens.vocab.edges` -- the one edge graph (:class:`EdgeIndex`, :func:`full_graph`);
* :mod:`~apexlens.vocab.sites` -- APEX noise sites (``"block_in"``, ``"embed"``, hook names);
* :mod:`~apexlens.vocab.features` -- features ``"m1.n34"``, ``"1.2.attn:0"``, ``"logit:7"``;
* :mod:`~apexlens.vocab.specs` -- :class:`Paths`, :class:`Circuit` and the option vocabularies.

(``apexlens.graph``, the old name of this vocabulary, is this package.)
"""

from apexlens.vocab.edges import EdgeIndex, EdgeList, edge_names, full_graph, has_edge, valid_edges
from apexlens.vocab.features import Feature, parse_feature, read_position
from apexlens.vocab.nodes import (
    EMBEDS,
    Node,
    NodeSpec,
    all_heads,
    all_mlps,
    as_receivers,
    as_senders,
    dims_of,
    heads_of_layer,
    parse_node,
    parse_nodes,
    unique,
    validate,
)
from apexlens.vocab.positions import edge_positions, position_index, position_mask, shared_positions
from apexlens.vocab.sites import DEFAULT_SITES, SITE_PRESETS, Site, parse_sites
from apexlens.vocab.specs import Ablation, Circuit, EdgeSpec, MLPMode, Paths

__all__ = [
    "DEFAULT_SITES",
    "EMBEDS",
    "SITE_PRESETS",
    "Ablation",
    "Circuit",
    "EdgeIndex",
    "EdgeList",
    "EdgeSpec",
    "Feature",
    "MLPMode",
    "Node",
    "NodeSpec",
    "Paths",
    "Site",
    "all_heads",
    "all_mlps",
    "as_receivers",
    "as_senders",
    "dims_of",
    "edge_names",
    "edge_positions",
    "full_graph",
    "has_edge",
    "heads_of_layer",
    "parse_feature",
    "parse_node",
    "parse_nodes",
    "parse_sites",
    "position_index",
    "position_mask",
    "read_position",
    "shared_positions",
    "unique",
    "validate",
    "valid_edges",
]
