"""The edge graph: every sender -> receiver edge of a model, numbered once.

A circuit hypothesis, an edge score, a discovery step all speak of *edges* ``sender ->
receiver`` of the model's computational graph. :class:`EdgeIndex` numbers a model's senders
(``embed`` -- or ``tok_embed`` and ``pos_embed`` -- then per layer its heads and its MLP) and
receivers (per layer every head's q, k and v input, then its MLP; last the logits) and holds
which pairs are edges (:attr:`EdgeIndex.valid`: the sender writes before the receiver reads;
with parallel attention and MLP, MLP L does not read the heads of layer L). Everything else
is read from it: :func:`full_graph` lists its edges, :func:`has_edge` asks about one, and an
edge list given by a user is turned into a boolean matrix once, at the boundary
(:meth:`EdgeIndex.keep`), with every spelling parsed and checked there.
"""

from __future__ import annotations

import array
import functools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import Backend, Dims
from apexlens.vocab.nodes import Node, as_receivers, dims_of, parse_node, validate
from apexlens.vocab.positions import edge_positions
from apexlens.vocab.specs import EdgeSpec

_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _long_pairs(rows: list[int], cols: list[int]) -> Tensor:
    """``[2, n]`` long tensor of two int lists, through a C array (``torch.tensor`` of
    nested lists reads each element as a Python object: ~1 us per edge)."""
    if not rows:
        return torch.zeros(2, 0, dtype=torch.long)
    flat = array.array("q", rows)
    flat.extend(array.array("q", cols))
    return torch.frombuffer(flat, dtype=torch.long).clone().reshape(2, -1)


class EdgeList:
    """An edge list read once for everything that reads it (the split-embedding check, the
    index, the names): its pairs, their sender and receiver objects, and each distinct node
    object by identity, from C-level passes that allocate nothing per edge (a circuit names
    tens of thousands of edges over a few hundred node objects). ``plain`` is false where a
    pair is not a 2-sequence: the general, error-reporting loops handle those."""

    def __init__(self, edges: Iterable[Any]) -> None:
        self.pairs = list(edges)
        self.plain = bool(self.pairs)
        try:
            self.plain = self.plain and set(map(len, self.pairs)) == {2}
            if self.plain:
                self.senders = list(map(_first, self.pairs))
                self.receivers = list(map(_second, self.pairs))
                self.s_ids = list(map(id, self.senders))
                self.r_ids = list(map(id, self.receivers))
                # the dicts hold the objects (so each id stays its own while they live)
                self.s_obj = dict(zip(self.s_ids, self.senders, strict=True))
                self.r_obj = dict(zip(self.r_ids, self.receivers, strict=True))
        except (TypeError, KeyError, IndexError):
            self.plain = False

    @staticmethod
    def of(edges: Any) -> EdgeList:
        return edges if isinstance(edges, EdgeList) else EdgeList(edges)

    def __iter__(self) -> Any:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


class EdgeIndex:
    """Numbering of a model's senders and receivers, and edge sets as boolean matrices.

    With ``split_embed`` the first senders are ``tok_embed`` and ``pos_embed`` (the token and
    the positional embedding, ``hook_embed`` / ``hook_pos_embed``) instead of ``embed``.
    Receivers are numbered layer by layer, head by head (``L.H.q``, ``L.H.k``, ``L.H.v``),
    then the layer's MLP: :attr:`head_receiver` gives a layer's q (k, v) inputs as a strided
    slice of the columns.
    """

    def __init__(self, model: Backend | Dims, split_embed: bool = False):
        d = model if isinstance(model, Dims) else model.dims
        if split_embed and not (isinstance(model, Backend) and model.split_embed_hooks()):
            raise ApexlensError(
                "tok_embed / pos_embed edges need a model whose residual stream starts as token "
                "embedding + learned positional embedding (positional_embedding_type='standard'); "
                "this model has no such split: use 'embed'"
            )
        self.dims = d
        self.split_embed = split_embed
        self.senders: list[Node] = (
            [Node("tok_embed"), Node("pos_embed")] if split_embed else [Node("embed")]
        )
        self.receivers: list[Node] = []
        self.head_sender: dict[int, slice] = {}
        self.mlp_sender: dict[int, int] = {}
        self.head_receiver: dict[tuple[int, str], slice] = {}
        self.mlp_receiver: dict[int, int] = {}
        for layer in range(d.n_layers):
            start = len(self.receivers)
            self.receivers += [
                Node("head", layer, h, ch)  # type: ignore[arg-type]
                for h in range(d.n_heads)
                for ch in "qkv"
            ]
            for i, ch in enumerate("qkv"):
                self.head_receiver[(layer, ch)] = slice(start + i, len(self.receivers), 3)
            if d.has_mlps:
                self.mlp_receiver[layer] = len(self.receivers)
                self.receivers.append(Node("mlp", layer))
            start = len(self.senders)
            self.senders += [Node("head", layer, h) for h in range(d.n_heads)]
            self.head_sender[layer] = slice(start, len(self.senders))
            if d.has_mlps:
                self.mlp_sender[layer] = len(self.senders)
                self.senders.append(Node("mlp", layer))
        self.logits = len(self.receivers)
        self.receivers.append(Node("logits"))
        self._s = {self._key(n): i for i, n in enumerate(self.senders)}
        self._r = {self._key(n): i for i, n in enumerate(self.receivers)}
        self.valid: Bool[Tensor, "sender receiver"] = valid_edges(d, self.senders, self.receivers)
        self._plain_s: dict[Any, int] = {}  # sender / receiver spelling -> row / column
        self._plain_r: dict[Any, int] = {}

    def _query_heads(self, nodes: list[Node]) -> list[Node]:
        """A KV head's k/v input, as the same input of every query head of its group."""
        out: list[Node] = []
        g = self.dims.group
        for n in nodes:
            if n.kind == "kv":
                j = int(n.head or 0)
                out += [replace(n, kind="head", head=h) for h in range(j * g, (j + 1) * g)]
            else:
                out.append(n)
        return out

    @staticmethod
    def _key(n: Node) -> tuple:
        return (n.kind, n.layer, n.head, n.channel)

    def mask(self, edges: EdgeSpec) -> Bool[Tensor, "sender receiver"]:
        """The circuit's edges as a ``[n_senders, n_receivers]`` matrix (no positions)."""
        keep = self.keep(edges)
        assert keep.ndim == 2
        return keep

    def keep(
        self,
        edges: EdgeSpec | EdgeList,
        n_pos: int | None = None,
        named: Mapping[str, Any] | None = None,
    ) -> Bool[Tensor, "sender receiver"] | Bool[Tensor, "sender receiver pos"]:
        """The circuit's edges as a ``[n_senders, n_receivers]`` matrix, or, when an edge names
        positions, a ``[n_senders, n_receivers, n_pos]`` one (see :func:`edge_positions`)."""
        keep = torch.zeros_like(self.valid)
        edges = EdgeList.of(edges)
        fast = self._plain(edges)
        if fast is not None:
            ij = _long_pairs(*fast)
            self._check_all(ij)
            keep[ij[0], ij[1]] = True
            return keep
        per_pos: list[tuple[int, int, tuple[int, ...]]] = []
        rows: list[int] = []
        cols: list[int] = []
        # circuits name tens of thousands of edges over a few hundred distinct node objects:
        # each is parsed and checked once (remembered by identity; the memo holds the object,
        # so its id stays its own), the edges' directions checked in one comparison
        s_seen: dict[int, tuple[Any, Node, int]] = {}
        r_seen: dict[int, tuple[Any, list[tuple[Node, int]]]] = {}
        try:
            for pair in edges:
                try:
                    s_spec, r_spec = pair
                except (TypeError, ValueError):
                    raise ApexlensError(
                        f"an edge is a (sender, receiver) pair, got {pair!r}"
                    ) from None
                s_hit = s_seen.get(id(s_spec))
                if s_hit is None:
                    s_hit = s_seen[id(s_spec)] = (s_spec, *self._sender(s_spec, r_spec))
                r_hit = r_seen.get(id(r_spec))
                if r_hit is None:
                    r_hit = r_seen[id(r_spec)] = (r_spec, self._receivers(r_spec))
                _, s, i = s_hit
                for r, j in r_hit[1]:
                    if s.positions is None and r.positions is None:
                        rows.append(i)
                        cols.append(j)
                        continue
                    self._check_direction(s, r, i, j)
                    pos = edge_positions(s, r, n_pos, named)
                    if pos is None:
                        keep[i, j] = True
                    else:
                        per_pos.append((i, j, pos))
        finally:  # an edge going backwards is reported before any error in a later edge
            ij = _long_pairs(rows, cols)
            self._check_all(ij)
        keep[ij[0], ij[1]] = True
        if not per_pos:
            return keep
        assert n_pos is not None
        out = keep[:, :, None].expand(*keep.shape, n_pos).clone()
        for i, j, pos in per_pos:
            out[i, j, list(pos)] = True
        return out

    def _plain(self, edges: EdgeList) -> tuple[list[int], list[int]] | None:
        """Rows and columns of an edge list whose every edge is a well-formed pair of nodes
        at all positions, each receiver one column (no KV head): each distinct node object
        parsed once, the edges mapped in C-level passes. ``None``: anything else (position
        edges, a KV head, an error), for the general loop, which reports errors in order."""
        if not edges.plain:
            return None
        rows_of: dict[int, int] = {}
        cols_of: dict[int, int] = {}
        try:
            for k, spec in edges.s_obj.items():
                i = self._plain_s.get(spec)  # by value: node spellings are immutable
                if i is None:
                    node, i = self._sender(spec, "?")
                    if node.positions is not None:
                        return None
                    self._plain_s[spec] = i
                rows_of[k] = i
            for k, spec in edges.r_obj.items():
                j = self._plain_r.get(spec)
                if j is None:
                    rs = self._receivers(spec)
                    if len(rs) != 1 or rs[0][0].positions is not None:
                        return None
                    j = self._plain_r[spec] = rs[0][1]
                cols_of[k] = j
        except (ApexlensError, TypeError, ValueError):
            return None
        return list(map(rows_of.__getitem__, edges.s_ids)), list(map(cols_of.__getitem__, edges.r_ids))

    def _check_all(self, ij: Tensor) -> None:
        """The first edge of ``ij`` (rows, columns) that goes backwards, as an error."""
        ok = self.valid[ij[0], ij[1]]
        if not bool(ok.all()):
            k = int((~ok).nonzero()[0, 0])
            i, j = int(ij[0, k]), int(ij[1, k])
            self._check_direction(self.senders[i], self.receivers[j], i, j)

    def _sender(self, spec: Any, r_spec: Any) -> tuple[Node, int]:
        s = validate(parse_node(spec), self.dims)
        if s.kind == "logits" or s.kind == "resid" or (s.kind == "head" and s.channel is not None):
            raise ApexlensError(f"edge {s} -> {r_spec}: {s} cannot send")
        return s, self.sender_id(s)

    def _receivers(self, spec: Any) -> list[tuple[Node, int]]:
        nodes = self._query_heads(as_receivers([validate(parse_node(spec), self.dims)]))
        return [(r, self.receiver_id(r)) for r in nodes]

    def _check_direction(self, s: Node, r: Node, i: int, j: int) -> None:
        if not self.valid[i, j]:
            same = " (parallel attention and MLP: MLP L reads before the heads of layer L write)"
            raise ApexlensError(
                f"edge {s} -> {r} goes backwards: receiver {r} comes before (or in the same "
                f"layer as) sender {s}" + (same if self.dims.parallel and r.kind == "mlp" else "")
            )

    def sender_id(self, s: Node) -> int:
        """The row of sender ``s`` (positions ignored)."""
        key = self._key(s)
        if key not in self._s:
            split = s.kind in ("tok_embed", "pos_embed")
            if s.kind == "embed" or split:
                raise ApexlensError(
                    f"sender {s.name}: this edge graph "
                    + (
                        "splits 'embed' into 'tok_embed' and 'pos_embed'"
                        if self.split_embed
                        else "has one 'embed' sender; use split_embed=True for tok_embed/pos_embed"
                    )
                )
            raise ApexlensError(f"{s} is not a sender of this model's edge graph")
        return self._s[key]

    def receiver_id(self, r: Node) -> int:
        """The column of receiver ``r`` (positions ignored)."""
        return self._r[self._key(r)]

    def rows(
        self,
        edges: EdgeSpec | None,
        n_pos: int,
        named: Mapping[str, Any] | None = None,
        per_position: bool = False,
    ) -> tuple[Tensor, list[tuple[str, str]]]:
        """Edges as rows ``(sender, receiver, position or -1)`` in the order given (``None``:
        every edge of the graph, sender-major), each once, with their names
        (``("0.1", "1.3.k")``, per position ``("0.1@3", "1.3.k@3")``). ``per_position``: every
        edge at every position. A receiver head without a channel means its q, k and v."""
        if edges is None:
            pairs = self.valid.nonzero()
            if per_position:
                pos = torch.arange(n_pos).repeat(len(pairs))
                table = torch.cat([pairs.repeat_interleave(n_pos, 0), pos[:, None]], 1)
            else:
                table = torch.cat([pairs, torch.full((len(pairs), 1), -1)], 1)
        else:
            found: dict[tuple[int, int, int], None] = {}
            for pair in edges:
                try:
                    s_spec, r_spec = pair
                except (TypeError, ValueError):
                    raise ApexlensError(f"an edge is a (sender, receiver) pair, got {pair!r}") from None
                s, i = self._sender(s_spec, r_spec)
                for r, j in self._receivers(r_spec):
                    self._check_direction(s, r, i, j)
                    at = edge_positions(s, r, n_pos, named)
                    for p in (range(n_pos) if per_position else [-1]) if at is None else at:
                        found[(i, j, p)] = None
            if not found:
                raise ApexlensError("edges is empty: give at least one edge")
            table = torch.tensor(list(found), dtype=torch.long)
        names = []
        for i, j, p in table.tolist():
            s, r = self.senders[i].name, self.receivers[j].name
            names.append((s, r) if p < 0 else (f"{s}@{p}", f"{r}@{p}"))
        return table, names

    def edge_list(self) -> list[tuple[Node, Node]]:
        """Every edge of the graph, sender-major (the order of ``valid.nonzero()``)."""
        return [(self.senders[i], self.receivers[j]) for i, j in self.valid.nonzero().tolist()]


def valid_edges(d: Dims, senders: list[Node], receivers: list[Node]) -> Bool[Tensor, "s r"]:
    """Which (sender, receiver) pairs are edges, as one comparison of their orders (and the
    parallel-block exception: no edge from layer-L heads to MLP L). The one definition of
    the graph: :func:`has_edge`, :func:`full_graph` and :class:`EdgeIndex` all read it."""
    n = d.n_layers
    so = torch.tensor([s.order(n) for s in senders])
    ro = torch.tensor([r.order(n) for r in receivers])
    valid = so[:, None] < ro[None, :]
    if d.parallel:
        s_head = torch.tensor([s.layer if s.kind == "head" else -1 for s in senders])
        r_mlp = torch.tensor([r.layer if r.kind == "mlp" else -2 for r in receivers])
        valid &= s_head[:, None] != r_mlp[None, :]
    return valid


def uses_split_embed(edges: Iterable[tuple[Any, Any]] | EdgeList) -> bool:
    """Whether an edge list names ``tok_embed`` / ``pos_embed`` (the split embedding); each
    distinct sender object is parsed once."""
    el = EdgeList.of(edges)
    if el.plain:
        firsts = list(el.s_obj.values())
    else:  # a malformed edge: the index reports it
        firsts = []
        for pair in el.pairs:
            try:
                firsts.append(pair[0])
            except (TypeError, IndexError, KeyError):
                continue
    for spec in firsts:
        try:
            if parse_node(spec).kind in ("tok_embed", "pos_embed"):
                return True
        except ApexlensError:
            continue
    return False




@functools.lru_cache(maxsize=1 << 16)
def _spelling(spec: Any) -> str:
    return str(parse_node(spec))


def edge_names(edge_list: Iterable[tuple[Any, Any]] | EdgeList) -> list[tuple[str, str]]:
    """Each edge as ``(sender, receiver)`` spellings; each distinct node object is spelled
    once (by identity), the edges mapped in C-level passes."""
    el = EdgeList.of(edge_list)
    if not el.plain:
        return [(str(parse_node(s)), str(parse_node(r))) for s, r in el.pairs]
    name = {k: _spelling(v) for k, v in (el.s_obj | el.r_obj).items()}
    return list(zip(map(name.__getitem__, el.s_ids), map(name.__getitem__, el.r_ids), strict=True))




def full_graph(model: Any) -> list[tuple[Node, Node]]:
    """Every edge of the model's computational graph: every sender to every later receiver,
    sender-major (the order of :meth:`EdgeIndex.edge_list`)."""
    return EdgeIndex(dims_of(model)).edge_list()


def has_edge(d: Dims, s: Node, r: Node) -> bool:
    """Whether sender ``s`` writes to the residual stream before receiver ``r`` reads it
    (with parallel attention and MLP, MLP L does not read the heads of layer L)."""
    return bool(valid_edges(d, [s.as_sender], [r])[0, 0])
