"""The node vocabulary: spellings, sets, order, positions and errors."""

from __future__ import annotations

import pytest
import torch

from apexlens.model import ApexlensError, Dims
from apexlens.vocab import (
    Node,
    all_heads,
    all_mlps,
    as_receivers,
    as_senders,
    full_graph,
    heads_of_layer,
    parse_node,
    parse_nodes,
    position_mask,
)

DIMS = Dims(
    n_layers=12, n_heads=12, d_model=768, d_head=64, d_vocab=50257, n_ctx=1024, has_mlps=True
)


@pytest.mark.parametrize(
    "spec, node",
    [
        ("9.9", Node("head", 9, 9)),
        ("9.9.q", Node("head", 9, 9, "q")),
        ("10.0.k", Node("head", 10, 0, "k")),
        ("m3", Node("mlp", 3)),
        ("mlp3", Node("mlp", 3)),
        ("embed", Node("embed")),
        ("logits", Node("logits")),
        ("9.9.q@-1", Node("head", 9, 9, "q", (-1,))),
        ("0.1@3,4", Node("head", 0, 1, None, (3, 4))),
        ("9.6.q@end", Node("head", 9, 6, "q", "end")),
    ],
)
def test_parse(spec, node):
    parsed = parse_node(spec)
    assert parsed == node
    assert parse_node(str(parsed)) == parsed  # round trip


def test_sets_and_order():
    heads = parse_nodes("all-heads", DIMS)
    assert (
        len(heads) == 144 and heads[0] == Node("head", 0, 0) and heads[-1] == Node("head", 11, 11)
    )
    assert parse_nodes("heads:3", DIMS) == heads_of_layer(DIMS, 3)
    assert [str(n) for n in parse_nodes("heads:3@-1", DIMS)][:2] == ["3.0@-1", "3.1@-1"]
    assert len(all_mlps(DIMS)) == 12 and all_heads(DIMS) == heads
    n = DIMS.n_layers
    order = [parse_node(s).order(n) for s in ["embed", "0.0", "m0", "1.3", "m11", "logits"]]
    assert order == sorted(order) and len(set(order)) == len(order)
    assert parse_node("5.1").order(n) == parse_node("5.7.q").order(n)  # same layer: no path


def test_receivers_expand_heads_and_senders_reject_channels():
    recv = as_receivers([parse_node("9.9")])
    assert [str(r) for r in recv] == ["9.9.q", "9.9.k", "9.9.v"]
    with pytest.raises(ApexlensError, match="sender is the head's output"):
        as_senders([parse_node("9.9.q")])
    with pytest.raises(ApexlensError, match="cannot be a receiver"):
        as_receivers([parse_node("embed")])
    with pytest.raises(ApexlensError, match="given twice"):
        as_receivers([parse_node("1.1.q"), parse_node("1.1")])


def test_full_graph_counts():
    g = full_graph(DIMS)
    # senders: embed + 144 heads + 12 MLPs; receivers: 432 head inputs + 12 MLPs + logits
    n_senders = len({s for s, _ in g})
    n_receivers = len({r for _, r in g})
    assert (n_senders, n_receivers) == (157, 445)
    n = DIMS.n_layers
    assert all(s.order(n) < r.order(n) for s, r in g)
    # embed reaches everything; a last-layer head reaches only the logits
    assert sum(1 for s, _ in g if s == Node("embed")) == 445
    assert [str(r) for s, r in g if s == Node("head", 11, 0)] == ["m11", "logits"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("9.12", "out of range"),
        ("12.0", "out of range"),
        ("m12", "out of range"),
        ("foo", "unknown node"),
        ("9.9.x", "unknown node"),
        ("9.9@", "bad positions"),
        ("heads:x", "bad head set"),
    ],
)
def test_errors(bad, message):
    with pytest.raises(ApexlensError, match=message):
        parse_nodes(bad, DIMS)


def test_attention_only_model_has_no_mlps():
    d = Dims(2, 4, 64, 16, 50, 64, has_mlps=False)
    with pytest.raises(ApexlensError, match="attention-only"):
        parse_nodes("m0", d)
    assert all_mlps(d) == []


def test_position_masks():
    m = position_mask(parse_node("0.1@-1"), 2, 5)
    assert m is not None and m.tolist() == [[False] * 4 + [True]] * 2
    m = position_mask(parse_node("0.1@end"), 2, 5, {"end": torch.tensor([1, 3])})
    assert m is not None and m.nonzero().tolist() == [[0, 1], [1, 3]]
    assert position_mask(parse_node("0.1"), 2, 5) is None
    with pytest.raises(ApexlensError, match="out of range"):
        position_mask(parse_node("0.1@7"), 2, 5)
    with pytest.raises(ApexlensError, match="unknown"):
        position_mask(parse_node("0.1@end"), 2, 5, {"start": torch.tensor([0, 0])})
    with pytest.raises(ApexlensError, match="one position per example"):
        position_mask(Node("head", 0, 1).at(torch.tensor([1, 2, 3])), 2, 5)
