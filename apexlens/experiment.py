"""The façade: one object (and three functions) over the engines.

An :class:`Experiment` runs a clean and a corrupted input once (:class:`~apexlens.runs.Runs`)
and hands every question to an engine: path patching (:mod:`apexlens.paths`), activation
patching (:mod:`apexlens.actpatch`) and circuit hypotheses (:mod:`apexlens.circuits`). The
functions :func:`path_patch`, :func:`act_patch` and :func:`evaluate_circuit` build one
Experiment and ask one question; :func:`patched` attaches a path patch or a circuit to the
model so that any forward pass runs under it.

Every call holds the model's lock (:func:`apexlens.hooks.model_lock`) while it runs, so
concurrent calls on one model from several threads are each exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens import actpatch, circuits, paths
from apexlens.backend import backend_for
from apexlens.circuits import EdgeIndex
from apexlens.errors import ApexlensError
from apexlens.graph import Node, NodeSpec, as_receivers, as_senders, parse_nodes, position_mask
from apexlens.hooks import attached, inference_mode
from apexlens.results import ActPatchResult, CircuitResult, PathPatchResult
from apexlens.runs import (
    MetricFn,
    Readout,
    Run,
    Runs,
    cache_names,
    cached_run,
    check_pair,
    check_tokens,
    run_from,
)
from apexlens.scoring import Scores
from apexlens.specs import Ablation, Circuit, EdgeSpec, MLPMode, Paths

__all__ = [
    "Circuit",
    "Experiment",
    "Paths",
    "act_patch",
    "evaluate_circuit",
    "patched",
    "path_patch",
]


class Experiment:
    """A model with a clean and a corrupted input, run once; every patch is computed on top.

    Build one to test many hypotheses on the same data without re-running the clean and
    corrupted passes::

        exp = apexlens.Experiment(model, clean_tokens, corrupted_tokens, metric=logit_diff)
        exp.path_patch(senders="all-heads", receivers="logits")
        exp.path_patch(senders="all-heads", receivers=["9.9.q", "9.6.q"])
        exp.evaluate_circuit(edges)
        exp.act_patch("all-heads")

    ``metric`` maps logits ``[batch, pos, vocab]`` to one value per example ``[batch]``.
    Built-in :mod:`apexlens.scoring` metrics declare what they read and run fastest; any
    other callable is called on many runs at once (``[runs, batch, pos, vocab]``) when it
    gives the same values that way -- index with ``...`` (``logits[..., -1, :]``) and it
    will -- else one run at a time. On the clean run it is probed for the positions and
    vocabulary columns it reads (verified: with NaN everywhere else it gives the same
    values); only those logits are computed from then on (:class:`apexlens.runs.Readout`).

    ``memory_budget`` (bytes) bounds a call's working memory beyond the cached runs; the
    default is half of what a ``run_with_cache`` of the batch holds, up to three quarters
    for small batches (:func:`apexlens.runs.default_budget`).

    Longer than most classes on purpose: it is the façade, one short method per question
    (path patching, activation patching, circuits), each delegating to its engine.
    """

    def __init__(
        self,
        model: Any,
        clean_tokens: Int[Tensor, "batch pos"],
        corrupted_tokens: Int[Tensor, "batch pos"],
        *,
        metric: MetricFn,
        positions: Mapping[str, Any] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.bk = backend_for(model)
        self.model = model
        self.clean_tokens, self.corrupted_tokens = check_pair(
            self.bk, clean_tokens, corrupted_tokens
        )
        self.batch, self.n_pos = (int(s) for s in self.clean_tokens.shape)
        self.named_positions = dict(positions or {})
        self.readout = Readout(self.bk, metric, self.batch, self.n_pos)
        with inference_mode(model):
            corrupted = cached_run(self.bk, self.corrupted_tokens)
            self.runs = Runs(
                self.bk,
                cached_run(self.bk, self.clean_tokens),
                corrupted,
                self.batch,
                self.n_pos,
                self.named_positions,
                memory_budget or 0,
            )
            self.readout.probe(self.runs.clean.final)
            self.clean_values = self.readout(self.readout.gather(self.runs.clean.final))
            self.corrupted_values = self.readout(self.readout.gather(corrupted.final))
        self._index: dict[bool, EdgeIndex] = {}

    # ------------------------------------------------------------------ state
    @property
    def clean(self) -> Any:
        return self.runs.clean

    @property
    def corrupted(self) -> Any:
        return self.runs.corrupted

    @property
    def memory_budget(self) -> int:
        return self.runs.memory_budget

    def nodes(self, spec: NodeSpec) -> list[Node]:
        return parse_nodes(spec, self.bk.dims)

    def mask(self, node: Node) -> Bool[Tensor, "batch pos"] | None:
        return self.runs.mask(node)

    def sender_delta(self, node: Node) -> Float[Tensor, "batch pos d_model"]:
        """``out(corrupted) - out(clean)`` of a sender, zero outside its positions."""
        return paths.sender_delta(self.runs, node)

    def _scores(self) -> tuple[Scores, Scores]:
        return Scores(self.clean_values), Scores(self.corrupted_values)

    def _grid(self, nodes: Sequence[Node]) -> tuple[int, ...] | None:
        d = self.bk.dims
        every_head = [(la, h) for la in range(d.n_layers) for h in range(d.n_heads)]
        ok = [(n.layer, n.head) for n in nodes if n.kind == "head" and n.positions is None]
        return (
            (d.n_layers, d.n_heads) if len(nodes) == len(every_head) and ok == every_head else None
        )

    # ------------------------------------------------------------------ path patching
    def path_patch(
        self,
        senders: NodeSpec,
        receivers: NodeSpec = "logits",
        *,
        via: Sequence[NodeSpec] = (),
        mlps: MLPMode = "live",
        progress: bool = False,
    ) -> PathPatchResult:
        """Path-patch each sender (on its own) to ``receivers``; see :func:`path_patch`."""
        sender_nodes = as_senders(self.nodes(senders))
        per_example = self.path_patch_groups(
            [[s] for s in sender_nodes], receivers, via=via, mlps=mlps, progress=progress
        )
        clean, corrupted = self._scores()
        return PathPatchResult(
            senders=[str(n) for n in sender_nodes],
            receivers=[str(r) for r in as_receivers(self.nodes(receivers))],
            per_example=per_example,
            clean=clean,
            corrupted=corrupted,
            grid=self._grid(sender_nodes),
            metric_name=self.readout.name,
            via=[str(n) for hop in via for n in self.nodes(hop)],
        )

    def path_patch_groups(
        self,
        groups: Sequence[Sequence[Node]],
        receivers: NodeSpec,
        *,
        via: Sequence[NodeSpec] = (),
        mlps: MLPMode = "live",
        progress: bool = False,
    ) -> Float[Tensor, "group batch"]:
        """Per-example metric when each group of senders is patched (jointly) to the receivers."""
        with inference_mode(self.model):
            return paths.path_patch_rows(
                self.runs,
                self.readout,
                groups,
                self.nodes(receivers),
                via=[self.nodes(h) for h in via],
                mlps=mlps,
                progress=progress,
            )

    # ------------------------------------------------------------------ activation patching
    def act_patch(
        self, nodes: NodeSpec = "all-heads", *, per_position: bool = False, progress: bool = False
    ) -> ActPatchResult:
        """Activation patching: run the corrupted input, put each node's clean activation
        back; see :func:`act_patch`."""
        node_list = actpatch.check_nodes(self.nodes(nodes))
        grid = self._grid(node_list)
        if per_position:
            if any(n.positions is not None for n in node_list):
                raise ApexlensError(
                    "per_position=True patches every position: give nodes without '@'"
                )
            if grid is not None:  # TransformerLens' by_pos layout: [layer, pos, head]
                layers, heads = grid
                node_list = [
                    Node("head", la, h).at(p)
                    for la in range(layers)
                    for p in range(self.n_pos)
                    for h in range(heads)
                ]
                grid = (layers, self.n_pos, heads)
            else:
                node_list = [n.at(p) for n in node_list for p in range(self.n_pos)]
                grid = (len(node_list) // self.n_pos, self.n_pos)
        clean, corrupted = self._scores()
        return ActPatchResult(
            senders=[str(n) for n in node_list],
            receivers=[],
            per_example=self.act_patch_values(node_list, progress=progress),
            clean=clean,
            corrupted=corrupted,
            grid=grid,
            metric_name=self.readout.name,
        )

    def act_patch_values(
        self, nodes: Sequence[Node], *, progress: bool = False
    ) -> Float[Tensor, "node batch"]:
        with inference_mode(self.model):
            return actpatch.act_patch_rows(self.runs, self.readout, nodes, progress=progress)

    # ------------------------------------------------------------------ circuits
    def edge_index(self, split_embed: bool = False) -> EdgeIndex:
        """The model's edge graph (``split_embed``: ``tok_embed`` and ``pos_embed`` senders)."""
        if split_embed not in self._index:
            self._index[split_embed] = EdgeIndex(self.bk, split_embed)
        return self._index[split_embed]

    def evaluate_circuit(
        self,
        edges: EdgeSpec,
        *,
        ablation: Ablation = "resample",
        reference_tokens: Int[Tensor, "n pos"] | None = None,
    ) -> CircuitResult:
        """Evaluate a circuit hypothesis on the cached runs; see :func:`evaluate_circuit`."""
        edges = circuits.EdgeList(edges)  # read once by everything below
        index = self.edge_index(circuits.uses_split_embed(edges))
        with inference_mode(self.model):
            abl = ablation_for(self.bk, ablation, self.runs.corrupted, reference_tokens, self.n_pos)
            return circuits.evaluate(
                self.runs,
                self.readout,
                self.clean_tokens,
                index,
                edges,
                abl,
                ablation,
                empty_is_corrupted=ablation == "resample" and reference_tokens is None,
            )


def ablation_for(
    bk: Any, ablation: Ablation, corrupted: Run | None, reference_tokens: Any, n_pos: int
) -> circuits.AblationValues:
    """What an ablated edge carries (``reference_tokens``: checked, run once, for ``"mean"``)."""
    reference = None
    if reference_tokens is not None:
        ref = check_tokens(bk, reference_tokens, "reference_tokens")
        if ref.shape[1] != n_pos:
            raise ApexlensError(
                f"reference tokens must be [n, {n_pos}] like the clean tokens, got "
                f"{tuple(ref.shape)}"
            )
        reference = cached_run(bk, ref)
    return circuits.ablation_values(bk, ablation, corrupted, reference)


# ============================================================================ functions
def path_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    senders: NodeSpec,
    receivers: NodeSpec = "logits",
    metric: MetricFn,
    mlps: MLPMode = "live",
    via: Sequence[NodeSpec] = (),
    positions: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> PathPatchResult:
    """Path-patch every sender, one at a time, to the receivers.

    Args:
        senders: nodes whose output is patched (``"all-heads"``, ``"heads:3"``, ``["0.1", "embed"]``,
            ``"m2"``...); each gets its own row of the result, in the order given.
        receivers: where the patched paths end (``"logits"``, ``"9.9.q"``, ``["9.9.q", "9.6.q"]``,
            ``"m3"``, ``"1.4"`` = its q, k and v).
        metric: logits ``[batch, pos, vocab]`` -> per-example values ``[batch]``; built-in
            :mod:`apexlens.scoring` metrics run the fast path (see :class:`Experiment`).
        mlps: ``"live"`` (MLPs on the way recompute) or ``"frozen"`` (direct paths only).
        via: intermediate nodes for multi-hop paths ``sender -> via[0] -> ... -> receivers``.
        positions: names for positions used in node spellings, e.g. ``{"end": end_positions}``.

    Returns:
        A :class:`PathPatchResult`; ``.values`` is ``[n_layers, n_heads]`` for all heads. A
        sender with no path to any receiver keeps the clean metric.
    """
    exp = Experiment(
        model,
        clean_tokens,
        corrupted_tokens,
        metric=metric,
        positions=positions,
        memory_budget=memory_budget,
    )
    return exp.path_patch(senders, receivers, via=via, mlps=mlps, progress=progress)


def act_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    nodes: NodeSpec = "all-heads",
    metric: MetricFn,
    per_position: bool = False,
    positions: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> ActPatchResult:
    """Activation patching, TransformerLens' convention: run ``corrupted_tokens`` and put each
    node's activation from the clean run back (heads: ``hook_z``; MLPs: ``hook_mlp_out``;
    ``"rL"``: the residual stream entering block L; ``"embed"``), one node at a time.

    ``nodes="all-heads"`` gives the numbers of ``get_act_patch_attn_head_out_all_pos``;
    ``per_position=True`` patches every node at every position on its own; for all heads
    ``.values`` is ``[n_layers, n_pos, n_heads]``, the numbers of
    ``get_act_patch_attn_head_out_by_pos``. ``"L.H@p"`` nodes patch chosen positions.
    ``.normalized()`` is 0 where nothing is restored and 1 where the clean metric is.
    """
    exp = Experiment(
        model,
        clean_tokens,
        corrupted_tokens,
        metric=metric,
        positions=positions,
        memory_budget=memory_budget,
    )
    return exp.act_patch(nodes, per_position=per_position, progress=progress)


def evaluate_circuit(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    edges: EdgeSpec,
    *,
    metric: MetricFn,
    ablation: Ablation = "resample",
    reference_tokens: Int[Tensor, "n pos"] | None = None,
    positions: Mapping[str, Any] | None = None,
) -> CircuitResult:
    """Evaluate a circuit hypothesis given as ``(sender, receiver)`` edges.

    Every edge outside the set carries its ablated value (``"resample"``: the corrupted run;
    ``"mean"``: the mean over ``reference_tokens``, default the corrupted tokens; ``"zero"``),
    every edge inside carries the value computed from the circuit. Use
    :func:`apexlens.graph.full_graph` for all edges of a model. For many hypotheses on the
    same data, build an :class:`Experiment` once and call its ``evaluate_circuit``.
    """
    exp = Experiment(model, clean_tokens, corrupted_tokens, metric=metric, positions=positions)
    return exp.evaluate_circuit(edges, ablation=ablation, reference_tokens=reference_tokens)


# ============================================================================ interactive
@contextmanager
def patched(
    model: Any,
    spec: Paths | Circuit,
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    positions: Mapping[str, Any] | None = None,
    reference_tokens: Tensor | None = None,
) -> Iterator[Any]:
    """Attach a path patch or a circuit hypothesis to the model's hook points.

    Inside the block any run of the model -- your own metric, ``run_with_cache``,
    generation -- happens under the patch::

        with apexlens.patched(model, apexlens.Paths("0.1", "1.2.k"), corrupted):
            logits = model(clean_tokens)

    For :class:`Paths`, each forward pass's clean activations are those of its own input
    (computed by a nested clean run when the pass enters block 0); the input must have the
    corrupted tokens' shape. The hooks are removed when the block ends, also after an
    exception; the block holds the model's lock (other threads' apexlens calls on this
    model wait for it).
    """
    bk = backend_for(model)
    if not isinstance(spec, (Paths, Circuit)):
        raise ApexlensError(
            f"patched() takes apexlens.Paths or apexlens.Circuit, got {type(spec).__name__}"
        )
    corrupted_tokens = check_tokens(bk, corrupted_tokens, "corrupted_tokens")
    with inference_mode(model):
        corrupted = cached_run(bk, corrupted_tokens)
        if isinstance(spec, Circuit):
            index = EdgeIndex(bk, circuits.uses_split_embed(spec.edges))
            keep = index.keep(spec.edges, corrupted_tokens.shape[1], dict(positions or {}))
            abl = ablation_for(
                bk, spec.ablation, corrupted, reference_tokens, corrupted_tokens.shape[1]
            )
            hooks = circuits.circuit_hooks(bk, index, keep, abl)
        else:
            senders = as_senders(parse_nodes(spec.senders, bk.dims))
            receivers = parse_nodes(spec.receivers, bk.dims)
            if spec.mlps not in ("live", "frozen"):
                raise ApexlensError(f"mlps must be 'live' or 'frozen', got {spec.mlps!r}")
            shape = tuple(corrupted_tokens.shape)

            def runs_for(resid0: Tensor) -> Runs:
                if tuple(resid0.shape[:2]) != shape:
                    raise ApexlensError(
                        f"inside apexlens.patched the input must have the corrupted tokens' shape "
                        f"{shape}, got {tuple(resid0.shape[:2])}"
                    )
                clean = run_from(bk, resid0, cache_names(bk))
                return Runs(bk, clean, corrupted, shape[0], shape[1], dict(positions or {}))

            named = dict(positions or {})
            hooks = paths.live_path_hooks(
                bk,
                runs_for,
                senders,
                receivers,
                spec.mlps,
                lambda n: position_mask(n, shape[0], shape[1], named, bk.device),
                (int(shape[0]), int(shape[1])),
            )
    with attached(model, hooks):
        yield model
