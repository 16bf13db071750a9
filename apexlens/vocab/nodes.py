"""The node vocabulary of path patching: who sends, who receives, and in which order.

A transformer's residual stream is a sum of the outputs of its components. Path patching
(Wang et al. 2022, appendix B; Goldowsky-Dill et al. 2023) talks about *paths* between
them, so it needs names for the components:

=============  ============================================  ==========================
spelling       node                                          role
=============  ============================================  ==========================
``"embed"``    token + positional embedding                  sender
``"tok_embed"`` the token / positional embedding alone         sender (circuits and
``"pos_embed"``  (``hook_embed`` / ``hook_pos_embed``)          discovery only)
``"9.9"``      attention head 9 of layer 9 (``z @ W_O``)     sender; as a receiver it
                                                             means all of q, k and v
``"9.9.q"``    the query input of head 9.9 (also k, v)       receiver
``"m3"``       MLP 3 (also ``"mlp3"``): output / input       sender / receiver
``"logits"``   the final residual stream, read through       receiver
               ``ln_final`` and the unembedding
``"r5"``       the residual stream entering block 5          activation patching,
               (``"rN"``, N = n_layers: the final one)       noise site
=============  ============================================  ==========================

The same vocabulary names the *sites* where APEX adds noise (:func:`parse_sites`): a node
(``"embed"`` = ``blocks.0.hook_resid_pre``, ``"r5"``, ``"m3"`` = ``hook_mlp_out``), a preset
over layers (``"resid_post"``, ``"resid_pre:6"``, ``"z:0,1"``...), or a raw hook name.
:meth:`Node.hook` is where each node lives in the model.

Any node can be restricted to positions with ``"@"``: ``"9.9.q@-1"``, ``"0.1@3,4"``, or a
name such as ``"9.9.q@end"`` looked up in the ``positions`` mapping handed to the engine
(e.g. a task batch's ``named_positions``). Helpers build common sets:
:func:`all_heads`, :func:`heads_of_layer`, :func:`all_mlps`.

Nodes are ordered by where they act in the forward pass (:attr:`Node.order`): a path from
sender ``s`` to receiver ``r`` exists iff ``s.order < r.order``. Heads of one layer never
talk to each other.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import Backend, Dims, backend_for

Kind = Literal["embed", "tok_embed", "pos_embed", "head", "kv", "mlp", "logits", "resid"]
EMBEDS = ("embed", "tok_embed", "pos_embed")
"""The sender kinds that read tokens (order 0)."""
Channel = Literal["q", "k", "v"]
PositionSpec = int | Sequence[int] | Tensor | str | None

_HEAD = re.compile(r"^(\d+)\.(\d+)(?:\.([qkv]))?$")
_KV = re.compile(r"^(\d+)\.kv(\d+)(?:\.([qkv]))?$")
_MLP = re.compile(r"^(?:m|mlp)(\d+)$")
_RESID = re.compile(r"^(?:r|resid|resid_pre)(\d+)$")
_SYNTAX = (
    "expected 'embed', 'logits', 'L.H' (head H of layer L), 'L.H.q' / '.k' / '.v' (a head's "
    "input), 'L.kvJ' / 'L.kvJ.k' / 'L.kvJ.v' (key/value head J, shared by its query group), "
    "'mL' or 'mlpL' (MLP L), 'rL' (the residual stream entering block L), optionally "
    "followed by '@positions'"
)


@dataclass(frozen=True)
class Node:
    """One component of the model, optionally restricted to positions.

    ``positions`` is ``None`` (all positions), a tuple of ints, a position name (looked up
    when the node is used), or a per-example tensor (``[batch]`` or ``[batch, k]``).
    """

    kind: Kind
    layer: int = -1
    head: int | None = None
    channel: Channel | None = None
    positions: Any = None

    # ------------------------------------------------------------------ naming
    @property
    def name(self) -> str:
        """The node's spelling without positions, e.g. ``"9.9.q"``."""
        if self.kind in EMBEDS:
            return self.kind
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"m{self.layer}"
        if self.kind == "resid":
            return f"r{self.layer}"
        base = f"{self.layer}.kv{self.head}" if self.kind == "kv" else f"{self.layer}.{self.head}"
        return f"{base}.{self.channel}" if self.channel else base

    def __str__(self) -> str:
        if self.positions is None:
            return self.name
        if isinstance(self.positions, str):
            return f"{self.name}@{self.positions}"
        if isinstance(self.positions, tuple):
            return f"{self.name}@{','.join(map(str, self.positions))}"
        return f"{self.name}@<tensor>"

    def __repr__(self) -> str:
        return f"Node({str(self)!r})"

    # ------------------------------------------------------------------ order
    def order(self, n_layers: int) -> int:
        """Where the node acts: embed 0, attention of layer L 2L+1, MLP L 2L+2, logits last
        (a residual stream ``rL`` is read before block L: 2L)."""
        if self.kind in EMBEDS:
            return 0
        if self.kind == "resid":
            return 2 * self.layer
        if self.kind in ("head", "kv"):
            return 2 * self.layer + 1
        if self.kind == "mlp":
            return 2 * self.layer + 2
        return 2 * n_layers + 1

    @property
    def as_sender(self) -> Node:
        """The same component as a sender (a head without its channel)."""
        return replace(self, channel=None) if self.kind == "head" else self

    def at(self, positions: PositionSpec) -> Node:
        """This node restricted to ``positions``."""
        return replace(self, positions=_position_tuple(positions))

    def hook(self, bk: Backend) -> str:
        """The hook point holding this node's activation: a head's ``hook_z`` (its channel:
        ``hook_q/k/v``), an MLP's ``hook_mlp_out``, ``embed`` and ``rL``: ``hook_resid_pre``
        (the final residual: the last block's ``hook_resid_post``)."""
        n = bk.dims.n_layers
        if self.kind == "head":
            return bk.qkv(self.layer, self.channel) if self.channel else bk.z(self.layer)
        if self.kind == "kv":
            return bk.qkv(self.layer, self.channel or "k")
        if self.kind == "mlp":
            return bk.mlp_out(self.layer)
        if self.kind == "embed":
            return bk.resid_pre(0)
        if self.kind in ("tok_embed", "pos_embed"):
            return "hook_embed" if self.kind == "tok_embed" else "hook_pos_embed"
        if self.kind == "resid" and self.layer < n:
            return bk.resid_pre(self.layer)
        return bk.resid_post(n - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return (self.kind, self.layer, self.head, self.channel) == (
            other.kind,
            other.layer,
            other.head,
            other.channel,
        ) and _positions_key(self.positions) == _positions_key(other.positions)

    def __hash__(self) -> int:
        return hash(
            (self.kind, self.layer, self.head, self.channel, _positions_key(self.positions))
        )


def _positions_key(p: Any) -> Any:
    if p is None:  # the common case, without the (slow) isinstance check against Tensor
        return None
    if isinstance(p, Tensor):
        return ("tensor", id(p))
    return p


def _position_tuple(positions: PositionSpec) -> Any:
    if positions is None or isinstance(positions, (str, Tensor)):
        return positions
    if isinstance(positions, int):
        return (positions,)
    out = tuple(int(p) for p in positions)
    if not out:
        raise ApexlensError("an empty position list restricts a node to nothing")
    return out


# ---------------------------------------------------------------------- parsing
def parse_node(spec: str | Node) -> Node:
    """Parse one node spelling (see the module docstring). Raises on anything unknown."""
    if isinstance(spec, Node):
        return spec
    if isinstance(spec, str):
        return _parse_text(spec)
    return _parse_node(spec)


@functools.lru_cache(maxsize=1 << 16)
def _parse_text(spec: str) -> Node:
    """Spellings are parsed once (circuits name tens of thousands of edges)."""
    return _parse_node(spec)


def _parse_node(spec: Any) -> Node:
    if not isinstance(spec, str):
        raise ApexlensError(f"a node is a string like '9.9.q' or a Node, got {spec!r}")
    text = spec.strip()
    pos: Any = None
    if "@" in text:
        text, _, ptext = text.partition("@")
        ptext = ptext.strip()
        if re.fullmatch(r"-?\d+(?:\s*,\s*-?\d+)*", ptext):
            pos = tuple(int(p) for p in ptext.split(","))
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ptext):
            pos = ptext
        else:
            raise ApexlensError(
                f"bad positions {ptext!r} in node {spec!r}: use integers ('@-1', '@3,4') or a name"
            )
    text = text.strip()
    if text in ("embed", "emb", "embedding"):
        return Node("embed", positions=pos)
    if text in ("tok_embed", "pos_embed"):
        return Node(text, positions=pos)  # type: ignore[arg-type]
    if text in ("logits", "unembed", "resid_final"):
        return Node("logits", positions=pos)
    m = _KV.match(text)
    if m:
        ch = m.group(3)
        if ch == "q":
            raise ApexlensError(
                f"{spec!r}: a KV head has no query input; spell the query head "
                f"'{m.group(1)}.H.q'"
            )
        return Node("kv", int(m.group(1)), int(m.group(2)), ch, pos)  # type: ignore[arg-type]
    m = _HEAD.match(text)
    if m:
        ch = m.group(3)
        return Node("head", int(m.group(1)), int(m.group(2)), ch, pos)  # type: ignore[arg-type]
    m = _MLP.match(text)
    if m:
        return Node("mlp", int(m.group(1)), positions=pos)
    m = _RESID.match(text)
    if m:
        return Node("resid", int(m.group(1)), positions=pos)
    raise ApexlensError(f"unknown node {spec!r}: {_SYNTAX}")


NodeSpec = str | Node | Iterable[str | Node]


def parse_nodes(spec: NodeSpec, dims: Dims) -> list[Node]:
    """Parse a node, a list of nodes, or a set name (``"all-heads"``, ``"heads:3"``,
    ``"all-mlps"``), and check each against the model's shape."""
    if isinstance(spec, (str, Node)):
        items: list[str | Node] = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, Tensor)):
        items = list(spec)
    else:
        raise ApexlensError(
            f"nodes are given as a string ('9.9', 'all-heads'), a Node, or a list of them; got "
            f"{spec!r}"
        )
    out: list[Node] = []
    for item in items:
        if isinstance(item, str) and _set_name(item) is not None:
            out.extend(_expand_set(item, dims))
        else:
            out.append(validate(parse_node(item), dims))
    return out


def _set_name(text: str) -> str | None:
    base = text.strip().partition("@")[0].strip()
    if base in ("all-heads", "heads", "all_heads") or base.startswith("heads:"):
        return base
    if base in ("all-mlps", "mlps", "all_mlps"):
        return base
    return None


def _expand_set(text: str, dims: Dims) -> list[Node]:
    base, _, ptext = text.strip().partition("@")
    base = base.strip()
    if base.startswith("heads:"):
        body = base[len("heads:") :]
        try:
            layer = int(body)
        except ValueError:
            raise ApexlensError(f"bad head set {text!r}: use 'heads:L' with an integer L") from None
        nodes = heads_of_layer(dims, layer)
    elif base in ("all-mlps", "mlps", "all_mlps"):
        nodes = all_mlps(dims)
    else:
        nodes = all_heads(dims)
    if ptext:
        pos = parse_node(f"embed@{ptext}").positions
        nodes = [replace(n, positions=pos) for n in nodes]
    return nodes


def validate(node: Node, dims: Dims) -> Node:
    """Check that ``node`` exists in a model of shape ``dims``."""
    if node.kind in ("head", "mlp"):
        if not 0 <= node.layer < dims.n_layers:
            raise ApexlensError(
                f"layer {node.layer} of node {node} is out of range: the model has "
                f"{dims.n_layers} layers (0..{dims.n_layers - 1})"
            )
    if node.kind == "kv":
        assert node.head is not None
        if not 0 <= node.layer < dims.n_layers:
            raise ApexlensError(
                f"layer {node.layer} of node {node} is out of range: the model has "
                f"{dims.n_layers} layers (0..{dims.n_layers - 1})"
            )
        if not 0 <= node.head < dims.kv_heads:
            raise ApexlensError(
                f"KV head {node} is out of range: the model has {dims.kv_heads} key/value heads "
                f"per layer (0..{dims.kv_heads - 1})"
            )
    if node.kind == "head":
        assert node.head is not None
        if not 0 <= node.head < dims.n_heads:
            raise ApexlensError(
                f"head {node} is out of range: the model has {dims.n_heads} heads per layer "
                f"(0..{dims.n_heads - 1})"
            )
    if node.kind == "resid" and not 0 <= node.layer <= dims.n_layers:
        raise ApexlensError(
            f"residual node {node} is out of range: 0..{dims.n_layers} for this model "
            f"(r{dims.n_layers} is the final residual stream)"
        )
    if node.kind == "mlp" and not dims.has_mlps:
        raise ApexlensError(f"node {node} names an MLP, but the model is attention-only")
    return node


def dims_of(model_or_dims: Any) -> Dims:
    if isinstance(model_or_dims, Dims):
        return model_or_dims
    return backend_for(model_or_dims).dims


def all_heads(model: Any) -> list[Node]:
    """Every attention head, layer by layer: ``0.0, 0.1, ..., L.H``."""
    d = dims_of(model)
    return [Node("head", layer, head) for layer in range(d.n_layers) for head in range(d.n_heads)]


def heads_of_layer(model: Any, layer: int) -> list[Node]:
    """The heads of one layer."""
    d = dims_of(model)
    if not 0 <= layer < d.n_layers:
        raise ApexlensError(f"layer {layer} is out of range: the model has {d.n_layers} layers")
    return [Node("head", layer, head) for head in range(d.n_heads)]


def all_mlps(model: Any) -> list[Node]:
    """Every MLP (none for attention-only models)."""
    d = dims_of(model)
    return [Node("mlp", layer) for layer in range(d.n_layers)] if d.has_mlps else []


# ---------------------------------------------------------------------- roles
def as_senders(nodes: Sequence[Node], split_embed: bool = False) -> list[Node]:
    """Check nodes can send: embed, heads (no channel) or MLPs (with ``split_embed``, also
    ``tok_embed`` / ``pos_embed``: only circuits and discovery know them)."""
    out = []
    for n in nodes:
        if n.kind in ("tok_embed", "pos_embed") and not split_embed:
            raise ApexlensError(
                f"{n} is a circuit-discovery sender (tok_embed / pos_embed split 'embed' in two); "
                "path and activation patching use 'embed'"
            )
        if n.kind == "logits":
            raise ApexlensError(
                "'logits' cannot be a sender: it reads the residual stream, it writes nothing"
            )
        if n.kind == "resid":
            raise ApexlensError(
                f"{n} is a residual stream, the sum of many senders; path-patch its parts "
                "(embed, heads, MLPs) or use act_patch"
            )
        if n.kind == "kv":
            raise ApexlensError(
                f"{n} is a key/value head, a receiver only; a sender is a query head's output "
                f"'{n.layer}.H'"
            )
        if n.kind == "head" and n.channel is not None:
            raise ApexlensError(
                f"sender {n} names a head's {n.channel} input; a sender is the head's output: use "
                f"'{n.layer}.{n.head}'"
            )
        out.append(n)
    if not out:
        raise ApexlensError("the sender set is empty")
    return unique(out, "sender")


def unique(nodes: Sequence[Node], role: str) -> list[Node]:
    """``nodes`` unchanged, after checking that none is given twice (each gets one row)."""
    seen: set[Node] = set()
    for n in nodes:
        if n in seen:
            raise ApexlensError(f"{role} {n} is given twice; each {role} gets one row")
        seen.add(n)
    return list(nodes)


def as_receivers(nodes: Sequence[Node]) -> list[Node]:
    """Check nodes can receive; a head without a channel becomes its q, k and v inputs."""
    out: list[Node] = []
    for n in nodes:
        if n.kind in EMBEDS:
            raise ApexlensError(
                f"'{n.kind}' cannot be a receiver: it reads tokens, not the residual stream"
            )
        if n.kind == "resid":
            raise ApexlensError(
                f"{n} is a residual stream, not a reader of one; receivers are q/k/v inputs, "
                "MLPs or logits"
            )
        if n.kind == "head" and n.channel is None:
            out.extend(replace(n, channel=c) for c in ("q", "k", "v"))  # type: ignore[misc]
        elif n.kind == "kv" and n.channel is None:
            out.extend(replace(n, channel=c) for c in ("k", "v"))  # type: ignore[misc]
        else:
            out.append(n)
    if not out:
        raise ApexlensError("the receiver set is empty")
    seen = set()
    for n in out:
        if (n.kind, n.layer, n.head, n.channel) in seen:
            raise ApexlensError(f"receiver {n.name} is given twice")
        seen.add((n.kind, n.layer, n.head, n.channel))
    return out
