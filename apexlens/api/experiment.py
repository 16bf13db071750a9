"""The façade: one object over the engines, every question a method.

An :class:`Experiment` runs a clean and a corrupted input once (:class:`~apexlens.runs.Runs`)
and turns every question into a resolved plan for an engine: path patching
(:mod:`apexlens.engines.paths`), activation patching (:mod:`apexlens.engines.actpatch`),
circuit hypotheses (:mod:`apexlens.engines.circuits`), edge attribution
(:mod:`apexlens.engines.attribution`), and the searches built on them (faithfulness curves,
greedy pruning: :mod:`apexlens.api.search`). User spellings (nodes, edges, positions) are
parsed and checked here, at the boundary; engines receive node objects, keep-matrices and
edge tables, and return per-row values, which this module wraps into results.

Every call holds the model's lock (:func:`apexlens.model.hooks.model_lock`) while it runs, so
concurrent calls on one model from several threads are each exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.api import search
from apexlens.engines import actpatch, attribution, circuits, paths
from apexlens.errors import ApexlensError
from apexlens.model import backend_for
from apexlens.model.hooks import inference_mode
from apexlens.results import (
    MIB_FRACTIONS,
    ActPatchResult,
    CircuitResult,
    DiscoveryResult,
    EdgeScores,
    FaithfulnessResult,
    PathPatchResult,
)
from apexlens.runs import (
    AblationValues,
    MetricFn,
    Readout,
    Runs,
    ablation_for,
    cached_run,
    check_pair,
)
from apexlens.runs.shard import guarded
from apexlens.scoring import Scores
from apexlens.vocab import (
    Ablation,
    Circuit,
    EdgeIndex,
    EdgeList,
    EdgeSpec,
    MLPMode,
    Node,
    NodeSpec,
    as_receivers,
    as_senders,
    edge_names,
    parse_nodes,
)
from apexlens.vocab.edges import uses_split_embed


class Experiment:
    """A model with a clean and a corrupted input, run once; every question is computed on
    top. Build one to ask many questions of the same data::

        exp = apexlens.Experiment(model, clean_tokens, corrupted_tokens, metric=logit_diff)
        exp.path_patch(senders="all-heads", receivers="logits")
        exp.evaluate_circuit(edges)
        exp.act_patch("all-heads")
        scores = exp.attribute_edges(method="exact")
        exp.faithfulness(scores); exp.discover(threshold=0.05, order=scores)

    ``metric`` maps logits ``[batch, pos, vocab]`` to one value per example ``[batch]``.
    Built-in :mod:`apexlens.scoring` metrics declare what they read and run fastest; any
    other callable is probed on the clean run for the positions and vocabulary columns it
    reads (:class:`apexlens.runs.Readout`). ``positions`` names positions for node
    spellings (``"9.9.q@end"``). ``memory_budget`` (bytes) bounds a call's working memory
    beyond the cached runs (default: :func:`apexlens.runs.default_budget`).
    Methods that may take long show a named progress bar (``progress=False``: none).
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
                _budget(memory_budget),
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

    @property
    def meta(self) -> dict[str, Any]:
        """What results computed here record about it (model, metric, examples)."""
        return {"model": self.bk.name, "metric": self.readout.name, "n_examples": self.batch}

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
        separate: bool = False,
        progress: bool = True,
    ) -> PathPatchResult:
        """Path-patch each sender (on its own) to ``receivers``; see :func:`path_patch`."""
        sender_nodes = as_senders(self.nodes(senders))
        recv = self.nodes(receivers)
        groups = [[s] for s in sender_nodes]
        per_example = self.path_patch_groups(groups, recv, via=via, mlps=mlps, separate=separate, progress=progress)
        clean, corrupted = self._scores()
        return PathPatchResult(
            senders=[str(n) for n in sender_nodes],
            receivers=[str(r) for r in (recv if separate else as_receivers(recv))],
            per_example=per_example,
            clean=clean,
            corrupted=corrupted,
            grid=self._grid(sender_nodes),
            metric_name=self.readout.name,
            via=[str(n) for hop in via for n in self.nodes(hop)],
            separate=separate,
        )

    def path_patch_groups(
        self,
        groups: Sequence[Sequence[Node]],
        receivers: NodeSpec,
        *,
        via: Sequence[NodeSpec] = (),
        mlps: MLPMode = "live",
        separate: bool = False,
        progress: bool = True,
    ) -> Float[Tensor, "group batch"] | Float[Tensor, "group receiver batch"]:
        """Per-example metric of each group of senders patched jointly (``separate``: per receiver)."""
        recv, hops = self.nodes(receivers), [self.nodes(h) for h in via]
        with inference_mode(self.model):
            return paths.path_patch_rows(self.runs, self.readout, groups, recv, via=hops, mlps=mlps,
                                         separate=separate, progress=progress)

    # ------------------------------------------------------------------ activation patching
    def act_patch(
        self, nodes: NodeSpec = "all-heads", *, per_position: bool = False, progress: bool = True
    ) -> ActPatchResult:
        """Activation patching: run the corrupted input, put each node's clean activation
        back; see :func:`act_patch`."""
        node_list = actpatch.check_nodes(self.nodes(nodes))
        grid = self._grid(node_list)
        if per_position:
            node_list, grid = actpatch.per_position(node_list, grid, self.n_pos)
        clean, corrupted = self._scores()
        with inference_mode(self.model):
            values = actpatch.act_patch_rows(self.runs, self.readout, node_list, progress=progress)
        return ActPatchResult(
            senders=[str(n) for n in node_list],
            receivers=[],
            per_example=values,
            clean=clean,
            corrupted=corrupted,
            grid=grid,
            metric_name=self.readout.name,
        )

    # ------------------------------------------------------------------ circuits
    def edge_index(self, split_embed: bool = False) -> EdgeIndex:
        """The model's edge graph (``split_embed``: ``tok_embed`` and ``pos_embed`` senders)."""
        if split_embed not in self._index:
            self._index[split_embed] = EdgeIndex(self.bk, split_embed)
        return self._index[split_embed]

    def ablation(self, ablation: Ablation, reference_tokens: Any = None) -> AblationValues:
        """What an ablated edge carries (``reference_tokens``: run once, for ``"mean"``)."""
        return _ablation(self, ablation, reference_tokens)

    def evaluate_circuit(
        self,
        edges: EdgeSpec | Circuit,
        *,
        ablation: Ablation | None = None,
        reference_tokens: Int[Tensor, "n pos"] | None = None,
    ) -> CircuitResult:
        """A circuit hypothesis (edges, or a :class:`apexlens.Circuit` whose ablation is then
        the default) on the cached runs; see :func:`evaluate_circuit`."""
        if ablation is None:
            ablation = edges.ablation if isinstance(edges, Circuit) else "resample"
        index, keep, names = _keep_of(self, edges)
        return _circuit_result(self, index, keep, list(names), ablation, reference_tokens)

    def evaluate_keep(
        self,
        keep: Bool[Tensor, "sender receiver"] | Bool[Tensor, "sender receiver pos"],
        *,
        split_embed: bool = False,
        ablation: Ablation = "resample",
        reference_tokens: Int[Tensor, "n pos"] | None = None,
        incremental: bool = False,
    ) -> CircuitResult:
        """:meth:`evaluate_circuit` of a keep-matrix over :meth:`edge_index` (:meth:`EdgeIndex.keep`)
        for a caller changing it edge by edge (``incremental``: run from the first block whose
        receivers differ from the last such call's, :mod:`~.circuits.resume`, the same numbers)."""
        index = self.edge_index(split_embed)
        keep = _checked_keep(index, keep, self.n_pos)
        names = _keep_names(index, keep)
        return _circuit_result(self, index, keep, names, ablation, reference_tokens, incremental)

    def evaluate_circuits(
        self,
        hypotheses: Sequence[EdgeSpec],
        *,
        split_embed: bool = False,
        ablation: Ablation = "resample",
        reference_tokens: Int[Tensor, "n pos"] | None = None,
        progress: bool = True,
    ) -> Float[Tensor, "hypothesis batch"]:
        """Per-example metric of many hypotheses, each a row of one batched pass (the same
        numbers as :meth:`evaluate_circuit`'s ``scores`` for each)."""
        index = self.edge_index(split_embed)
        keeps = [index.keep(EdgeList(h), self.n_pos, self.named_positions) for h in hypotheses]
        if len({k.ndim for k in keeps}) > 1:
            keeps = [k if k.ndim == 3 else k[..., None].expand(*k.shape, self.n_pos) for k in keeps]
        return self.evaluate_keeps(torch.stack(keeps), self.ablation(ablation, reference_tokens),
                                   split_embed, progress)

    def evaluate_keeps(
        self, keeps: Tensor, abl: AblationValues, split_embed: bool = False, progress: bool = False
    ) -> Float[Tensor, "rows batch"]:
        """:meth:`evaluate_circuits` of keep-matrices over :meth:`edge_index` (the searches)."""
        with inference_mode(self.model):
            return circuits.circuit_rows(
                self.runs, self.readout, self.clean_tokens, self.edge_index(split_embed), keeps,
                abl, progress,
            )

    # ------------------------------------------------------------------ discovery
    def attribute_edges(
        self,
        *,
        method: str = "eap-ig",
        ig_steps: int = 5,
        edges: EdgeSpec | None = None,
        split_embed: bool = False,
        per_position: bool = False,
        ablation: Ablation = "resample",
        reference_tokens: Tensor | None = None,
        progress: bool = True,
    ) -> EdgeScores:
        """One signed score per edge; see :func:`apexlens.attribute_edges`."""
        if method not in attribution.METHODS:
            raise ApexlensError(
                f"method must be one of {', '.join(map(repr, attribution.METHODS))}, got "
                f"{method!r}"
            )
        m = attribution.METHODS[method]
        _gradients_possible(method, m.exact)
        options = m.check({"ig_steps": ig_steps})
        index = self.edge_index(split_embed)
        table, names = index.rows(edges, self.n_pos, self.named_positions, per_position)
        job = attribution.Job(
            self.runs, self.readout, index, self.ablation(ablation, reference_tokens), table,
            self.clean_values, options, progress,
        )
        with inference_mode(self.model):
            per_example = m.scores(job).detach()
        return EdgeScores(
            edges=names, scores=per_example.mean(-1), method=method, per_example=per_example,
            metric_name=self.readout.name, ablation=ablation, split_embed=split_embed,
        )

    def faithfulness(
        self,
        scores: EdgeScores,
        *,
        fractions: Sequence[float] = MIB_FRACTIONS,
        ablation: Ablation = "resample",
        reference_tokens: Tensor | None = None,
        absolute: bool = True,
        progress: bool = True,
    ) -> FaithfulnessResult:
        """The MIB faithfulness curve of an edge ranking; see :func:`apexlens.faithfulness`."""
        return search.faithfulness(
            self, scores, fractions, ablation, reference_tokens, absolute, progress
        )

    def discover(
        self,
        *,
        threshold: float,
        order: EdgeScores | None = None,
        edges: EdgeSpec | None = None,
        split_embed: bool = False,
        ablation: Ablation = "resample",
        reference_tokens: Tensor | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> DiscoveryResult:
        """Greedy exact pruning with ACDC's semantics; see :func:`apexlens.discover`."""
        return search.discover(
            self, threshold, order, edges, split_embed, ablation, reference_tokens, batch_size,
            progress,
        )


QUESTIONS = (
    "__init__", "path_patch", "path_patch_groups", "act_patch", "evaluate_circuit",
    "evaluate_circuits", "evaluate_keep", "evaluate_keeps", "attribute_edges", "faithfulness", "discover",
)
"""The Experiment's methods that run the model: under :func:`apexlens.sharded` each is one
guarded question (:class:`~apexlens.runs.shard.Guard`: a failure on any rank raises on all)."""
for _name in QUESTIONS:
    setattr(Experiment, _name, guarded(getattr(Experiment, _name)))


KEEPS_KEPT = 8
"""Edge lists whose keep-matrices :meth:`Experiment.evaluate_circuit` keeps (the latest ones)."""


def _keep_of(
    exp: Experiment, edges: Any
) -> tuple[EdgeIndex, Tensor, tuple[tuple[str, str], ...]]:
    """The edge graph, keep-matrix and edge spellings of an edge list, kept for the next
    evaluation of an equal list (of hashable pairs naming no positions: those read the
    named positions, which may change) -- a workbench or a search re-evaluating a
    hypothesis parses nothing again."""
    edge_list = EdgeList(edges)  # read once by everything below
    try:
        key: Any = _Pairs(edge_list.pairs)
    except TypeError:
        key = None
    memo: dict[Any, Any] = exp.__dict__.setdefault("_keeps", {})
    hit = None if key is None else memo.pop(key, None)
    if hit is None:
        index = exp.edge_index(uses_split_embed(edge_list))
        keep = index.keep(edge_list, exp.n_pos, exp.named_positions)
        hit = (index, keep, tuple(edge_names(edge_list)))
    if key is not None and hit[1].ndim == 2:
        memo[key] = hit  # the most recent last
        while len(memo) > KEEPS_KEPT:
            del memo[next(iter(memo))]
    return hit


class _Pairs:
    """An edge list as a dictionary key: its pairs, hashed once (unhashable: TypeError)."""

    __slots__ = ("pairs", "h")

    def __init__(self, pairs: list[Any]) -> None:
        self.pairs = tuple(pairs)
        self.h = hash(self.pairs)

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pairs) and self.h == other.h and self.pairs == other.pairs


def _gradients_possible(method: str, exact: bool) -> None:
    """A gradient method refuses to start inside ``torch.inference_mode()``."""
    if not exact and torch.is_inference_mode_enabled():
        raise ApexlensError(
            f"method={method!r} needs gradients, which torch.inference_mode() switches off: "
            "call it outside the torch.inference_mode() block (torch.no_grad() is fine), or "
            "use method='exact', which needs none"
        )


def _circuit_result(
    exp: Experiment,
    index: EdgeIndex,
    keep: Tensor,
    names: list[tuple[str, str]],
    ablation: Ablation,
    reference_tokens: Tensor | None,
    incremental: bool = False,
) -> CircuitResult:
    """The :class:`CircuitResult` of the hypothesis ``keep`` over ``index`` (its edges
    spelled ``names``): what :meth:`Experiment.evaluate_circuit` and
    :meth:`Experiment.evaluate_keep` return."""
    abl = exp.ablation(ablation, reference_tokens)
    empty_is_corrupted = ablation == "resample" and reference_tokens is None
    with inference_mode(exp.model):
        v = circuits.evaluate(
            exp.runs, exp.readout, exp.clean_tokens, index, keep, abl, empty_is_corrupted,
            incremental,
        )
    return CircuitResult(
        edges=names,
        scores=Scores(v.values),
        clean=Scores(v.clean),
        corrupted=Scores(v.ablated),
        recovery=v.recovery,
        ablation=ablation,
        kl_circuit=Scores(v.kl_circuit),
        kl_ablated=Scores(v.kl_ablated),
        meta=exp.meta,
    )


def _checked_keep(index: EdgeIndex, keep: Any, n_pos: int) -> Tensor:
    """A keep-matrix over ``index``, checked: boolean, ``[sender, receiver]`` or
    ``[sender, receiver, pos]``, and only where ``index.valid`` has edges."""
    shape = tuple(index.valid.shape)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape not in (
        shape, (*shape, n_pos)
    ):
        got = type(keep).__name__
        if isinstance(keep, Tensor):
            got = f"{tuple(keep.shape)} {keep.dtype}"
        raise ApexlensError(
            f"keep must be a boolean tensor of shape {shape} (senders x receivers of "
            f"edge_index()) or {(*shape, n_pos)} (per position), got {got}; build it with "
            "exp.edge_index().keep(edges, exp.n_pos, exp.named_positions)"
        )
    keep = keep.cpu()
    valid = index.valid if keep.ndim == 2 else index.valid[..., None]
    if bool((keep & ~valid).any()):
        i, j = (int(x) for x in (keep & ~valid).nonzero()[0, :2])
        raise ApexlensError(
            f"keep marks {index.senders[i]} -> {index.receivers[j]}, which is not an edge of "
            "this model's graph (edge_index().valid): the sender does not write before the "
            "receiver reads"
        )
    return keep


def _keep_names(index: EdgeIndex, keep: Tensor) -> list[tuple[str, str]]:
    """The edges of a keep-matrix, sender-major: ``("0.1", "1.3.k")`` where an edge is kept
    at every position, else one ``("0.1@p", "1.3.k@p")`` per position ``p`` it is kept at."""
    s = [n.name for n in index.senders]
    r = [n.name for n in index.receivers]
    if keep.ndim == 2:
        return [(s[i], r[j]) for i, j in keep.nonzero().tolist()]
    every = keep.all(-1)
    partial = keep & ~every[..., None]
    out = {(i, j, -1): (s[i], r[j]) for i, j in every.nonzero().tolist()}
    out |= {(i, j, p): (f"{s[i]}@{p}", f"{r[j]}@{p}") for i, j, p in partial.nonzero().tolist()}
    return [out[k] for k in sorted(out)]


def _budget(memory_budget: Any) -> int:
    """The memory budget, checked: bytes (a positive integer), or ``None`` for the default."""
    if memory_budget is None:
        return 0
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ApexlensError(
            f"memory_budget must be a positive number of bytes (an int), or None for the "
            f"default; got {memory_budget!r}"
        )
    return memory_budget


def _ablation(exp: Experiment, ablation: Ablation, reference_tokens: Any) -> AblationValues:
    """:meth:`Experiment.ablation`; without reference tokens the values depend on the cached
    runs only, and are kept with them for the next call."""
    key = f"ablation:{ablation}"
    if reference_tokens is None and key in exp.runs.scratch:
        return exp.runs.scratch[key]
    with inference_mode(exp.model):
        values = ablation_for(exp.bk, ablation, exp.runs.corrupted, reference_tokens, exp.n_pos)
    if reference_tokens is None:
        exp.runs.scratch[key] = values
    return values
