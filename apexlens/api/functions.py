"""The one-shot functions: build an :class:`~apexlens.api.experiment.Experiment`, ask one
question. For many questions on the same data, build the Experiment once.

The discovery functions (:func:`attribute_edges`, :func:`faithfulness`, :func:`discover`)
also take an Experiment in place of the model (the token arguments are then ignored), as they
always have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxtyping import Int
from torch import Tensor

from apexlens.api.experiment import Experiment
from apexlens.errors import ApexlensError
from apexlens.results import (
    MIB_FRACTIONS,
    ActPatchResult,
    CircuitResult,
    DiscoveryResult,
    EdgeScores,
    FaithfulnessResult,
    PathPatchResult,
)
from apexlens.runs import MetricFn
from apexlens.runs.shard import guarded
from apexlens.vocab import Ablation, Circuit, EdgeSpec, MLPMode, NodeSpec


@guarded
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
    separate: bool = False,
    progress: bool = True,
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
        separate: one value per receiver (each receiver node patched alone, the others
            left clean; a head spelled ``"1.4"`` is one receiver, its q, k and v together),
            instead of one for the receivers patched together.

    Receivers at positions (``"9.9.q@end"``) are computed only where they can matter: the
    senders' effects at those positions, then the network from the receivers' layer over
    the positions from the earliest patched one on (a ``HookedTransformer``; a bridge runs
    every position), the same numbers as patching every position of the receivers'
    inputs at those positions only.

    Returns:
        A :class:`PathPatchResult`; ``.values`` is ``[n_layers, n_heads]`` for all heads
        (``[n_layers, n_heads, n_receivers]`` with ``separate``). A sender with no path to a
        receiver keeps the clean metric.
    """
    exp = Experiment(
        model,
        clean_tokens,
        corrupted_tokens,
        metric=metric,
        positions=positions,
        memory_budget=memory_budget,
    )
    return exp.path_patch(
        senders, receivers, via=via, mlps=mlps, separate=separate, progress=progress
    )


@guarded
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
    progress: bool = True,
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


@guarded
def evaluate_circuit(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    edges: EdgeSpec | Circuit,
    *,
    metric: MetricFn,
    ablation: Ablation | None = None,
    reference_tokens: Int[Tensor, "n pos"] | None = None,
    positions: Mapping[str, Any] | None = None,
) -> CircuitResult:
    """Evaluate a circuit hypothesis given as ``(sender, receiver)`` edges.

    Every edge outside the set carries its ablated value (``"resample"``, the default: the
    corrupted run; ``"mean"``: the mean over ``reference_tokens``, default the corrupted
    tokens; ``"zero"``), every edge inside carries the value computed from the circuit
    (``edges`` may be an :class:`apexlens.Circuit`, whose ablation is then the default).
    Each choice asks a different question:
    :attr:`~apexlens.CircuitResult.ablation_meaning` says which. Use
    :func:`apexlens.graph.full_graph` for all edges of a model. For many hypotheses on the
    same data, build an :class:`Experiment` once and call its ``evaluate_circuit``.
    """
    exp = Experiment(model, clean_tokens, corrupted_tokens, metric=metric, positions=positions)
    return exp.evaluate_circuit(edges, ablation=ablation, reference_tokens=reference_tokens)


# ============================================================================ interactive


def _experiment(
    model: Any,
    clean_tokens: Tensor | None,
    corrupted_tokens: Tensor | None,
    metric: MetricFn,
    positions: Mapping[str, Any] | None,
    memory_budget: int | None,
) -> Experiment:
    """``model`` itself when it is an Experiment (same metric), else a new one."""
    if isinstance(model, Experiment):
        if metric is not model.readout.metric:
            raise ApexlensError(
                "an Experiment brings its own metric: pass metric=exp.readout.metric (or the "
                "model instead of the Experiment), or call exp.attribute_edges(...) directly"
            )
        return model
    if clean_tokens is None or corrupted_tokens is None:
        raise ApexlensError(
            "give clean and corrupted tokens (or an apexlens.Experiment instead of the model)"
        )
    return Experiment(
        model,
        clean_tokens,
        corrupted_tokens,
        metric=metric,
        positions=positions,
        memory_budget=memory_budget,
    )


@guarded
def attribute_edges(
    model: Any,
    clean_tokens: Tensor | None,
    corrupted_tokens: Tensor | None,
    *,
    metric: MetricFn,
    method: str = "eap-ig",
    ig_steps: int = 5,
    edges: EdgeSpec | None = None,
    split_embed: bool = False,
    per_position: bool = False,
    ablation: Ablation = "resample",
    reference_tokens: Tensor | None = None,
    positions: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
) -> EdgeScores:
    """One signed score per edge: the change of the mean metric when that edge alone is
    ablated (``"exact"``), or its gradient estimate (``"eap"``, ``"eap-ig"``); the methods
    are :data:`apexlens.engines.attribution.METHODS`.

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
    """
    exp = _experiment(model, clean_tokens, corrupted_tokens, metric, positions, memory_budget)
    return exp.attribute_edges(
        method=method,
        ig_steps=ig_steps,
        edges=edges,
        split_embed=split_embed,
        per_position=per_position,
        ablation=ablation,
        reference_tokens=reference_tokens,
        progress=progress,
    )


@guarded
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
    progress: bool = True,
) -> FaithfulnessResult:
    """The MIB faithfulness curve of an edge ranking: for each fraction ``q`` the circuit of
    the top ``int(q * n_edges)`` edges by ``|score|`` (``absolute=False``: by signed score),
    evaluated exactly; ``f = (m(circuit) - m(empty)) / (m(full) - m(empty))``, ``.cpr`` and
    ``.cmd`` its areas (see :class:`~apexlens.results.FaithfulnessResult`)."""
    exp = _experiment(model, clean_tokens, corrupted_tokens, metric, positions, memory_budget)
    return exp.faithfulness(
        scores,
        fractions=fractions,
        ablation=ablation,
        reference_tokens=reference_tokens,
        absolute=absolute,
        progress=progress,
    )


@guarded
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
    progress: bool = True,
) -> DiscoveryResult:
    """Greedy exact pruning with ACDC's semantics (:mod:`apexlens.api.search`).

    Receivers are visited from the logits backwards; each incoming edge (smallest ``|score|``
    of ``order`` first, else the latest sender first) is removed when the mean metric of the
    current circuit moves by less than ``threshold`` (absolute, in the metric's units). A
    component whose outputs all have been removed keeps no inputs (removing them cannot
    change the metric). ``edges`` is the starting graph (default: every edge).

    Returns a :class:`~apexlens.results.DiscoveryResult`: the kept edges, their circuit's
    recovery and proportion explained, and every decision taken.
    """
    exp = _experiment(model, clean_tokens, corrupted_tokens, metric, positions, memory_budget)
    return exp.discover(
        threshold=threshold,
        order=order,
        edges=edges,
        split_embed=split_embed,
        ablation=ablation,
        reference_tokens=reference_tokens,
        batch_size=batch_size,
        progress=progress,
    )
