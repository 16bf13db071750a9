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

The same hooks power :func:`patched`: ``with apexlens.patched(model, Circuit(edges), corrupted):``
any forward pass of the model inside the block runs under the hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.backend import ApexlensError, Backend, backend_for
from apexlens.graph import Node, NodeSpec, as_receivers, parse_node, validate
from apexlens.hooks import HookFn, attached, inference_mode
from apexlens.patching import Experiment, MLPMode, Run, cached_run, patched_paths
from apexlens.scoring import Scores

Ablation = Literal["resample", "mean", "zero"]
EdgeSpec = Iterable[tuple[Any, Any]]


# ============================================================================ edge index
class EdgeIndex:
    """Numbering of a model's senders and receivers, and edge sets as boolean matrices."""

    def __init__(self, bk: Backend):
        d = bk.dims
        self.dims = d
        self.senders: list[Node] = [Node("embed")]
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
        so = torch.tensor([n.order(d.n_layers) for n in self.senders])
        ro = torch.tensor([n.order(d.n_layers) for n in self.receivers])
        self.valid: Bool[Tensor, "sender receiver"] = so[:, None] < ro[None, :]

    @staticmethod
    def _key(n: Node) -> tuple:
        return (n.kind, n.layer, n.head, n.channel)

    def mask(self, edges: EdgeSpec) -> Bool[Tensor, "sender receiver"]:
        """The circuit's edges as a ``[n_senders, n_receivers]`` matrix."""
        keep = torch.zeros_like(self.valid)
        for pair in edges:
            try:
                s_spec, r_spec = pair
            except (TypeError, ValueError):
                raise ApexlensError(f"an edge is a (sender, receiver) pair, got {pair!r}") from None
            s = validate(parse_node(s_spec), self.dims)
            if s.positions is not None:
                raise ApexlensError(f"edge {s} -> {r_spec}: circuit edges act on all positions")
            if s.kind == "logits" or (s.kind == "head" and s.channel is not None):
                raise ApexlensError(f"edge {s} -> {r_spec}: {s} cannot send")
            for r in as_receivers([validate(parse_node(r_spec), self.dims)]):
                if r.positions is not None:
                    raise ApexlensError(f"edge {s} -> {r}: circuit edges act on all positions")
                i, j = self._s[self._key(s)], self._r[self._key(r)]
                if not self.valid[i, j]:
                    raise ApexlensError(
                        f"edge {s} -> {r} goes backwards: receiver {r} comes before (or in the same "
                        f"layer as) sender {s}"
                    )
                keep[i, j] = True
        return keep


# ============================================================================ ablation values
@dataclass
class AblationValues:
    """What each sender outputs when an edge from it is ablated."""

    embed: Float[Tensor, "batch pos d_model"]
    z: list[Float[Tensor, "batch pos head d_head"]]
    mlp_out: list[Float[Tensor, "batch pos d_model"]]


def ablation_values(
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
def circuit_hooks(
    bk: Backend, index: EdgeIndex, keep: Bool[Tensor, "sender receiver"], abl: AblationValues
) -> list[tuple[str, HookFn]]:
    """Hooks that make any forward pass of the model run under the circuit ``keep``."""
    d = bk.dims
    excluded = (index.valid & ~keep).to(bk.device)
    state: dict[str, Any] = {}

    def D(n_up: int) -> Tensor:
        return state["D"][:n_up]

    def embed_hook(act: Tensor, hook: Any) -> None:
        S = len(index.senders)
        state["D"] = act.new_zeros(S, *act.shape)
        state["D"][0] = act - abl.embed
        state[bk.resid_pre(0)] = act

    def saver(name: str) -> HookFn:
        def save(act: Tensor, hook: Any) -> None:
            state[name] = act

        return save

    W_O = bk.W_O_stacked
    hooks: list[tuple[str, HookFn]] = [(bk.resid_pre(0), embed_hook)]
    for layer in range(d.n_layers):
        n_up_attn = index.head_sender[layer].start
        if layer > 0:
            hooks.append((bk.resid_pre(layer), saver(bk.resid_pre(layer))))
        for ch in "qkv":
            sl = index.head_receiver[(layer, ch)]
            ex = excluded[:n_up_attn, sl]
            if not ex.any():
                continue
            heads = ex.any(0).nonzero().flatten()

            def qkv_hook(
                act: Tensor,
                hook: Any,
                layer: int = layer,
                ch: str = ch,
                ex: Tensor = ex,
                heads: Tensor = heads,
            ) -> Tensor:
                delta = torch.einsum("sbpd,sh->bphd", D(ex.shape[0]), ex[:, heads].to(act.dtype))
                resid = state[bk.resid_pre(layer)][:, :, None, :] - delta
                W = bk.W_in(ch)[layer, heads]
                b = bk.b_in(ch)[layer, heads]
                new = torch.einsum("bphm,hmd->bphd", bk.ln1(layer, resid), W) + b
                act = act.clone()
                act[:, :, heads] = new
                return act

            hooks.append((bk.qkv(layer, ch), qkv_hook))

        def z_hook(act: Tensor, hook: Any, layer: int = layer) -> None:
            sl = index.head_sender[layer]
            state["D"][sl] = torch.einsum("bphk,hkd->hbpd", act - abl.z[layer], W_O[layer])

        hooks.append((bk.z(layer), z_hook))
        if d.has_mlps:
            hooks.append((bk.resid_mid(layer), saver(bk.resid_mid(layer))))
            i_mlp = index.mlp_sender[layer]
            ex_m = excluded[:i_mlp, index.mlp_receiver[layer]]

            def mlp_hook(
                act: Tensor, hook: Any, layer: int = layer, i_mlp: int = i_mlp, ex_m: Tensor = ex_m
            ) -> Tensor:
                if ex_m.any():
                    delta = torch.einsum("sbpd,s->bpd", D(i_mlp), ex_m.to(act.dtype))
                    act = bk.mlp_from_resid(layer, state[bk.resid_mid(layer)] - delta)
                state["D"][i_mlp] = act - abl.mlp_out[layer]
                return act

            hooks.append((bk.mlp_out(layer), mlp_hook))
    ex_l = excluded[:, index.logits]
    if ex_l.any():

        def logits_hook(act: Tensor, hook: Any) -> Tensor:
            return act - torch.einsum("sbpd,s->bpd", state["D"], ex_l.to(act.dtype))

        hooks.append((bk.resid_post(d.n_layers - 1), logits_hook))
    return hooks


# ============================================================================ evaluation
@dataclass
class CircuitResult:
    """The metric under a circuit hypothesis, with its recovery and proportion explained."""

    edges: list[tuple[str, str]]
    scores: Scores
    clean: Scores
    corrupted: Scores
    """The metric with every edge ablated (for resample ablation: the corrupted run)."""
    recovery: float
    proportion_explained: float
    aue: float
    ate: float
    ablation: str = "resample"

    def summary(self) -> dict[str, float]:
        return {
            "n_edges": float(len(self.edges)),
            "metric": float(self.scores.mean),
            "clean": float(self.clean.mean),
            "ablated": float(self.corrupted.mean),
            "recovery": self.recovery,
            "proportion_explained": self.proportion_explained,
            "aue": self.aue,
            "ate": self.ate,
        }


def _kl(clean_resid: Tensor, resid: Tensor, exp: Experiment) -> Float[Tensor, " batch"]:
    lp_c = F.log_softmax(exp.bk.unembed(exp.readout.gather(clean_resid)), -1)
    lp = F.log_softmax(exp.bk.unembed(exp.readout.gather(resid)), -1)
    return (lp_c.exp() * (lp_c - lp)).sum(-1).mean(-1)


def run_circuit(
    exp: Experiment,
    keep: Bool[Tensor, "sender receiver"],
    ablation: Ablation = "resample",
    reference_tokens: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream of the clean input under the circuit ``keep``."""
    bk = exp.bk
    index = _index(exp)
    abl = _ablation(exp, ablation, reference_tokens)
    with inference_mode(exp.model):
        final, _ = bk.run_with_cache(
            exp.clean_tokens.to(bk.device),
            [],
            fwd_hooks=circuit_hooks(bk, index, keep, abl),
            logits=False,
        )
    return final


def _index(exp: Experiment) -> EdgeIndex:
    if not hasattr(exp, "_edge_index"):
        exp._edge_index = EdgeIndex(exp.bk)  # type: ignore[attr-defined]
    return exp._edge_index  # type: ignore[attr-defined]


def _ablation(
    exp: Experiment, ablation: Ablation, reference_tokens: Tensor | None
) -> AblationValues:
    reference = None
    if reference_tokens is not None:
        if reference_tokens.ndim != 2 or reference_tokens.shape[1] != exp.n_pos:
            raise ApexlensError(
                f"reference tokens must be [n, {exp.n_pos}] like the clean tokens, got "
                f"{tuple(reference_tokens.shape)}"
            )
        with inference_mode(exp.model):
            reference = cached_run(exp.bk, reference_tokens)
    return ablation_values(exp.bk, ablation, exp.corrupted, reference)


def evaluate_edges(
    exp: Experiment,
    edges: EdgeSpec,
    *,
    ablation: Ablation = "resample",
    reference_tokens: Tensor | None = None,
) -> CircuitResult:
    """Evaluate a circuit on an :class:`~apexlens.patching.Experiment` (cached runs reused)."""
    with inference_mode(exp.model):
        return _evaluate_edges(exp, list(edges), ablation, reference_tokens)


def _evaluate_edges(
    exp: Experiment,
    edge_list: list[tuple[Any, Any]],
    ablation: Ablation,
    reference_tokens: Tensor | None,
) -> CircuitResult:
    index = _index(exp)
    keep = index.mask(edge_list)
    final = run_circuit(exp, keep, ablation, reference_tokens)
    values = exp.readout(exp.readout.gather(final))
    if ablation == "resample" and reference_tokens is None:
        empty_final, empty_values = exp.corrupted.final, exp.corrupted_values
    else:
        empty_final = run_circuit(exp, torch.zeros_like(keep), ablation, reference_tokens)
        empty_values = exp.readout(exp.readout.gather(empty_final))
    aue = float(_kl(exp.clean.final, final, exp).mean())
    ate = float(_kl(exp.clean.final, empty_final, exp).mean())
    gap = float(exp.clean_values.mean() - empty_values.mean())
    if gap == 0:
        raise ApexlensError("clean and fully ablated metrics are equal: recovery is undefined")
    return CircuitResult(
        edges=[(str(parse_node(s)), str(parse_node(r))) for s, r in edge_list],
        scores=Scores(values),
        clean=Scores(exp.clean_values),
        corrupted=Scores(empty_values),
        recovery=float((values.mean() - empty_values.mean()) / gap),
        proportion_explained=1.0 - aue / ate if ate > 0 else float("nan"),
        aue=aue,
        ate=ate,
        ablation=ablation,
    )


def evaluate_circuit(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    edges: EdgeSpec,
    *,
    metric: Any,
    ablation: Ablation = "resample",
    reference_tokens: Int[Tensor, "n pos"] | None = None,
    positions: Mapping[str, Any] | None = None,
) -> CircuitResult:
    """Evaluate a circuit hypothesis given as ``(sender, receiver)`` edges.

    Every edge outside the set carries its ablated value (``"resample"``: the corrupted run;
    ``"mean"``: the mean over ``reference_tokens``, default the corrupted tokens; ``"zero"``),
    every edge inside carries the value computed from the circuit. Use
    :func:`apexlens.graph.full_graph` for all edges of a model. For many hypotheses on the
    same data, build an :class:`~apexlens.patching.Experiment` once and call its
    ``evaluate_circuit``.
    """
    exp = Experiment(model, clean_tokens, corrupted_tokens, metric=metric, positions=positions)
    return evaluate_edges(exp, edges, ablation=ablation, reference_tokens=reference_tokens)


# ============================================================================ interactive
@dataclass(frozen=True)
class Paths:
    """A path-patching spec for :func:`patched`: senders patched jointly along their paths."""

    senders: NodeSpec
    receivers: NodeSpec = "logits"
    mlps: MLPMode = "live"


@dataclass(frozen=True)
class Circuit:
    """A circuit-hypothesis spec for :func:`patched`."""

    edges: tuple[tuple[Any, Any], ...]
    ablation: Ablation = "resample"

    def __init__(self, edges: EdgeSpec, ablation: Ablation = "resample"):
        object.__setattr__(self, "edges", tuple(tuple(e) for e in edges))
        object.__setattr__(self, "ablation", ablation)


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

    The hooks are removed when the block ends, also after an exception.
    """
    bk = backend_for(model)
    if isinstance(spec, Paths):
        with patched_paths(
            model,
            corrupted_tokens,
            senders=spec.senders,
            receivers=spec.receivers,
            mlps=spec.mlps,
            positions=positions,
        ):
            yield model
        return
    if not isinstance(spec, Circuit):
        raise ApexlensError(
            f"patched() takes apexlens.Paths or apexlens.Circuit, got {type(spec).__name__}"
        )
    index = EdgeIndex(bk)
    keep = index.mask(spec.edges)
    with inference_mode(model):
        corrupted = cached_run(bk, corrupted_tokens)
        reference = cached_run(bk, reference_tokens) if reference_tokens is not None else None
    abl = ablation_values(bk, spec.ablation, corrupted, reference)
    with attached(model, circuit_hooks(bk, index, keep, abl)):
        yield model
