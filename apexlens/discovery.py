"""Circuit discovery: edge scores, faithfulness curves and greedy exact pruning.

**Where this module sits.** Like :mod:`apexlens.experiment` it is a *façade-level* module,
not an engine: it builds on the circuit engine's edge graph and hooks
(:class:`~apexlens.circuits.EdgeIndex`, :func:`~apexlens.circuits.circuit_hooks`, one
keep-matrix per row) and on the :class:`~apexlens.experiment.Experiment` (cached clean and
corrupted runs, the metric's :class:`~apexlens.runs.Readout`). The engines still never
import each other; nothing imports this module but the package root, the CLI and plots.

**The edges** are those :func:`apexlens.evaluate_circuit` takes: every sender (``embed`` --
or ``tok_embed`` and ``pos_embed`` with ``split_embed=True`` -- heads, MLPs) to every later
receiver (a head's q/k/v input, an MLP, the logits). With ``per_position=True`` every edge
is split by position: ``("0.1@3", "1.3.k@3")`` (see :func:`apexlens.circuits.edge_positions`
for why an edge joins a position only to itself).

**Scores** (:func:`attribute_edges`), one signed number per edge, all estimating the change
of the mean metric when that one edge is ablated (its sender's value replaced by the
ablated one, ``Delta_s = ablated_s - out_s``, only on the way into that receiver):

* ``"exact"`` -- the true change, ``m(full graph minus the edge) - m(clean)``. With every
  other edge present this equals a direct path patch (attention and MLPs frozen on the way,
  the network live after the receiver), so each edge is one row that starts at its
  receiver's layer: the receiver's input ``resid + Delta_s`` is put in place and only the
  layers from there on run. Edges into the logits need no layer at all.
* ``"eap"`` (Syed et al. 2023) -- ``Delta_s . dm/d input_r`` at the clean input: one forward
  and one backward pass give the gradient at every receiver's input.
* ``"eap-ig"`` (Hanna et al. 2024, integrated gradients on the inputs) -- the same with the
  gradient averaged over ``ig_steps`` inputs on the straight line from the corrupted to the
  clean embeddings, ``x_k = x_corr + (k / ig_steps) (x_clean - x_corr)``, ``k = 0 ..
  ig_steps - 1`` (their convention); all steps run as rows of one forward/backward pass.

The gradient at a head's q input (one per head, though all heads read the same residual
stream) is the gradient at ``hook_q`` pulled back through ``W_Q`` and ``ln1``: one batched
vector-Jacobian product of ``ln1`` per layer. An MLP's input gradient is
``dm/d attn_out - dm/d mlp_out`` (the residual stream into the MLP minus its skip path).

**Faithfulness** (:func:`faithfulness`, MIB, Mueller et al. 2025): circuits of the top
0.1%, 0.2%, ... 100% of edges by ``|score|``, every circuit exactly evaluated, all of them
rows of one batched pass; CPR and CMD are areas under ``f`` and ``|1 - f|``. No pruning of
dangling edges: under resample ablation it never changes a metric (a node whose inputs are
all ablated outputs its ablated value exactly; an edge into a node with no path to the
logits changes nothing).

**Greedy exact pruning** (:func:`discover`, ACDC semantics, Conmy et al. 2023): receivers
from the logits backwards; for each, its incoming edges in ``order`` (smallest ``|score|``
first); an edge is removed when the mean metric moves by less than ``threshold`` (compared
with the current circuit, which then shrinks). Each tried removal is an exact circuit
evaluation; candidates are evaluated in batches speculatively (row ``i`` removes candidates
``1..i``) and the walk stops at the first kept edge, so the decisions are exactly those of
the sequential algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from apexlens import circuits, edits
from apexlens.backend import Backend, fused_norm
from apexlens.circuits import EdgeIndex
from apexlens.errors import ApexlensError
from apexlens.experiment import Experiment, ablation_for
from apexlens.graph import Node, as_receivers, parse_node, validate
from apexlens.hooks import attached, inference_mode, silenced
from apexlens.results import (
    MIB_FRACTIONS,
    DiscoveryResult,
    EdgeScores,
    FaithfulnessResult,
    edge_auc,
)
from apexlens.runs import MetricFn, row_chunks, rows_per_chunk, run_rows, run_tokens
from apexlens.specs import Ablation, EdgeSpec

Method = Literal["eap-ig", "eap", "exact"]

__all__ = [
    "MIB_FRACTIONS",
    "attribute_edges",
    "discover",
    "edge_auc",
    "faithfulness",
]


# ============================================================================ set-up
class _Setup:
    """An Experiment plus what discovery adds: the edge graph, the ablated values, the
    per-sender ablation deltas and the edge list being scored."""

    def __init__(
        self,
        model: Any,
        clean_tokens: Tensor | None,
        corrupted_tokens: Tensor | None,
        metric: MetricFn,
        *,
        ablation: Ablation = "resample",
        reference_tokens: Tensor | None = None,
        split_embed: bool = False,
        positions: Mapping[str, Any] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        if isinstance(model, Experiment):
            if metric is not model.readout.metric:
                raise ApexlensError(
                    "an Experiment brings its own metric: pass metric=exp.readout.metric (or the "
                    "model instead of the Experiment)"
                )
            self.exp = model
        elif clean_tokens is None or corrupted_tokens is None:
            raise ApexlensError(
                "give clean and corrupted tokens (or an apexlens.Experiment instead of the model)"
            )
        else:
            self.exp = Experiment(
                model,
                clean_tokens,
                corrupted_tokens,
                metric=metric,
                positions=positions,
                memory_budget=memory_budget,
            )
        self.bk: Backend = self.exp.bk
        self.runs = self.exp.runs
        self.readout = self.exp.readout
        self.index: EdgeIndex = self.exp.edge_index(split_embed)
        self.ablation = ablation
        with inference_mode(self.exp.model):
            self.abl = ablation_for(
                self.bk, ablation, self.runs.corrupted, reference_tokens, self.exp.n_pos
            )
        self._delta: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.exp.batch

    @property
    def n_pos(self) -> int:
        return self.exp.n_pos

    def delta(self) -> Float[Tensor, "sender batch pos d_model"]:
        """``ablated_s - out_s`` on the clean run, for every sender of the graph."""
        if self._delta is None:
            bk, c, abl, idx = self.bk, self.runs.clean, self.abl, self.index
            shape = c[bk.resid_pre(0)].shape
            out = torch.empty(len(idx.senders), *shape, dtype=bk.dtype, device=bk.device)
            if idx.split_embed:
                assert abl.tok is not None and abl.pos is not None
                out[0] = abl.tok - c["hook_embed"]
                out[1] = abl.pos - c["hook_pos_embed"].expand(shape)
            else:
                out[0] = abl.embed - c[bk.resid_pre(0)]
            for layer in range(bk.dims.n_layers):
                dz = abl.z[layer] - c[bk.z(layer)]
                out[idx.head_sender[layer]] = bk.head_outputs(layer, dz.expand_as(c[bk.z(layer)]))
                if layer in idx.mlp_sender:
                    out[idx.mlp_sender[layer]] = abl.mlp_out[layer] - c[bk.mlp_out(layer)]
            self._delta = out
        return self._delta

    def clean_mean(self) -> float:
        return float(self.exp.clean_values.mean())


def _edge_name(idx: EdgeIndex, i: int, j: int, p: int | None) -> tuple[str, str]:
    s, r = idx.senders[i].name, idx.receivers[j].name
    return (s, r) if p is None else (f"{s}@{p}", f"{r}@{p}")


def _edge_table(
    st: _Setup, edges: EdgeSpec | None, per_position: bool
) -> tuple[Tensor, list[tuple[str, str]]]:
    """The edges to score as rows ``(sender, receiver, position or -1)`` and their names."""
    idx = st.index
    P = st.n_pos
    if edges is None:
        pairs = idx.valid.nonzero()
        if per_position:
            pos = torch.arange(P).repeat(len(pairs))
            table = torch.cat([pairs.repeat_interleave(P, 0), pos[:, None]], 1)
        else:
            table = torch.cat([pairs, torch.full((len(pairs), 1), -1)], 1)
    else:
        rows: dict[tuple[int, int, int], None] = {}
        nodes: dict[Any, Node] = {}

        def node(spec: Any) -> Node:
            key = spec if isinstance(spec, str) else id(spec)
            if key not in nodes:
                nodes[key] = validate(parse_node(spec), st.bk.dims)
            return nodes[key]

        for pair in edges:
            try:
                s_spec, r_spec = pair
            except (TypeError, ValueError):
                raise ApexlensError(f"an edge is a (sender, receiver) pair, got {pair!r}") from None
            s = node(s_spec)
            if s.kind in ("logits", "resid") or (s.kind == "head" and s.channel is not None):
                raise ApexlensError(f"edge {s} -> {r_spec}: {s} cannot send")
            i = idx.sender_id(s)
            for r in as_receivers([node(r_spec)]):
                j = idx.receiver_id(r)
                if not idx.valid[i, j]:
                    raise ApexlensError(
                        f"edge {s} -> {r} goes backwards: receiver {r} comes before (or in the same "
                        f"layer as) sender {s}"
                    )
                at = circuits.edge_positions(s, r, P, st.runs.named_positions)
                if at is None:
                    for p in range(P) if per_position else [-1]:
                        rows[(i, j, p)] = None
                else:
                    for p in at:
                        rows[(i, j, p)] = None
        if not rows:
            raise ApexlensError("edges is empty: give at least one edge to score")
        table = torch.tensor(list(rows), dtype=torch.long)
    names = [_edge_name(idx, i, j, None if p < 0 else p) for i, j, p in table.tolist()]
    return table, names


# ============================================================================ gradients
def _piece(bk: Backend, module: Any) -> Any:
    """``module`` as a differentiable function with its hook points silenced (the backend's
    own pieces run without gradients on a TransformerBridge)."""
    if module is None:
        return lambda x: x
    fused = fused_norm(module)  # TL's norms as torch's fused, differentiable kernels
    if fused is not None:
        return fused

    def f(x: Tensor) -> Tensor:
        with silenced(module):
            return module(x)

    return f


class _Pieces:
    """Differentiable ``ln1`` and ``ln_final`` + unembedding, checked against the backend's
    (a model whose pieces differ is refused, never silently mis-attributed)."""

    def __init__(self, st: _Setup):
        bk, model = st.bk, st.bk.model
        self.bk, self.readout = bk, st.readout
        self.ln1 = [
            _piece(bk, getattr(model.blocks[la], "ln1", None)) for la in range(bk.dims.n_layers)
        ]
        self.ln_final = _piece(bk, getattr(model, "ln_final", None))
        # same function up to rounding (the backend's norms are fused kernels)
        rtol, atol = (1e-6, 1e-9) if bk.dtype == torch.float64 else (1e-4, 1e-5)
        with torch.no_grad():
            for la in range(bk.dims.n_layers):
                x = st.runs.clean[bk.resid_pre(la)]
                if not torch.allclose(self.ln1[la](x), bk.ln1(la, x), rtol=rtol, atol=atol):
                    raise ApexlensError(
                        f"attribution needs blocks.{la}.ln1 to be the norm in front of attention; "
                        "this model's is not (is it post-norm?)"
                    )
            mine = self.metric(st.runs.clean.final[None])[0]
            if not torch.allclose(mine, st.exp.clean_values, rtol=rtol, atol=atol):
                raise ApexlensError(
                    "attribution needs logits = ln_final(resid) @ W_U + b_U; this model's "
                    "unembedding differs"
                )

    def metric(self, final: Float[Tensor, "rows batch pos d_model"]) -> Float[Tensor, "rows batch"]:
        """The metric of final residual streams, differentiably."""
        ro, bk = self.readout, self.bk
        x = self.ln_final(ro.gather(final))
        if ro.tokens is not None:
            logits = x @ bk.W_U[:, ro.tokens] + bk.b_U[ro.tokens]
        else:
            logits = x @ bk.W_U + bk.b_U
        return ro.from_logits(logits)


def receiver_grads(
    st: _Setup, alphas: Sequence[float]
) -> Float[Tensor, "receiver batch pos d_model"]:
    """``dm / d input_r`` for every receiver of the graph, averaged over the inputs
    ``x_corr + alpha (x_clean - x_corr)`` (``alphas``; ``[1.0]``: the clean input).

    ``m`` is the per-example metric summed over the batch, so each example's gradient is its
    own metric's. All alphas run as rows of one forward and one backward pass (in chunks of
    the memory budget).
    """
    bk, idx, runs = st.bk, st.index, st.runs
    d = bk.dims
    c = runs.clean
    x_clean = c[bk.resid_pre(0)]
    x_corr = st.abl.embed.expand_as(x_clean)  # the corrupted run's, for resample ablation
    pieces = _Pieces(st)
    out = torch.zeros(len(idx.receivers), *x_clean.shape, dtype=bk.dtype, device=bk.device)
    per_row = 9 * d.n_heads * x_clean.numel() * bk.dtype.itemsize  # the ln1 VJP's copies
    chunk = rows_per_chunk(
        bk,
        runs.memory_budget,
        len(alphas),
        runs.batch,
        runs.n_pos,
        runs.batch * runs.n_pos,
        attention=True,
        extra=per_row,
    )
    for alpha_rows in row_chunks(list(alphas), chunk, desc="gradients", progress=False):
        a = torch.tensor(alpha_rows, dtype=bk.dtype, device=bk.device)[:, None, None, None]
        resid0 = (x_corr + a * (x_clean - x_corr)).reshape(-1, *x_clean.shape[1:])
        out += _grads_once(st, pieces, resid0, len(alpha_rows))
    return out / len(alphas)


def _grads_once(
    st: _Setup, pieces: _Pieces, resid0: Tensor, rows: int
) -> Float[Tensor, "receiver batch pos d_model"]:
    bk, idx = st.bk, st.index
    d = bk.dims
    model = bk.model
    leaves: dict[str, Tensor] = {}
    resids: dict[int, Tensor] = {}

    def add_leaf(name: str) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            leaf = torch.zeros_like(act, requires_grad=True)
            leaves[name] = leaf
            return act + leaf

        return hook

    def keep_resid(layer: int) -> Any:
        def hook(act: Tensor, hook: Any) -> None:
            resids[layer] = act.detach()

        return hook

    hooks: list[tuple[str, Any]] = []
    for la in range(d.n_layers):
        hooks.append((bk.resid_pre(la), keep_resid(la)))
        hooks += [(bk.qkv(la, ch), add_leaf(f"{la}{ch}")) for ch in "qkv"]
        if la in idx.mlp_receiver:
            hooks.append((bk.attn_out(la), add_leaf(f"{la}a")))
            hooks.append((bk.mlp_out(la), add_leaf(f"{la}m")))
    with inference_mode(model, grad=True), attached(model, hooks):
        resid = resid0.detach()
        for la in range(d.n_layers):
            o = model.blocks[la](resid)
            resid = o[0] if isinstance(o, tuple) else o
        final_leaf = torch.zeros_like(resid, requires_grad=True)
        final = resid + final_leaf
        values = pieces.metric(final.reshape(rows, -1, *final.shape[1:]))
        names = list(leaves)
        grads = torch.autograd.grad(
            values.sum(), [leaves[n] for n in names] + [final_leaf], allow_unused=True
        )
    g = {
        n: (gr if gr is not None else torch.zeros_like(leaves[n]))
        for n, gr in zip(names, grads[:-1], strict=True)
    }
    g_final = grads[-1] if grads[-1] is not None else torch.zeros_like(final_leaf)
    batch = st.batch
    fold = lambda t: t.reshape(rows, batch, *t.shape[1:]).sum(0)  # noqa: E731
    out = torch.zeros(
        len(idx.receivers), batch, *resid0.shape[1:], dtype=bk.dtype, device=bk.device
    )
    out[idx.logits] = fold(g_final)
    for la in range(d.n_layers):
        # per-head cotangents at the residual stream, pulled back through ln1 in one VJP
        cots = [torch.einsum("nphk,hmk->nphm", g[f"{la}{ch}"], bk.W_in(ch)[la]) for ch in "qkv"]
        cot = torch.cat(cots, dim=2)  # [n, pos, 3H, d]
        with inference_mode(model, grad=True):
            x = resids[la][:, :, None, :].expand_as(cot).clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(pieces.ln1[la](x), x, cot)
        H = d.n_heads
        for c_i, ch in enumerate("qkv"):
            sl = idx.head_receiver[(la, ch)]
            out[sl] = fold(gx[:, :, c_i * H : (c_i + 1) * H]).permute(2, 0, 1, 3)
        if la in idx.mlp_receiver:
            out[idx.mlp_receiver[la]] = fold(g[f"{la}a"] - g[f"{la}m"])
    return out.detach()


def _gradient_scores(
    st: _Setup, table: Tensor, alphas: Sequence[float]
) -> Float[Tensor, "edge batch"]:
    """``Delta_s . grad_r`` per example for every edge row ``(s, r, p)``."""
    G = receiver_grads(st, alphas)
    D = st.delta()
    S, B, P, dm = D.shape
    out = torch.empty(len(table), B, dtype=D.dtype, device=D.device)
    whole = table[:, 2] < 0
    if whole.any():
        # per example: [batch, sender, (pos d)] @ [batch, (pos d), receiver], one batched matmul
        m = torch.bmm(
            D.permute(1, 0, 2, 3).reshape(B, S, P * dm),
            G.permute(1, 2, 3, 0).reshape(B, P * dm, -1),
        )
        t = table[whole]
        out[whole] = m[:, t[:, 0], t[:, 1]].T
    if (~whole).any():
        # per example and position: [(batch pos), sender, d] @ [(batch pos), d, receiver]
        m = torch.bmm(
            D.permute(1, 2, 0, 3).reshape(B * P, S, dm),
            G.permute(1, 2, 3, 0).reshape(B * P, dm, -1),
        ).reshape(B, P, S, -1)
        t = table[~whole]
        out[~whole] = m[:, t[:, 2], t[:, 0], t[:, 1]].T
    return out


# ============================================================================ exact
def _exact_scores(st: _Setup, table: Tensor, progress: bool) -> Float[Tensor, "edge batch"]:
    """``m(full graph minus the edge) - m(clean)`` per example for every edge row."""
    bk, runs, ro, idx = st.bk, st.runs, st.readout, st.index
    c = runs.clean
    D = st.delta()
    clean_values = st.exp.clean_values
    out = torch.empty(len(table), st.batch, dtype=bk.dtype, device=bk.device)
    P = st.n_pos

    def row_delta(rows: Tensor) -> Tensor:
        d = D[rows[:, 0]]
        p = rows[:, 2]
        if (p >= 0).any():
            m = torch.ones(len(rows), P, dtype=d.dtype, device=d.device)
            sel = p >= 0
            m[sel] = 0
            m[sel.nonzero().flatten(), p[sel]] = 1
            d = d * m[:, None, :, None]
        return d

    recv = [idx.receivers[int(j)] for j in table[:, 1].tolist()]
    start = torch.tensor(
        [
            bk.dims.n_layers + 1 if r.kind == "logits" else r.layer + (1 if r.kind == "mlp" else 0)
            for r in recv
        ]
    )
    # logits: the final residual stream moves by Delta_s, nothing runs
    lg = (start == bk.dims.n_layers + 1).nonzero().flatten()
    for rows in row_chunks(lg.tolist(), 4096, desc="exact (logits)", progress=progress):
        r = torch.tensor(rows)
        final = ro.gather(c.final)[None] + ro.gather(row_delta(table[r]))
        out[r] = ro(final)
    n_tok = st.batch * P
    per_row_chunk = runs.rows_per_chunk(len(table), n_tok, attention=True)
    for layer in range(bk.dims.n_layers):
        for kind in ("head", "mlp"):
            sel = [
                i
                for i in (start == (layer if kind == "head" else layer + 1))
                .nonzero()
                .flatten()
                .tolist()
                if recv[i].kind == kind
            ]
            for rows in row_chunks(
                sel, per_row_chunk, desc=f"exact (layer {layer})", progress=progress
            ):
                r = torch.tensor(rows)
                out[r] = _exact_chunk(
                    st, table[r], [recv[i] for i in rows], row_delta(table[r]), layer, kind
                )
    return out - clean_values


def _exact_chunk(
    st: _Setup,
    rows: Tensor,
    recv: list[Node],
    delta: Float[Tensor, "rows batch pos d_model"],
    layer: int,
    kind: str,
) -> Float[Tensor, "rows batch"]:
    bk, runs, ro = st.bk, st.runs, st.readout
    c = runs.clean
    n = len(rows)
    if kind == "mlp":
        new = bk.mlp_from_resid(layer, c[bk.resid_mid(layer)][None] + delta)
        resid = c.resid(layer + 1, bk)[None] + (new - c[bk.mlp_out(layer)][None])
        final = run_rows(bk, resid, layer + 1) if layer + 1 < bk.dims.n_layers else resid
        return ro(ro.gather(final))
    x = c[bk.resid_pre(layer)][None] + delta
    hooks = []
    for ch in "qkv":
        mine = [i for i, r in enumerate(recv) if r.channel == ch]
        if not mine:
            continue
        heads = [int(recv[i].head or 0) for i in mine]
        vals = torch.empty(len(mine), *x.shape[1:3], bk.dims.d_head, dtype=x.dtype, device=x.device)
        for h in sorted(set(heads)):
            at = [j for j, hh in enumerate(heads) if hh == h]
            xi = x[[mine[j] for j in at]]
            vals[at] = bk.head_input(layer, ch, xi, [h])[..., 0, :]
        hooks.append(
            (
                bk.qkv(layer, ch),
                edits.scatter_heads(torch.tensor(mine), torch.tensor(heads), vals, n),
            )
        )
    resid = c[bk.resid_pre(layer)].expand(n, *c[bk.resid_pre(layer)].shape)
    final = run_rows(bk, resid, layer, hooks)
    return ro(ro.gather(final))


# ============================================================================ public: scores
def attribute_edges(
    model: Any,
    clean_tokens: Tensor | None,
    corrupted_tokens: Tensor | None,
    *,
    metric: MetricFn,
    method: Method = "eap-ig",
    ig_steps: int = 5,
    edges: EdgeSpec | None = None,
    split_embed: bool = False,
    per_position: bool = False,
    ablation: Ablation = "resample",
    reference_tokens: Tensor | None = None,
    positions: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> EdgeScores:
    """One signed score per edge: the change of the mean metric when that edge alone is
    ablated (``"exact"``), or its gradient estimate (``"eap"``, ``"eap-ig"``); see the module
    docstring for the definitions.

    Args:
        metric: logits ``[batch, pos, vocab]`` -> per-example values ``[batch]``.
        method: ``"eap-ig"`` (default), ``"eap"`` or ``"exact"``.
        ig_steps: integration steps of ``"eap-ig"`` (``k / ig_steps``, ``k = 0..ig_steps-1``).
        edges: score only these edges (``(sender, receiver)`` as for ``evaluate_circuit``;
            ``"1.3"`` as a receiver means its q, k and v); default: every edge of the graph.
        split_embed: ``tok_embed`` and ``pos_embed`` senders instead of ``embed``.
        per_position: every edge at every position (``("0.1@3", "1.3.k@3")``).
        ablation: what an ablated edge carries: ``"resample"`` (the corrupted run),
            ``"mean"`` (over ``reference_tokens``, default the corrupted tokens), ``"zero"``.
        positions: names for positions used in edge spellings.

    ``model`` may also be an :class:`~apexlens.Experiment` (its runs are reused; the token
    arguments are then ignored).
    """
    if method not in ("eap-ig", "eap", "exact"):
        raise ApexlensError(f"method must be 'eap-ig', 'eap' or 'exact', got {method!r}")
    if method == "eap-ig" and (
        not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1
    ):
        raise ApexlensError(f"ig_steps must be a positive integer, got {ig_steps!r}")
    st = _Setup(
        model,
        clean_tokens,
        corrupted_tokens,
        metric,
        ablation=ablation,
        reference_tokens=reference_tokens,
        split_embed=split_embed,
        positions=positions,
        memory_budget=memory_budget,
    )
    table, names = _edge_table(st, edges, per_position)
    if method == "exact":
        with inference_mode(st.exp.model):
            per_example = _exact_scores(st, table, progress)
    else:
        alphas = [1.0] if method == "eap" else [k / ig_steps for k in range(ig_steps)]
        per_example = _gradient_scores(st, table, alphas)
    return EdgeScores(
        edges=names,
        scores=per_example.mean(-1).detach(),
        method=method,
        per_example=per_example.detach(),
        metric_name=st.readout.name,
        ablation=ablation,
        split_embed=split_embed,
    )


# ============================================================================ batched circuits
def circuit_rows(
    st: _Setup,
    keeps: Bool[Tensor, "rows sender receiver"] | Bool[Tensor, "rows sender receiver pos"],
    progress: bool = False,
) -> Float[Tensor, "rows batch"]:
    """Per-example metric of many circuits, each a row of one batched forward pass."""
    bk, runs, ro, idx = st.bk, st.runs, st.readout, st.index
    n = len(keeps)
    out = torch.empty(n, st.batch, dtype=bk.dtype, device=bk.device)
    d_buf = len(idx.senders) * st.batch * st.n_pos * bk.dims.d_model * bk.dtype.itemsize
    chunk = rows_per_chunk(
        bk,
        runs.memory_budget,
        n,
        st.batch,
        st.n_pos,
        st.batch * st.n_pos,
        attention=True,
        extra=2 * d_buf,
    )
    tokens = st.exp.clean_tokens
    with inference_mode(st.exp.model):
        for rows in row_chunks(list(range(n)), chunk, desc="circuits", progress=progress):
            k = keeps[list(rows)]
            k4 = k.permute(1, 2, 0)[..., None] if k.ndim == 3 else k.permute(1, 2, 0, 3)
            m = len(rows)
            hooks = circuits.circuit_hooks(bk, idx, k4, st.abl.tiled(m), circuits.scratch_of(runs))
            final = run_tokens(bk, tokens.repeat(m, 1), hooks)
            out[list(rows)] = ro(ro.gather(final.reshape(m, st.batch, *final.shape[1:])))
    return out


# ============================================================================ faithfulness
def faithfulness(
    model: Any,
    clean_tokens: Tensor | None,
    corrupted_tokens: Tensor | None,
    scores: EdgeScores,
    *,
    metric: MetricFn,
    fractions: Sequence[float] = MIB_FRACTIONS,
    ablation: Ablation = "resample",
    reference_tokens: Tensor | None = None,
    absolute: bool = True,
    positions: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> FaithfulnessResult:
    """The MIB faithfulness curve of an edge ranking: for each fraction ``q`` the circuit of
    the top ``int(q * n_edges)`` edges by ``|score|`` (``absolute=False``: by signed score),
    evaluated exactly; ``f = (m(circuit) - m(empty)) / (m(full) - m(empty))``, ``.cpr`` and
    ``.cmd`` its areas (see :class:`~apexlens.results.FaithfulnessResult`). All circuits are
    rows of one batched pass; the full graph is the clean run and, under resample ablation,
    the empty one the corrupted run, so neither is run again."""
    fr = [float(q) for q in fractions]
    if not fr or any(not 0 <= q <= 1 for q in fr) or sorted(fr) != fr:
        raise ApexlensError(f"fractions must be increasing numbers in [0, 1], got {fractions!r}")
    if not isinstance(scores, EdgeScores):
        raise ApexlensError(
            f"scores must be EdgeScores (from attribute_edges), got {type(scores).__name__}"
        )
    st = _Setup(
        model,
        clean_tokens,
        corrupted_tokens,
        metric,
        ablation=ablation,
        reference_tokens=reference_tokens,
        split_embed=scores.split_embed,
        positions=positions,
        memory_budget=memory_budget,
    )
    idx = st.index
    table, _ = _edge_table(st, scores.edges, False)
    if len(table) != len(scores):
        raise ApexlensError("scores.edges must name each edge once, with its receiver's channel")
    key = scores.scores.abs() if absolute else scores.scores
    order = torch.argsort(-key.double().cpu(), stable=True)
    positional = bool((table[:, 2] >= 0).any())
    shape = (*idx.valid.shape, st.n_pos) if positional else idx.valid.shape
    keeps, counts = [], []
    for q in fr:
        kk = int(q * len(table))
        counts.append(kk)
        keep = torch.zeros(shape, dtype=torch.bool)
        chosen = table[order[:kk]]
        for i, j, p in chosen.tolist():
            if positional and p >= 0:
                keep[i, j, p] = True
            elif positional:
                keep[i, j, :] = True
            else:
                keep[i, j] = True
        keeps.append(keep)
    values = torch.empty(len(fr), st.batch, dtype=st.bk.dtype, device=st.bk.device)
    full = st.exp.clean_values
    all_edges = idx.valid if not positional else idx.valid[..., None].expand(shape)
    n_scored_total = int(idx.valid.sum()) * (st.n_pos if positional else 1)
    todo = []
    for i, keep in enumerate(keeps):
        if counts[i] == n_scored_total and bool((keep == all_edges).all()):
            values[i] = full  # the whole graph is the clean run, exactly
        else:
            todo.append(i)
    resample_empty = ablation == "resample" and reference_tokens is None
    if resample_empty:
        empty = st.runs.corrupted
        assert empty is not None
        with torch.no_grad():
            empty_values = st.readout(st.readout.gather(empty.final))
        for i in list(todo):
            if counts[i] == 0:
                values[i] = empty_values
                todo.remove(i)
        rows = torch.stack([keeps[i] for i in todo]) if todo else None
    else:
        rows = torch.stack([torch.zeros(shape, dtype=torch.bool)] + [keeps[i] for i in todo])
    if rows is not None and len(rows):
        got = circuit_rows(st, rows, progress)
        if not resample_empty:
            empty_values, got = got[0], got[1:]
        for n_i, i in enumerate(todo):
            values[i] = got[n_i]
    return FaithfulnessResult(
        fractions=fr,
        n_edges=counts,
        values=values,
        full=float(full.mean()),
        empty=float(empty_values.mean()),
        method=scores.method,
        ablation=ablation,
    )


# ============================================================================ discovery
def discover(
    model: Any,
    clean_tokens: Tensor | None,
    corrupted_tokens: Tensor | None,
    *,
    metric: MetricFn,
    threshold: float,
    order: EdgeScores | None = None,
    edges: EdgeSpec | None = None,
    split_embed: bool = False,
    ablation: Ablation = "resample",
    reference_tokens: Tensor | None = None,
    positions: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    memory_budget: int | None = None,
    progress: bool = False,
) -> DiscoveryResult:
    """Greedy exact pruning with ACDC's semantics (see the module docstring).

    Receivers are visited from the logits backwards; each incoming edge (smallest ``|score|``
    of ``order`` first, else the latest sender first) is removed when the mean metric of the
    current circuit moves by less than ``threshold`` (absolute, in the metric's units). A
    component whose outputs all have been removed keeps no inputs (removing them cannot
    change the metric). ``edges`` is the starting graph (default: every edge).

    Returns a :class:`~apexlens.results.DiscoveryResult`: the kept edges, their circuit's
    recovery and proportion explained, and every decision taken.
    """
    if (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise ApexlensError(f"threshold must be a number >= 0, got {threshold!r}")
    if batch_size < 1:
        raise ApexlensError(f"batch_size must be >= 1, got {batch_size}")
    st = _Setup(
        model,
        clean_tokens,
        corrupted_tokens,
        metric,
        ablation=ablation,
        reference_tokens=reference_tokens,
        split_embed=split_embed,
        positions=positions,
        memory_budget=memory_budget,
    )
    idx = st.index
    keep = idx.valid.clone() if edges is None else idx.keep(list(edges))
    if keep.ndim != 2:
        raise ApexlensError("discover works on edges at every position; give edges without '@'")
    n_start = int(keep.sum())
    prio = torch.zeros(idx.valid.shape, dtype=torch.float64)
    if order is not None:
        if order.split_embed != split_embed:
            raise ApexlensError("order was scored with a different split_embed than discover uses")
        table, _ = _edge_table(st, order.edges, False)
        if bool((table[:, 2] >= 0).any()):
            raise ApexlensError("order must score edges at every position (no '@')")
        prio[table[:, 0], table[:, 1]] = order.scores.abs().double().cpu()
    else:  # latest sender first
        prio = -torch.arange(len(idx.senders), dtype=torch.float64)[:, None].expand_as(prio).clone()
    if edges is None:
        current = float(st.exp.clean_values.mean())
    else:
        current = float(circuit_rows(st, keep[None])[0].mean())
    n_rows = 0
    log: list[dict[str, Any]] = []
    n_layers = st.bk.dims.n_layers
    recv_order = sorted(range(len(idx.receivers)), key=lambda j: -idx.receivers[j].order(n_layers))

    def has_output(r: Node) -> bool:
        if r.kind == "logits":
            return True
        s = idx.sender_id(r.as_sender)
        return bool(keep[s].any())

    for j in recv_order:
        r = idx.receivers[j]
        incoming = keep[:, j].nonzero().flatten().tolist()
        if not incoming:
            continue
        if not has_output(r):
            for i in incoming:
                keep[i, j] = False
                log.append(_step(idx, i, j, current, current, True))
            continue
        cand = sorted(incoming, key=lambda i: (float(prio[i, j]), i))
        pos = 0
        while pos < len(cand):
            batch = cand[pos : pos + batch_size]
            rows = keep[None].repeat(len(batch), 1, 1)
            for b in range(len(batch)):
                rows[b:, batch[b], j] = False
            vals = circuit_rows(st, rows, progress).mean(-1).tolist()
            n_rows += len(batch)
            prev = current
            for b, i in enumerate(batch):
                removed = abs(vals[b] - prev) < threshold
                log.append(_step(idx, i, j, prev, vals[b], removed))
                pos += 1
                if removed:
                    keep[i, j] = False
                    prev = vals[b]
                else:
                    break
            current = prev
    kept = [(idx.senders[i].name, idx.receivers[jj].name) for i, jj in keep.nonzero().tolist()]
    evaluation = st.exp.evaluate_circuit(kept, ablation=ablation, reference_tokens=reference_tokens)
    return DiscoveryResult(
        edges=kept,
        evaluation=evaluation,
        threshold=float(threshold),
        n_total=n_start,
        steps=pd.DataFrame(log),
        n_forward_rows=n_rows,
    )


def _step(
    idx: EdgeIndex, i: int, j: int, before: float, after: float, removed: bool
) -> dict[str, Any]:
    return {
        "sender": idx.senders[i].name,
        "receiver": idx.receivers[j].name,
        "before": before,
        "after": after,
        "removed": removed,
    }
