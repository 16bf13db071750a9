"""Circuit hypotheses: keep some edges, ablate every other one, see what survives.

A hypothesis is a set of *edges* ``sender -> receiver`` of the model's computational graph
(:func:`apexlens.graph.full_graph`). Evaluating it (ACDC / auto-circuit semantics) runs the
clean input once, where every receiver reads

    input_r = sum over senders s of  ( out_s        if (s -> r) is in the circuit
                                       ablated_s    otherwise )

``out_s`` is the sender's output *in this same run* (so effects compose through the
circuit), ``ablated_s`` is its output on the corrupted run (``"resample"``), its mean over a
reference set (``"mean"``), or zero (``"zero"``). In practice the run keeps a buffer of
``D_s = out_s - ablated_s`` for every sender computed so far and hands each receiver
``resid - sum_{s excluded} D_s``: heads through their recomputed q/k/v, MLPs through a
recomputed output, the logits through the final residual stream.

The report has the metric with the hypothesis, its *recovery*
``(circuit - ablated) / (clean - ablated)`` and the path-patching paper's *proportion
explained* ``1 - AUE/ATE`` (Goldowsky-Dill et al. 2023), where AUE is the mean KL divergence
from the clean outputs to the hypothesis' outputs, ATE the same to the fully ablated
outputs (it can go below 0).

The same hooks (:func:`circuit_hooks`) power ``apexlens.patched(model, Circuit(edges), ...)``:
any forward pass of the model inside the block runs under the hypothesis.
"""

from __future__ import annotations

import array
import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from apexlens import edits
from apexlens.backend import Backend
from apexlens.errors import ApexlensError
from apexlens.graph import Node, as_receivers, parse_node, validate
from apexlens.hooks import HookFn
from apexlens.results import CircuitResult
from apexlens.runs import Readout, Run, Runs, grouped_kv_hooks, run_tokens, split_embed_names
from apexlens.scoring import Scores
from apexlens.specs import Ablation, EdgeSpec

# ============================================================================ edge index
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
    """

    def __init__(self, bk: Backend, split_embed: bool = False):
        d = bk.dims
        if split_embed and not split_embed_names(bk):
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
            for ch in "qkv":
                start = len(self.receivers)
                self.receivers += [Node("head", layer, h, ch) for h in range(d.n_heads)]  # type: ignore[arg-type]
                self.head_receiver[(layer, ch)] = slice(start, len(self.receivers))
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
        self.valid: Bool[Tensor, "sender receiver"] = _valid_edges(d, self.senders, self.receivers)
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

    def edge_list(self) -> list[tuple[Node, Node]]:
        """Every edge of the graph, sender-major (the order of ``valid.nonzero()``)."""
        return [(self.senders[i], self.receivers[j]) for i, j in self.valid.nonzero().tolist()]


def _valid_edges(d: Any, senders: list[Node], receivers: list[Node]) -> Bool[Tensor, "s r"]:
    """``graph.has_edge`` for every (sender, receiver) pair, as one comparison of their
    orders (and the parallel-block exception: no edge from layer-L heads to MLP L)."""
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


def edge_positions(
    s: Node, r: Node, n_pos: int | None, named: Mapping[str, Any] | None = None
) -> tuple[int, ...] | None:
    """The positions a (possibly position-aware) edge ``s -> r`` acts at; ``None``: all.

    **Semantics.** A sender writes its output at position ``p`` into the residual stream at
    ``p``; a receiver (a head's q/k/v input, an MLP, the logits) reads the residual stream at
    its own position ``q``. So a direct edge connects ``s@p`` to ``r@q`` only when ``p == q``:
    the edge ``"0.1@3" -> "1.3.k@3"`` carries what head 0.1 wrote at position 3 into the key
    of head 1.3 at position 3. Moving information between positions is what attention does
    *inside* a head (its k/v at ``p`` -> its output at ``q >= p``), which is not an edge.
    Positions given on one side apply to both; given on both sides they must be the same
    set. Negative positions count from the end; a name must resolve to the same positions
    for every example.
    """
    ps, pr = s.positions, r.positions
    if ps is None and pr is None:
        return None
    if n_pos is None:
        raise ApexlensError(
            f"edge {s} -> {r} names positions; evaluate it on tokens (evaluate_circuit / an "
            "Experiment), where the sequence length is known"
        )
    sides = [_abs_positions(p, n_pos, named, f"edge {s} -> {r}") for p in (ps, pr) if p is not None]
    if len(sides) == 2 and sides[0] != sides[1]:
        raise ApexlensError(
            f"edge {s} -> {r} joins different positions: a sender's output at position p reaches a "
            "receiver's input only at the same position p (the residual stream is per position; "
            "moving between positions happens inside an attention head, not along an edge). "
            f"Write the edge at one position, e.g. {s.name}@{sides[1][0]} -> {r.name}@{sides[1][0]}"
        )
    return sides[0]


def _abs_positions(
    p: Any, n_pos: int, named: Mapping[str, Any] | None, what: str
) -> tuple[int, ...]:
    if isinstance(p, str):
        if named is None or p not in named:
            known = ", ".join(sorted(named)) if named else "none were given"
            raise ApexlensError(f"{what}: unknown position name {p!r} ({known})")
        p = named[p]
    per_example = isinstance(p, Tensor) and p.ndim >= 1
    t = torch.as_tensor(p).long().cpu()
    if per_example:  # [batch] or [batch, k]: one row per example, all rows the same
        rows = t.reshape(t.shape[0], -1)
        if not bool((rows == rows[:1]).all()):
            raise ApexlensError(
                f"{what}: position-aware edges need the same positions for every example; "
                "the named positions differ between examples"
            )
        t = rows[0]
    vals = t.flatten().tolist()
    if any(not -n_pos <= x < n_pos for x in vals):
        raise ApexlensError(
            f"{what}: positions {vals} out of range for sequences of length {n_pos}"
        )
    return tuple(sorted({x % n_pos for x in vals}))


# ============================================================================ ablation values
@dataclass
class AblationValues:
    """What each sender outputs when an edge from it is ablated."""

    embed: Float[Tensor, "batch pos d_model"]
    z: list[Float[Tensor, "batch pos head d_head"]]
    mlp_out: list[Float[Tensor, "batch pos d_model"]]
    tok: Float[Tensor, "batch pos d_model"] | None = None
    """``hook_embed`` / ``hook_pos_embed`` values, for edge graphs that split ``embed``."""
    pos: Float[Tensor, "batch pos d_model"] | None = None

    def _map(self, f: Callable[[Tensor], Tensor]) -> AblationValues:
        """``f`` on every per-example value (values shared by every example, a leading
        axis of 1, and missing ones stay as they are)."""
        g = lambda x: x if x is None or x.shape[0] == 1 else f(x)  # noqa: E731
        return AblationValues(
            g(self.embed), [g(z) for z in self.z], [g(m) for m in self.mlp_out], g(self.tok),
            g(self.pos),
        )

    def tiled(self, rows: int) -> AblationValues:
        """The same values for ``rows`` copies of the batch stacked along the batch axis."""
        return self._map(lambda x: x.repeat(rows, *([1] * (x.ndim - 1))))

    def rows(self, sl: slice) -> AblationValues:
        """The values for examples ``sl`` (values shared by every example stay as they are)."""
        return self._map(lambda x: x[sl])


def ablation_values(
    bk: Backend, ablation: Ablation, corrupted: Run | None, reference: Run | None
) -> AblationValues:
    """The ablated sender outputs, with ``tok`` / ``pos`` where the runs recorded the split
    embedding (``hook_embed`` / ``hook_pos_embed``)."""
    out = _ablation_values(bk, ablation, corrupted, reference)
    ref = corrupted if ablation == "resample" else reference if reference is not None else corrupted
    if ref is not None and "hook_embed" in ref.acts and "hook_pos_embed" in ref.acts:
        tok = ref["hook_embed"]
        pos = ref["hook_pos_embed"].expand_as(tok)
        if ablation == "mean":
            tok, pos = tok.mean(0, keepdim=True), pos.mean(0, keepdim=True)
        elif ablation == "zero":
            tok, pos = torch.zeros_like(tok[:1]), torch.zeros_like(pos[:1])
        out.tok, out.pos = tok, pos
    return out


def _ablation_values(
    bk: Backend, ablation: Ablation, corrupted: Run | None, reference: Run | None
) -> AblationValues:
    n = bk.dims.n_layers
    if ablation == "resample":
        if corrupted is None:
            raise ApexlensError("resample ablation needs corrupted tokens")
        run = corrupted
        return AblationValues(
            run[bk.resid_pre(0)],
            [run[bk.z(la)] for la in range(n)],
            [run[bk.mlp_out(la)] for la in range(n)] if bk.dims.has_mlps else [],
        )
    if ablation == "mean":
        ref = reference if reference is not None else corrupted
        if ref is None:
            raise ApexlensError("mean ablation needs reference tokens")
        m = lambda t: t.mean(0, keepdim=True)
        return AblationValues(
            m(ref[bk.resid_pre(0)]),
            [m(ref[bk.z(la)]) for la in range(n)],
            [m(ref[bk.mlp_out(la)]) for la in range(n)] if bk.dims.has_mlps else [],
        )
    if ablation == "zero":
        ref = corrupted if corrupted is not None else reference
        assert ref is not None
        z = lambda t: torch.zeros_like(t[:1])
        return AblationValues(
            z(ref[bk.resid_pre(0)]),
            [z(ref[bk.z(la)]) for la in range(n)],
            [z(ref[bk.mlp_out(la)]) for la in range(n)] if bk.dims.has_mlps else [],
        )
    raise ApexlensError(f"ablation must be 'resample', 'mean' or 'zero', got {ablation!r}")


# ============================================================================ the hooks
class SenderBuffer:
    """``D[s] = out_s - ablated_s`` for every sender computed so far in one forward pass, and
    their running total, so that a receiver's input ``resid - sum_{s excluded} D[s]`` costs
    one matrix product over the senders that differ from "all excluded" or "all kept".

    The buffer is ``[batch, pos, slot, d_model]``: slot 0 holds the receiver's ``resid`` (set
    at each read), slot 1 the running total, then the senders in forward order. With the
    senders between the tokens and ``d_model``, the sum is a batch of one small
    ``[columns, slots] @ [slots, d_model]`` product per token, whose output is laid out for the
    norm that reads it (``d_model`` last); ``resid`` and the total are two more slots of that
    product, so nothing is copied around it. On the CPU this runs the sum at about 1.6 times
    the FLOP rate of one ``[columns, senders] @ [senders, tokens x d_model]`` product."""

    RESID, TOTAL, FIRST = 0, 1, 2

    def __init__(self, n_senders: int, scratch: dict[str, Any] | None = None) -> None:
        self.n_senders = n_senders
        self.filled = 0
        self.D: Tensor | None = None  # this pass's rows of ``_mem``
        # the memory, from and kept in ``scratch`` (:attr:`Runs.scratch`) where given
        self.scratch = scratch if scratch is not None else {}
        self._mem: Tensor | None = self.scratch.get("sender_buffer")
        self._free: list[Tensor] = self.scratch.setdefault("workspaces", [])  # not in use

    def start(self, first: Float[Tensor, "k batch pos d_model"]) -> None:
        """A new forward pass, beginning with the embedding sender(s). The memory of the
        previous pass is reused when it holds at least as many examples of the same shape
        (the chunks of one evaluation, largest first): fresh memory of a GB costs a CPU more
        in page faults than the products that fill it."""
        _, n, n_pos, dm = first.shape
        shape = (n_pos, self.FIRST + self.n_senders, dm)
        mem = self._mem
        if (
            mem is None
            or mem.shape[0] < n
            or mem.shape[1:] != shape
            or mem.dtype != first.dtype
            or mem.device != first.device
        ):
            self._mem = self.scratch["sender_buffer"] = mem = first.new_empty(n, *shape)
        self.D = D = mem[:n]
        D[:, :, self.TOTAL] = 0
        self.filled = 0
        self.put(slice(0, first.shape[0]), first)

    def put(self, rows: slice, values: Float[Tensor, "s batch pos d_model"]) -> None:
        assert rows.start == self.filled, "senders are recorded in forward order"
        assert self.D is not None, "start() begins a pass"
        self.D[:, :, self.FIRST + rows.start : self.FIRST + rows.stop] = values.permute(1, 2, 0, 3)
        self.D[:, :, self.TOTAL] += values.sum(0)
        self.filled = rows.stop

    def put_heads(
        self, rows: slice, bk: Backend, layer: int, dz: Float[Tensor, "batch pos head d_head"]
    ) -> None:
        """:meth:`put` of the heads of ``layer`` whose ``hook_z`` changed by ``dz``: each
        head's output written by its own product straight into its slot, the total by one
        product over all heads (under autograd, through :meth:`put`)."""
        if torch.is_grad_enabled():
            self.put(rows, bk.head_outputs(layer, dz))
            return
        assert rows.start == self.filled, "senders are recorded in forward order"
        assert self.D is not None, "start() begins a pass"
        D = self.D
        slots = D[:, :, self.FIRST + rows.start : self.FIRST + rows.stop]
        bk.head_outputs_into(layer, dz, slots, D[:, :, self.TOTAL])
        self.filled = rows.stop

    def read(
        self, resid: Float[Tensor, "n pos d_model"], ex: Exclusion, out: Tensor | None = None
    ) -> Float[Tensor, "n pos u d_model"]:
        """``resid - sum_s ex[s, u] * D[s]`` for every column ``u`` of the plan ``ex`` (``s`` =
        all senders recorded so far), the columns next to ``d_model``: a norm applied to it
        reads contiguous vectors, a column is a view with ``d_model`` contiguous. Written
        into ``out`` (a :meth:`workspace`) where given."""
        assert self.D is not None and ex.n_senders == self.filled, "a receiver reads every sender before it"
        self.D[:, :, self.RESID] = resid
        return ex.apply(self.D, self.FIRST + self.filled, out)

    def workspace(self, numel: int, like: Tensor) -> Tensor | None:
        """A flat tensor of at least ``numel`` elements that nothing else uses until it is
        given back (:meth:`release`); ``None`` under autograd (products with ``out=`` are
        not differentiable). A forward pass reads a layer's receiver inputs into one; the
        next layer reuses it: on a CPU, fresh outputs of hundreds of MB cost more in page
        faults than the products that fill them."""
        if torch.is_grad_enabled():
            return None
        for i, t in enumerate(self._free):
            if t.numel() >= numel and t.dtype == like.dtype and t.device == like.device:
                return self._free.pop(i)[:numel]
        return like.new_empty(numel)

    def release(self, work: Tensor | None) -> None:
        """Give back a :meth:`workspace` (one is kept for the next read)."""
        if work is not None:
            self._free[:] = [work._base if work._base is not None else work]


class Exclusion:
    """Which senders each column ``u`` excludes, planned once on the CPU when the hooks are
    built, as weights over the :class:`SenderBuffer` slots (``resid``, total, senders), so
    that a forward pass runs only tensor arithmetic on the model's device (no host-device
    round trips: on a GPU those synchronisations cost more than the products).

    ``ex`` is ``[sender, u]``, or ``[sender, u, rows, p]``: one mask per row of copies of the
    batch stacked along the batch axis, per position (``p = pos``) or for all positions
    (``p = 1``). A 2-d plan sums through the excluded senders (``resid - sum excluded``) or,
    when fewer, through the kept ones (``resid - total + sum kept``), reading just the slots
    it needs when they are few."""

    def __init__(self, ex: Bool[Tensor, "s u"] | Bool[Tensor, "s u rows p"]) -> None:
        ex = ex.cpu()
        self.n_senders, self.n_cols = int(ex.shape[0]), int(ex.shape[1])
        self.per_pos = ex.ndim == 4 and ex.shape[-1] != 1
        self.per_row: list[Exclusion] = []
        self._on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}
        self.idx: Tensor | None = None
        self.terms: list[tuple[int, float]] = []
        if ex.ndim == 4 and not self.per_pos:
            self.per_row = [Exclusion(ex[:, :, r, 0]) for r in range(ex.shape[2])]
            return
        w = torch.zeros(*ex.shape[1:], 2 + self.n_senders, dtype=torch.float64)
        w[..., SenderBuffer.RESID] = 1
        if self.per_pos:  # [rows, pos, u, slot]: one matrix per row and position
            w[..., 2:] = -ex.permute(1, 2, 3, 0).double()
            self.weights = w.permute(1, 2, 0, 3).contiguous()
            return
        kept = ~ex
        rows_ex, rows_kept = ex.any(1), kept.any(1)
        if int(rows_kept.sum()) < int(rows_ex.sum()):
            w[:, SenderBuffer.TOTAL] = -1
            w[:, 2:] = kept.T.double()
        else:
            w[:, 2:] = -ex.T.double()
        used = w.ne(0).any(0)
        if 4 * int(used.sum()) < w.shape[1]:  # few slots: read just those
            self.idx = used.nonzero().flatten()
            w = w[:, self.idx]
            if self.n_cols == 1:  # (slot, weight) pairs, weights 1 or -1
                self.terms = list(zip(self.idx.tolist(), w[0].tolist(), strict=True))
        self.weights = w.contiguous()  # [u, slot]

    def _device(self, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weights (and slot indices) on ``like``'s device and dtype, copied once."""
        key = (like.device, like.dtype)
        hit = self._on.get(key)
        if hit is None:
            w = self.weights.to(device=like.device, dtype=like.dtype)
            idx = None if self.idx is None else self.idx.to(like.device)
            hit = self._on[key] = (w, idx)
        return hit

    def apply(
        self, D: Float[Tensor, "n pos slot d_model"], n_slots: int, out: Tensor | None = None
    ) -> Float[Tensor, "n pos u d_model"]:
        """The weighted sum of the first ``n_slots`` slots of the buffer ``D`` (contiguous:
        slots are selected from it, not from a view of it, which costs ten times more) for
        every column, into the flat ``out`` where given."""
        n, n_pos, S, dm = D.shape
        if out is not None:
            out = out.view(n, n_pos, self.n_cols, dm)
        if self.per_row:
            rows = len(self.per_row)
            Dr = D.view(rows, -1, S, dm)
            if out is None:
                out = D.new_empty(n, n_pos, self.n_cols, dm)
            out_r = out.view(rows, -1, self.n_cols, dm)
            for r, plan in enumerate(self.per_row):
                plan._tokens(Dr[r], n_slots, out=out_r[r])
            return out
        if self.per_pos:
            w = self._device(D)[0]  # [rows, pos, u, slot]
            rows = w.shape[0]
            Dp = D[:, :, :n_slots].reshape(rows, n // rows, n_pos, n_slots, dm)
            res = torch.matmul(w[:, None], Dp).reshape(n, n_pos, self.n_cols, dm)
            return res if out is None else out.copy_(res)
        flat = None if out is None else out.view(-1, self.n_cols, dm)
        return self._tokens(D.view(-1, S, dm), n_slots, flat).view(n, n_pos, self.n_cols, dm)

    def _tokens(
        self, D: Float[Tensor, "t slot d_model"], n_slots: int, out: Tensor | None = None
    ) -> Float[Tensor, "t u d_model"]:
        """One ``[u, slot] @ [slot, d_model]`` product per token; one column over a few
        slots is a sum of scaled slots (no copy of them)."""
        w, idx = self._device(D)
        if idx is None:
            return torch.bmm(w.expand(D.shape[0], *w.shape), D[:, :n_slots], out=out)
        if self.terms:
            res = None if out is None else out[:, 0]
            (s0, w0), *rest = self.terms
            res = torch.mul(D[:, s0], w0, out=res)
            for slot, weight in rest:
                res.add_(D[:, slot], alpha=weight)
            return res[:, None]
        return torch.bmm(w.expand(D.shape[0], *w.shape), D.index_select(1, idx), out=out)


def circuit_hooks(
    bk: Backend,
    index: EdgeIndex,
    keep: Bool[Tensor, "sender receiver"]
    | Bool[Tensor, "sender receiver pos"]
    | Bool[Tensor, "sender receiver rows pos"],
    abl: AblationValues,
    scratch: dict[str, Any] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks that make any forward pass of the model run under the circuit ``keep``.

    The run keeps ``D[s] = out_s - ablated_s`` for every sender computed so far
    (:class:`SenderBuffer`); each receiver reads ``resid - sum over excluded senders D[s]``.
    Heads whose receivers exclude the same senders share one normalisation.

    ``keep`` is ``[sender, receiver]`` (edges at every position), ``[sender, receiver, pos]``
    (position-aware edges) or ``[sender, receiver, rows, pos or 1]``: one circuit per row,
    the forward pass then runs ``rows`` copies of the batch stacked along the batch axis
    (``abl`` tiled to match, :meth:`AblationValues.tiled`). ``scratch``: where the
    buffer's memory comes from and stays for the next call (:func:`scratch_of`).
    """
    d = bk.dims
    if bk.post_norms:
        raise ApexlensError(
            "circuit evaluation on models with norms after attention and the MLP "
            "(use_normalization_before_and_after, Gemma-2) is not supported: head outputs "
            "are not additive there, so an edge from one head is not defined"
        )
    valid = index.valid  # masks stay on the CPU: planning them there costs no device syncs
    keep = keep.cpu()
    if keep.ndim == 3:
        keep = keep[:, :, None, :]
    if keep.ndim == 4:
        valid = valid[:, :, None, None]
    excluded = valid & ~keep
    buf = SenderBuffer(len(index.senders), scratch)
    state: dict[str, Tensor] = {}

    def embed_hook(act: Tensor, hook: Any) -> None:
        if index.split_embed:
            assert abl.tok is not None and abl.pos is not None, "split embed needs tok/pos values"
            tok = state["tok"] - abl.tok.to(act)
            pos = state["pos"].expand_as(act) - abl.pos.to(act)
            buf.start(torch.stack([tok, pos]))
        else:
            buf.start((act - abl.embed.to(act))[None])
        state[bk.resid_pre(0)] = act

    hooks: list[tuple[str, HookFn]] = [(bk.resid_pre(0), embed_hook)]
    if index.split_embed:
        hooks[:0] = [
            ("hook_embed", edits.save(state, "tok", clone=False)),
            ("hook_pos_embed", edits.save(state, "pos", clone=False)),
        ]
    for layer in range(d.n_layers):
        if layer > 0:
            hooks.append((bk.resid_pre(layer), edits.save(state, bk.resid_pre(layer), clone=False)))
        n_up = index.head_sender[layer].start
        own: dict[str, list[int]] = {}  # grouped-query heads that need a k/v of their own
        reads: dict[str, tuple[list[int], Tensor]] = {}
        for ch in "qkv":
            ex = excluded[:n_up, index.head_receiver[(layer, ch)]]
            if not ex.any():
                continue
            heads = _any_but_dim1(ex).nonzero().flatten().tolist()
            if ch in "kv" and d.group > 1:
                heads, own[ch] = _kv_heads(bk, ex)
            if heads:
                reads[ch] = ([bk.slot(h, ch) for h in heads], ex[:, heads])
        inputs = None
        if reads:
            mlp = excluded[:n_up, index.mlp_receiver[layer]] if d.has_mlps else None
            inputs = _HeadInputs(bk, buf, state, layer, reads, mlp if mlp is not None and mlp.any() else None)
            for ch, (slots, _) in reads.items():
                hooks.append((bk.qkv(layer, ch), edits.set_heads(slots, inputs.value(ch))))
        if any(own.values()):
            items = [(h, ch) for ch, hs in own.items() for h in hs]
            hooks += grouped_kv_hooks(
                bk, layer, items, _own_kv(bk, buf, state, layer, own, excluded[:n_up], index)
            )
        hooks.append((bk.z(layer), _record_heads(bk, buf, index, abl, layer)))
        if d.has_mlps and not bk.mlp_reads_resid_pre:
            hooks.append((bk.resid_mid(layer), edits.save(state, bk.resid_mid(layer), clone=False)))
        if d.has_mlps:
            hooks += _mlp_hooks(bk, buf, state, index, excluded, abl, layer, inputs)
    ex_l = excluded[:, index.logits]
    if ex_l.any():
        plan_l = Exclusion(ex_l[:, None])
        hooks.append(
            (
                bk.resid_post(d.n_layers - 1),
                edits.replace(lambda act: buf.read(act, plan_l)[:, :, 0]),
            )
        )
    return hooks


class _HeadInputs:
    """The q/k/v inputs of a layer's receiver heads, ``reads[ch] = (slots, ex)`` (column
    ``i`` of ``ex``: the senders excluded from slot ``i``): one product over the sender
    buffer for the distinct columns of all three channels, one normalisation per distinct
    column (heads and channels excluding the same senders share it), then each slot's
    projection from its column. The normalised columns are computed at the first of the
    layer's q/k/v hooks of a forward pass and dropped after the last.

    ``mlp``: the senders before this layer's heads that the layer's MLP excludes, one more
    column of the same product, kept un-normalised as :attr:`mlp_partial` (``resid_pre``
    minus those senders) for the MLP to add its own layer's heads to: the MLP's read then
    touches a few slots of the buffer instead of all of them."""

    def __init__(
        self,
        bk: Backend,
        buf: SenderBuffer,
        state: dict[str, Tensor],
        layer: int,
        reads: Mapping[str, tuple[list[int], Tensor]],
        mlp: Tensor | None = None,
    ) -> None:
        self.bk, self.buf, self.state, self.layer = bk, buf, state, layer
        chans = list(reads)
        extra = [] if mlp is None else [mlp.cpu()[:, None]]
        cat = torch.cat([reads[ch][1].cpu() for ch in chans] + extra, dim=1)
        columns, which = torch.unique(cat, dim=1, return_inverse=True)
        self.columns = Exclusion(columns)
        self.mlp_col = int(which[-1]) if mlp is not None else None
        self.mlp_partial: Tensor | None = None
        widths = [reads[ch][1].shape[1] for ch in chans]
        self.groups: dict[str, list[tuple[int, list[int]]]] = {}
        self.slots = {ch: reads[ch][0] for ch in chans}
        for ch, w in zip(chans, which[: sum(widths)].split(widths), strict=True):
            by_col: dict[int, list[int]] = {}
            for i, c in enumerate(w.tolist()):
                by_col.setdefault(c, []).append(i)
            self.groups[ch] = list(by_col.items())
        self.chans = set(chans)
        self.served: set[str] = set()
        self.source: Tensor | None = None
        self.normed: Tensor | None = None
        self.work: Tensor | None = None  # the buffer's workspace that ``normed`` lives in

    def value(self, ch: str) -> Any:
        def fn(act: Tensor) -> Tensor:
            resid = self.state[self.bk.resid_pre(self.layer)]
            if self.normed is None or self.source is not resid:  # a new forward pass
                self.source, self.served = resid, set()
                n, n_pos, dm = resid.shape
                self.work = self.buf.workspace(n * n_pos * self.columns.n_cols * dm, resid)
                x = self.buf.read(resid, self.columns, self.work)
                if self.mlp_col is not None:
                    self.mlp_partial = x[:, :, self.mlp_col].clone()
                # [column, n, pos, d_model], a view; normalised in place where it can be
                self.normed = self.bk.ln1_(self.layer, x).permute(2, 0, 1, 3)
            normed = self.normed
            self.served.add(ch)
            out = self.bk.project_columns(self.layer, ch, normed, self.groups[ch], self.slots[ch])
            if self.served == self.chans:  # the layer's last q/k/v: its inputs are done
                self.normed = self.source = None
                self.buf.release(self.work)
            return out

        return fn


def _qkv_value(
    bk: Backend,
    buf: SenderBuffer,
    state: dict[str, Tensor],
    layer: int,
    ch: str,
    ex: Bool[Tensor, "s h"] | Bool[Tensor, "s h rows p"],
    slots: list[int],
) -> Any:
    """The q/k/v input of ``slots`` recomputed from ``resid - excluded senders`` (column
    ``i`` of ``ex``: the senders excluded from slot ``i``)."""
    return _HeadInputs(bk, buf, state, layer, {ch: (slots, ex)}).value(ch)


def _kv_heads(bk: Backend, ex: Tensor) -> tuple[list[int], list[int]]:
    """Grouped-query k/v receivers: a representative head per key/value slot whose query
    heads all exclude the same senders (the slot itself is recomputed), and the heads of the
    other slots that exclude something (each gets a k/v of its own)."""
    shared, own = [], []
    for j in range(bk.dims.kv_heads):
        group = bk.group_heads(j)
        cols = ex[:, group]
        if not cols.any():
            continue
        if bool((cols == cols[:, :1]).all()):
            shared.append(group[0])
        else:
            own += [h for i, h in enumerate(group) if bool(cols[:, i].any())]
    return shared, own


def _own_kv(
    bk: Backend,
    buf: SenderBuffer,
    state: dict[str, Tensor],
    layer: int,
    own: dict[str, list[int]],
    excluded: Tensor,
    index: EdgeIndex,
) -> Any:
    def values(store: Any) -> dict[tuple[int, str], Tensor]:
        out: dict[tuple[int, str], Tensor] = {}
        for ch, heads in own.items():
            if not heads:
                continue
            ex = excluded[:, index.head_receiver[(layer, ch)]][:, heads]
            slots = [bk.slot(h, ch) for h in heads]
            new = _qkv_value(bk, buf, state, layer, ch, ex, slots)(store[ch])
            for i, h in enumerate(heads):
                out[(h, ch)] = new[:, :, i]
        return out

    return values


def _record_heads(
    bk: Backend, buf: SenderBuffer, index: EdgeIndex, abl: AblationValues, layer: int
) -> HookFn:
    def hook(act: Tensor, hook: Any) -> None:
        buf.put_heads(index.head_sender[layer], bk, layer, act - abl.z[layer].to(act))

    return hook


def _mlp_hooks(
    bk: Backend,
    buf: SenderBuffer,
    state: dict[str, Tensor],
    index: EdgeIndex,
    excluded: Tensor,
    abl: AblationValues,
    layer: int,
    inputs: _HeadInputs | None = None,
) -> list[tuple[str, HookFn]]:
    """MLP ``layer`` reads ``resid - excluded senders`` (set at its input where the backend
    has such a point, so the model's own MLP call computes it; else recomputed from it) and
    its output change is recorded. Where the layer's q/k/v product also gave the MLP's sum
    over the senders before this layer's heads (``inputs.mlp_partial``), only this layer's
    heads are read from the buffer: ``partial + (resid - resid_pre) - sum of those heads``."""
    i_mlp = index.mlp_sender[layer]
    ex_m = excluded[:i_mlp, index.mlp_receiver[layer]]
    any_ex = bool(ex_m.any())
    edit = bk.mlp_input_edit(layer) if any_ex else None
    if inputs is not None and inputs.mlp_col is not None:
        late = ex_m.clone()
        late[: index.head_sender[layer].start] = False  # in the partial sum already
        plan = Exclusion(late[:, None])
        heads = bool(late.any())

        def read() -> Tensor:
            partial, inputs.mlp_partial = inputs.mlp_partial, None
            assert partial is not None, "the layer's q/k/v hooks ran first"
            resid = state[bk.mlp_in_resid(layer)]
            if resid is not state[bk.resid_pre(layer)]:
                partial += resid - state[bk.resid_pre(layer)]
            return buf.read(partial, plan)[:, :, 0] if heads else partial

    else:
        plan = Exclusion(ex_m[:, None])
        read = lambda: buf.read(state[bk.mlp_in_resid(layer)], plan)[:, :, 0]  # noqa: E731

    def hook(act: Tensor, hook: Any) -> Tensor:
        if edit is None and any_ex:
            act = bk.mlp_from_resid(layer, read())
        buf.put(slice(i_mlp, i_mlp + 1), (act - abl.mlp_out[layer].to(act))[None])
        return act

    out: list[tuple[str, HookFn]] = []
    if edit is not None:
        name, normalise = edit
        out.append((name, edits.replace(lambda act: normalise(read()))))
    return [*out, (bk.mlp_out(layer), hook)]


def _any_but_dim1(ex: Tensor) -> Tensor:
    """``ex.any(0)`` of ``[sender, head]``, also for ``[sender, head, rows, pos]``."""
    return ex.transpose(0, 1).reshape(ex.shape[1], -1).any(-1)


# ============================================================================ evaluation
def circuit_final(
    runs: Runs,
    tokens: Tensor,
    index: EdgeIndex,
    keep: Tensor,
    abl: AblationValues,
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream of ``tokens`` under the circuit ``keep``.

    The run holds every sender's output change at once (``[batch, pos, senders, d_model]``),
    so examples run in chunks that keep that buffer within the memory budget (at most a
    quarter over it, where that saves a small last chunk)."""
    bk = runs.bk
    per_example = len(index.senders) * tokens.shape[1] * bk.dims.d_model * bk.dtype.itemsize
    size = max(1, runs.memory_budget // max(per_example, 1))
    n = tokens.shape[0]
    if n > size and n % size < size / 4:  # no small tail chunk: each costs a forward's fixed
        size = -(-n // (n // size))  # overhead; its examples join the others (< 25% more)
    # the hooks are planned once; they read the ablated values at call time, from ``current``,
    # which holds each chunk's rows in turn
    current = abl.rows(slice(0, size))
    hooks = circuit_hooks(bk, index, keep, current, scratch_of(runs))
    finals = []
    for start in range(0, n, size):
        chunk = abl.rows(slice(start, start + size))
        for f in fields(AblationValues):
            setattr(current, f.name, getattr(chunk, f.name))
        finals.append(run_tokens(bk, tokens[start : start + size], hooks))
    return torch.cat(finals)


def scratch_of(runs: Runs) -> dict[str, Any] | None:
    """The memory a circuit run on ``runs`` reuses from the previous one (the CPU only:
    :attr:`Runs.scratch`)."""
    return runs.scratch if runs.bk.device.type == "cpu" else None


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


def _kl(readout: Readout, clean: Tensor, other: Tensor) -> Float[Tensor, " batch"]:
    """``KL(clean || other)`` of the next-token distributions at the positions the metric
    reads, mean over those positions."""
    lp_c = F.log_softmax(readout.bk.unembed(readout.gather(clean)), -1)
    lp = F.log_softmax(readout.bk.unembed(readout.gather(other)), -1)
    return (lp_c.exp() * (lp_c - lp)).sum(-1).mean(-1)


def evaluate(
    runs: Runs,
    readout: Readout,
    tokens: Tensor,
    index: EdgeIndex,
    edge_list: list[tuple[Any, Any]] | EdgeList,
    abl: AblationValues,
    ablation: Ablation,
    empty_is_corrupted: bool,
) -> CircuitResult:
    """Evaluate one hypothesis on the clean ``tokens`` (the KL columns lazily)."""
    keep = index.keep(edge_list, runs.n_pos, runs.named_positions)
    final = circuit_final(runs, tokens, index, keep, abl)
    values = readout(readout.gather(final))
    if empty_is_corrupted and runs.corrupted is not None:
        empty_final = runs.corrupted.final
    else:
        empty_final = circuit_final(runs, tokens, index, torch.zeros_like(keep), abl)
    empty_values = readout(readout.gather(empty_final))
    clean_values = readout(readout.gather(runs.clean.final))
    gap = float(clean_values.mean() - empty_values.mean())
    if gap == 0:
        raise ApexlensError("clean and fully ablated metrics are equal: recovery is undefined")
    clean_final = runs.clean.final

    def kls() -> tuple[float, float]:
        with torch.no_grad():
            aue = float(_kl(readout, clean_final, final).mean())
            ate = float(_kl(readout, clean_final, empty_final).mean())
        return aue, ate

    return CircuitResult(
        edges=edge_names(edge_list),
        scores=Scores(values),
        clean=Scores(clean_values),
        corrupted=Scores(empty_values),
        recovery=float((values.mean() - empty_values.mean()) / gap),
        ablation=ablation,
        _kl=kls,
    )
