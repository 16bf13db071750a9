"""Path patching and activation patching, exact and batched.

**Path patching** (Wang et al. 2022, appendix B; Goldowsky-Dill et al. 2023) asks how much
of a behaviour flows along the paths from a *sender* to a set of *receivers*. In the
clean run, the sender's output is replaced by its value on the corrupted run *only along
the paths into the receivers*: every other attention head is frozen at its clean output on
the way, MLPs on the way recompute (``mlps="live"``, the IOI/ARENA default) or are frozen
too (``mlps="frozen"``, the strict direct edge). The receivers' inputs are replaced by what
they received along those paths, and their changed outputs flow through the rest of the
network normally to the logits.

**The one mechanism.** Everything here is a *residual delta*: a sender ``s`` adds
``delta_s = out_s(corrupted) - out_s(clean)`` to the residual stream where it writes. With
attention frozen, a delta never moves between positions; only MLPs change it, position by
position. So the engine

1. runs the clean and corrupted inputs once and caches what it needs;
2. stacks every sender's delta as one batch (chunked to a memory budget) and walks it
   through the layers, recomputing only the MLPs (*frozen propagation*), and only at the
   positions that matter (with ``logits`` as the only receiver: the positions the metric
   reads);
3. computes each receiver's new input from ``resid_clean + delta`` (a head's q/k/v through
   ``ln1`` and ``W_Q``/``W_K``/``W_V``; an MLP's output; the final residual);
4. runs the network normally from the first receiver's layer with the receivers' inputs
   substituted at ``hook_q``/``hook_k``/``hook_v``/``hook_mlp_out`` (*normal phase*).

Multi-hop paths ``s -> m -> r`` (``via=[m]``, treeified semantics of Goldowsky-Dill et al.)
reuse step 2: the change of ``m``'s output, caused only by ``s``'s delta arriving at ``m``'s
input, becomes the delta that travels on to ``r``.

**Activation patching** of nodes is the special case with no freezing: run the corrupted
input, put a node's clean activation back, and let everything downstream recompute
(TransformerLens' ``get_act_patch_*`` convention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apexlens.backend import ApexlensError, Backend, backend_for
from apexlens.graph import Node, NodeSpec, as_receivers, as_senders, parse_nodes, position_mask
from apexlens.hooks import HookFn, attached, inference_mode
from apexlens.scoring import Metric, Scores

MLPMode = Literal["live", "frozen"]


# ============================================================================ readout
class Readout:
    """Final residual streams -> per-example metric values, computing only what is read.

    A :class:`~apexlens.scoring.Metric` declares the positions and vocabulary columns it
    reads, so the engine gathers those positions and unembeds only those columns. Any
    other callable gets full logits ``[batch, pos, vocab]``, one run at a time.
    """

    def __init__(self, bk: Backend, metric: Callable[[Tensor], Tensor], batch: int, n_pos: int):
        if not callable(metric):
            raise ApexlensError(f"metric must be callable (logits -> [batch]), got {metric!r}")
        self.bk, self.metric, self.batch, self.n_pos = bk, metric, batch, n_pos
        self.fast = isinstance(metric, Metric)
        device = bk.device
        if isinstance(metric, Metric):
            self.idx: Int[Tensor, "batch k"] = metric.read_positions(batch, n_pos).to(device)
            self.tokens = None if metric.tokens is None else metric.tokens.to(device)
        else:
            self.idx = torch.arange(n_pos, device=device).expand(batch, n_pos)
            self.tokens = None
        self.name = getattr(metric, "name", type(metric).__name__)

    @property
    def all_positions(self) -> bool:
        return self.idx.shape[1] == self.n_pos and bool(
            (self.idx == torch.arange(self.n_pos, device=self.idx.device)).all()
        )

    def gather(self, x: Float[Tensor, "*lead batch pos d"]) -> Float[Tensor, "*lead batch k d"]:
        """The positions the metric reads."""
        lead = x.shape[:-3]
        idx = self.idx.view(*([1] * len(lead)), *self.idx.shape, 1)
        return x.gather(-2, idx.expand(*lead, *self.idx.shape, x.shape[-1]))

    def __call__(
        self, resid: Float[Tensor, "*lead batch k d_model"]
    ) -> Float[Tensor, "*lead batch"]:
        """Metric values from final residual streams already gathered at the read positions."""
        logits = self.bk.unembed(resid, self.tokens)
        if isinstance(self.metric, Metric):
            values = self.metric.reduce(logits)
        else:
            flat = logits.reshape(-1, *logits.shape[-3:])
            values = torch.stack([torch.as_tensor(self.metric(lg)) for lg in flat])
            values = values.reshape(*logits.shape[:-2])
        values = values.to(resid.dtype) if values.is_floating_point() else values.to(resid.dtype)
        expected = resid.shape[:-2]
        if values.shape != expected:
            raise ApexlensError(
                f"metric {self.name} returned shape {tuple(values.shape)}; expected one value per "
                f"example {tuple(expected)}"
            )
        if not torch.isfinite(values).all():
            raise ApexlensError(f"metric {self.name} returned NaN or inf")
        return values


# ============================================================================ runs
def _check_tokens(bk: Backend, clean: Tensor, corrupted: Tensor | None) -> None:
    for name, t in (("clean_tokens", clean), ("corrupted_tokens", corrupted)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.ndim != 2 or t.is_floating_point():
            raise ApexlensError(
                f"{name} must be an integer tensor [batch, pos], got {_describe(t)}"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bk.model.cfg.d_vocab):
            raise ApexlensError(
                f"{name} holds token ids outside the vocabulary (0..{bk.model.cfg.d_vocab - 1})"
            )
        if t.shape[1] > bk.dims.n_ctx:
            raise ApexlensError(
                f"{name} has {t.shape[1]} positions; the model's context is {bk.dims.n_ctx}"
            )
    if corrupted is not None and clean.shape != corrupted.shape:
        raise ApexlensError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} must "
            "have the same shape"
        )


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _cache_names(bk: Backend) -> list[str]:
    names = [bk.resid_pre(0)]
    for layer in range(bk.dims.n_layers):
        names += [bk.resid_pre(layer), bk.z(layer), *(bk.qkv(layer, c) for c in "qkv")]
        if bk.dims.has_mlps:
            names += [bk.resid_mid(layer), bk.mlp_out(layer)]
    return names


@dataclass
class Run:
    """What one forward pass left behind: activations by hook name and the final residual."""

    acts: dict[str, Tensor]
    final: Float[Tensor, "batch pos d_model"]

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]


def cached_run(bk: Backend, tokens: Tensor) -> Run:
    final, acts = bk.run_with_cache(tokens.to(bk.device), _cache_names(bk), logits=False)
    return Run(acts, final)


# ============================================================================ results
@dataclass
class PathPatchResult:
    """Per-sender metric values of a path-patching (or activation-patching) sweep."""

    senders: list[str]
    receivers: list[str]
    per_example: Float[Tensor, "sender batch"]
    clean: Scores
    corrupted: Scores
    grid: tuple[int, int] | None = None
    metric_name: str = "metric"
    via: list[str] = field(default_factory=list)

    @property
    def values(self) -> Tensor:
        """Mean metric per sender; ``[n_layers, n_heads]`` when the senders are all heads."""
        v = self.per_example.mean(-1)
        return v.reshape(self.grid) if self.grid else v

    def normalized(self) -> Tensor:
        """``(patched - clean) / (clean - corrupted)``: 0 = no effect, -1 = the whole effect."""
        gap = self.clean.mean - self.corrupted.mean
        if gap == 0:
            raise ApexlensError("clean and corrupted metrics are equal; normalisation is undefined")
        return (self.values - self.clean.mean) / gap

    def scores(self, sender: str | int) -> Scores:
        i = self.senders.index(sender) if isinstance(sender, str) else sender
        return Scores(self.per_example[i])

    def to_frame(self) -> pd.DataFrame:
        rows = []
        norm = self.normalized().flatten()
        for i, s in enumerate(self.senders):
            sc = self.scores(i)
            lo, hi = sc.ci()
            node = parse_node_safe(s)
            rows.append(
                {
                    "sender": s,
                    "layer": node.layer if node and node.kind in ("head", "mlp") else None,
                    "head": node.head if node else None,
                    "value": float(sc.mean),
                    "normalized": float(norm[i]),
                    "sem": float(sc.sem),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                }
            )
        return pd.DataFrame(rows)


def parse_node_safe(s: str) -> Node | None:
    from apexlens.graph import parse_node

    try:
        return parse_node(s)
    except ApexlensError:
        return None


# ============================================================================ engine
SenderGroup = Sequence[Node]


class Experiment:
    """A model with a clean and a corrupted input, run once; every patch is computed on top.

    Build one to test many hypotheses on the same data without re-running the clean and
    corrupted passes::

        exp = apexlens.Experiment(model, clean_tokens, corrupted_tokens, metric=logit_diff)
        exp.path_patch(senders="all-heads", receivers="logits")
        exp.path_patch(senders="all-heads", receivers=["9.9.q", "9.6.q"])
        exp.evaluate_circuit(edges)
    """

    def __init__(
        self,
        model: Any,
        clean_tokens: Int[Tensor, "batch pos"],
        corrupted_tokens: Int[Tensor, "batch pos"],
        *,
        metric: Callable[[Tensor], Tensor],
        positions: Mapping[str, Any] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.bk = backend_for(model)
        _check_tokens(self.bk, clean_tokens, corrupted_tokens)
        self.model = model
        self.clean_tokens, self.corrupted_tokens = clean_tokens, corrupted_tokens
        self.batch, self.n_pos = (int(s) for s in clean_tokens.shape)
        self.named_positions = dict(positions or {})
        self.memory_budget = memory_budget or self._default_budget()
        self.readout = Readout(self.bk, metric, self.batch, self.n_pos)
        with inference_mode(model):
            self.clean = cached_run(self.bk, clean_tokens)
            self.corrupted = cached_run(self.bk, corrupted_tokens)
            self.clean_values = self.readout(self.readout.gather(self.clean.final))
            self.corrupted_values = self.readout(self.readout.gather(self.corrupted.final))

    # ------------------------------------------------------------------ helpers
    def nodes(self, spec: NodeSpec) -> list[Node]:
        return parse_nodes(spec, self.bk.dims)

    def mask(self, node: Node) -> Bool[Tensor, "batch pos"] | None:
        return position_mask(node, self.batch, self.n_pos, self.named_positions, self.bk.device)

    def _order(self, node: Node) -> int:
        return node.order(self.bk.dims.n_layers)

    def sender_delta(self, node: Node) -> Float[Tensor, "batch pos d_model"]:
        """``out(corrupted) - out(clean)`` of a sender, zero outside its positions."""
        bk, c, k = self.bk, self.clean, self.corrupted
        if node.kind == "embed":
            d = k[bk.resid_pre(0)] - c[bk.resid_pre(0)]
        elif node.kind == "head":
            dz = k[bk.z(node.layer)][:, :, node.head] - c[bk.z(node.layer)][:, :, node.head]
            d = dz @ bk.W_O_stacked[node.layer, node.head]
        else:
            d = k[bk.mlp_out(node.layer)] - c[bk.mlp_out(node.layer)]
        m = self.mask(node)
        return d if m is None else d * m[..., None].to(d.dtype)

    def _chunk_size(self, n_rows: int, full_positions: bool) -> int:
        """Rows (senders) per batch so that one batch's working set stays within the budget."""
        d = self.bk.dims
        d_mlp = int(getattr(self.bk.model.cfg, "d_mlp", None) or 4 * d.d_model)
        per_tok = (10 * d.d_model + 2 * d_mlp + 4 * d.n_heads * d.d_head) * self.bk.dtype.itemsize
        n_tok = self.batch * (self.n_pos if full_positions else self.readout.idx.shape[1])
        attn = self.batch * d.n_heads * self.n_pos * self.n_pos * 3 * self.bk.dtype.itemsize
        per_row = n_tok * per_tok + (attn if full_positions else 0)
        return max(1, min(n_rows, self.memory_budget // max(per_row, 1)))

    def _default_budget(self) -> int:
        """Half of what a plain ``run_with_cache`` of the clean batch holds (at least 16 MiB)."""
        d = self.bk.dims
        d_mlp = int(getattr(self.bk.model.cfg, "d_mlp", None) or 4 * d.d_model)
        n_tok = self.batch * self.n_pos
        per_layer = (
            n_tok * (12 * d.d_model + 2 * d_mlp) + 2 * self.batch * d.n_heads * self.n_pos**2
        )
        cache = (d.n_layers * per_layer + n_tok * d.d_vocab) * self.bk.dtype.itemsize
        return max(16 * 2**20, cache // 2)

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
        groups = [[s] for s in sender_nodes]
        per_example = self.path_patch_groups(
            groups, receivers, via=via, mlps=mlps, progress=progress
        )
        all_heads = (
            len(sender_nodes) == self.bk.dims.n_layers * self.bk.dims.n_heads
            and all(n.kind == "head" and n.positions is None for n in sender_nodes)
            and [(n.layer, n.head) for n in sender_nodes]
            == [(la, h) for la in range(self.bk.dims.n_layers) for h in range(self.bk.dims.n_heads)]
        )
        return PathPatchResult(
            senders=[str(n) for n in sender_nodes],
            receivers=[str(r) for r in as_receivers(self.nodes(receivers))],
            per_example=per_example,
            clean=Scores(self.clean_values),
            corrupted=Scores(self.corrupted_values),
            grid=(self.bk.dims.n_layers, self.bk.dims.n_heads) if all_heads else None,
            metric_name=self.readout.name,
            via=[str(n) for hop in via for n in self.nodes(hop)],
        )

    def path_patch_groups(
        self,
        groups: Sequence[SenderGroup],
        receivers: NodeSpec,
        *,
        via: Sequence[NodeSpec] = (),
        mlps: MLPMode = "live",
        progress: bool = False,
    ) -> Float[Tensor, "group batch"]:
        """Per-example metric when each group of senders is patched (jointly) to the receivers."""
        if mlps not in ("live", "frozen"):
            raise ApexlensError(f"mlps must be 'live' or 'frozen', got {mlps!r}")
        recv = as_receivers(self.nodes(receivers))
        hops = [as_receivers(self.nodes(h)) for h in via]
        for hop in hops:
            comps = {(n.kind, n.layer, n.head) for n in hop}
            if len(comps) != 1 or hop[0].kind not in ("head", "mlp"):
                raise ApexlensError(
                    f"each 'via' hop must be one head (or one of its q/k/v inputs) or one MLP, got "
                    f"{[str(n) for n in hop]}"
                )
        # order checks: sender -> hop1 -> ... -> receivers
        first_targets = hops[0] if hops else recv
        chain_ok = True
        prev_out = None
        for hop in hops:
            hop_out = self._order(hop[0].as_sender)
            if prev_out is not None and prev_out >= self._order(hop[0]):
                chain_ok = False
            prev_out = hop_out
        if prev_out is not None and all(prev_out >= self._order(r) for r in recv):
            raise ApexlensError(
                f"receivers {[str(r) for r in recv]} come before the last 'via' node: no path"
            )
        if not chain_ok:
            raise ApexlensError(
                "the 'via' nodes must be in forward order (each after the previous)"
            )
        last_target = max(self._order(r) for r in first_targets)
        has_path = [min(self._order(s) for s in g) < last_target if g else False for g in groups]
        if not any(has_path):
            s_names = [str(s) for g in groups for s in g]
            raise ApexlensError(
                f"no sender has a path to the receivers: receiver(s) {[str(r) for r in first_targets]}"
                f" come before (or in the same layer as) sender(s) {s_names[:6]}"
                f"{'...' if len(s_names) > 6 else ''}"
            )
        out = self.clean_values.expand(len(groups), -1).clone()
        active = [i for i, ok in enumerate(has_path) if ok]
        # sort by where each group's first delta enters, so started rows form a prefix
        active.sort(key=lambda i: min(self._order(s) for s in groups[i]))
        only_logits = not hops and all(r.kind == "logits" for r in recv) and self.readout.fast
        chunk = self._chunk_size(len(active), full_positions=not only_logits)
        chunks = [active[i : i + chunk] for i in range(0, len(active), chunk)]
        iterator: Any = chunks
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(chunks, desc="path patching", unit="chunk")
        with inference_mode(self.model):
            for rows in iterator:
                out[rows] = self._patch_chunk(
                    [groups[i] for i in rows], recv, hops, mlps, only_logits
                )
        return out

    def _patch_chunk(
        self,
        groups: list[SenderGroup],
        recv: list[Node],
        hops: list[list[Node]],
        mlps: MLPMode,
        only_logits: bool,
    ) -> Float[Tensor, "chunk batch"]:
        gather: Callable[[Tensor], Tensor] = self.readout.gather if only_logits else (lambda x: x)
        # deltas entering at each site, per row
        entries: list[tuple[int, int, Tensor]] = []  # (order, row, delta)
        for row, g in enumerate(groups):
            for s in g:
                entries.append((self._order(s), row, gather(self.sender_delta(s))))
        for hop in hops:
            new = self._propagate(entries, len(groups), hop, mlps, gather)
            delta = self._hop_output(hop, new)
            entries = [
                (self._order(hop[0].as_sender), row, delta[row]) for row in range(len(groups))
            ]
        new = self._propagate(entries, len(groups), recv, mlps, gather)
        return self._finish(recv, new, len(groups))

    def _propagate(
        self,
        entries: list[tuple[int, int, Tensor]],
        n_rows: int,
        targets: list[Node],
        mlps: MLPMode,
        gather: Callable[[Tensor], Tensor],
    ) -> dict[Node, Tensor]:
        """Frozen propagation: walk the deltas to every target and return its new input.

        Returns, per target: a head channel -> its new ``hook_q/k/v`` values for that head
        ``[rows, batch, pos, d_head]``; an MLP -> its new output ``[rows, batch, pos, d_model]``;
        ``logits`` -> the delta of the final residual stream.
        """
        bk, c = self.bk, self.clean
        n_layers = bk.dims.n_layers
        last = max(self._order(t) for t in targets)
        ref = entries[0][2]
        acc = torch.zeros(n_rows, *ref.shape, dtype=ref.dtype, device=ref.device)
        starts = torch.full((n_rows,), 10**9)
        for o, row, _ in entries:
            starts[row] = min(int(starts[row]), o)
        by_order: dict[int, list[tuple[int, Tensor]]] = {}
        for o, row, d in entries:
            by_order.setdefault(o, []).append((row, d))
        out: dict[Node, Tensor] = {}

        def add(o: int) -> None:
            for row, d in by_order.get(o, []):
                acc[row] += d

        add(0)
        for layer in range(n_layers):
            o_attn, o_mlp = 2 * layer + 1, 2 * layer + 2
            if o_attn > last:
                break
            heads_here = [t for t in targets if t.kind == "head" and t.layer == layer]
            if heads_here:
                resid = gather(c[bk.resid_pre(layer)]) + acc
                for ch in "qkv":
                    ts = [t for t in heads_here if t.channel == ch]
                    if ts:
                        vals = bk.head_input(layer, ch, resid, [int(t.head or 0) for t in ts])
                        for i, t in enumerate(ts):
                            out[t] = vals[..., i, :]
            add(o_attn)
            if o_mlp > last or not bk.dims.has_mlps:
                continue
            mlp_target = [t for t in targets if t.kind == "mlp" and t.layer == layer]
            n_started = int((starts < o_mlp).sum())
            if n_started == 0:
                for t in mlp_target:
                    out[t] = gather(c[bk.mlp_out(layer)]).expand(n_rows, *acc.shape[1:]).clone()
                add(o_mlp)
                continue
            if mlps == "live" or mlp_target:
                new_out = bk.mlp_from_resid(layer, gather(c[bk.resid_mid(layer)]) + acc[:n_started])
                change = new_out - gather(c[bk.mlp_out(layer)])
                if mlp_target:
                    full = gather(c[bk.mlp_out(layer)]).expand(n_rows, *change.shape[1:]).clone()
                    full[:n_started] = new_out
                    out[mlp_target[0]] = full
                if mlps == "live":
                    acc[:n_started] += change
            add(o_mlp)
        for t in targets:
            if t.kind == "logits":
                out[t] = acc
        return out

    def _hop_output(
        self, hop: list[Node], new: dict[Node, Tensor]
    ) -> Float[Tensor, "rows batch pos d_model"]:
        """How much an intermediate node's output changes when only its patched input changes."""
        bk, c = self.bk, self.clean
        node = hop[0]
        layer = node.layer
        if node.kind == "mlp":
            change = new[node] - c[bk.mlp_out(layer)]
            m = self.mask(node)
            return change if m is None else change * m[..., None].to(change.dtype)
        rows = next(iter(new.values())).shape[0]
        hooks = self._substitution_hooks({t: new[t] for t in hop}, rows)
        z_new: dict[str, Tensor] = {}

        def grab(act: Tensor, hook: Any) -> None:
            z_new["z"] = act[:, :, node.head]

        resid = c[bk.resid_pre(layer)].repeat(rows, 1, 1)
        bk.run_layers(resid, layer, layer + 1, hooks + [(bk.z(layer), grab)])
        dz = z_new["z"].reshape(rows, self.batch, self.n_pos, -1) - c[bk.z(layer)][:, :, node.head]
        return dz @ bk.W_O_stacked[layer, node.head]

    def _substitution_hooks(
        self, new: Mapping[Node, Tensor], rows: int
    ) -> list[tuple[str, HookFn]]:
        """Hooks that put each receiver's new input in place (only at its positions)."""
        bk = self.bk
        hooks: list[tuple[str, HookFn]] = []
        groups: dict[tuple[str, int, str], list[Node]] = {}
        for t in new:
            if t.kind == "head":
                assert t.channel is not None
                groups.setdefault(("head", t.layer, t.channel), []).append(t)
            elif t.kind == "mlp":
                groups.setdefault(("mlp", t.layer, ""), []).append(t)
        for (kind, layer, ch), ts in groups.items():
            if kind == "head":
                heads = [int(t.head or 0) for t in ts]
                vals = torch.stack([new[t] for t in ts], dim=-2)  # rows batch pos nh dh
                vals = vals.reshape(rows * self.batch, self.n_pos, len(ts), -1)
                masks = [self.mask(t) for t in ts]
                hooks.append((bk.qkv(layer, ch), _make_head_sub(heads, vals, masks, rows)))
            else:
                val = new[ts[0]].reshape(rows * self.batch, self.n_pos, -1)
                hooks.append((bk.mlp_out(layer), _make_sub(val, self.mask(ts[0]), rows)))
        return hooks

    def _finish(
        self, recv: list[Node], new: dict[Node, Tensor], rows: int
    ) -> Float[Tensor, "rows batch"]:
        bk, c = self.bk, self.clean
        logits_nodes = [r for r in recv if r.kind == "logits"]
        others = [r for r in recv if r.kind != "logits"]
        if not others:
            acc = new[logits_nodes[0]]
            m = self.mask(logits_nodes[0])
            if m is not None:
                m = (
                    m
                    if acc.shape[-2] == self.n_pos
                    else self.readout.gather(m[..., None].float())[..., 0] > 0
                )
                acc = acc * m[..., None].to(acc.dtype)
            base = c.final if acc.shape[-2] == self.n_pos else self.readout.gather(c.final)
            final = base + acc
            return self.readout(
                final if acc.shape[-2] != self.n_pos else self.readout.gather(final)
            )
        hooks = self._substitution_hooks({r: new[r] for r in others}, rows)
        if logits_nodes:
            acc = new[logits_nodes[0]].reshape(rows * self.batch, self.n_pos, -1)
            m = self.mask(logits_nodes[0])
            if m is not None:
                acc = acc * m.repeat(rows, 1)[..., None].to(acc.dtype)
            hooks.append((bk.resid_post(bk.dims.n_layers - 1), _make_add(acc)))
        start = min(r.layer for r in others)
        resid = c[bk.resid_pre(start)].repeat(rows, 1, 1)
        final = bk.run_layers(resid, start, None, hooks)
        final = final.reshape(rows, self.batch, self.n_pos, -1)
        return self.readout(self.readout.gather(final))

    # ------------------------------------------------------------------ circuits
    def evaluate_circuit(
        self, edges: Any, *, ablation: str = "resample", reference_tokens: Tensor | None = None
    ) -> Any:
        """Evaluate a circuit hypothesis on the cached runs; see :func:`apexlens.evaluate_circuit`."""
        from apexlens.circuits import evaluate_edges

        return evaluate_edges(self, edges, ablation=ablation, reference_tokens=reference_tokens)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ activation patching
    def act_patch(
        self, nodes: NodeSpec = "all-heads", *, progress: bool = False
    ) -> PathPatchResult:
        """Activation patching: run the corrupted input, put each node's clean activation back."""
        node_list = parse_act_nodes(nodes, self.bk)
        per_example = self.act_patch_values(node_list, progress=progress)
        d = self.bk.dims
        all_heads = [
            (n.layer, n.head) for n in node_list if n.kind == "head" and n.positions is None
        ] == [(la, h) for la in range(d.n_layers) for h in range(d.n_heads)] and len(
            node_list
        ) == d.n_layers * d.n_heads
        return PathPatchResult(
            senders=[_act_name(n) for n in node_list],
            receivers=[],
            per_example=per_example,
            clean=Scores(self.clean_values),
            corrupted=Scores(self.corrupted_values),
            grid=(d.n_layers, d.n_heads) if all_heads else None,
            metric_name=self.readout.name,
        )

    def act_patch_values(
        self, nodes: Sequence[Node], *, progress: bool = False
    ) -> Float[Tensor, "node batch"]:
        bk, c, k = self.bk, self.clean, self.corrupted
        out = torch.empty(len(nodes), self.batch, dtype=self.clean_values.dtype, device=bk.device)
        by_layer: dict[int, list[int]] = {}
        for i, n in enumerate(nodes):
            by_layer.setdefault(_act_layer(n), []).append(i)
        chunk = self._chunk_size(len(nodes), full_positions=True)
        work = [
            (la, idx[j : j + chunk])
            for la, idx in sorted(by_layer.items())
            for j in range(0, len(idx), chunk)
        ]
        iterator: Any = work
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(work, desc="activation patching", unit="chunk")
        with inference_mode(self.model):
            for layer, idx in iterator:
                rows = len(idx)
                resid = (
                    k[bk.resid_pre(layer)].repeat(rows, 1, 1)
                    if layer < bk.dims.n_layers
                    else k.final.repeat(rows, 1, 1)
                )
                hooks: list[tuple[str, HookFn]] = []
                heads = [(r, nodes[i]) for r, i in enumerate(idx) if nodes[i].kind == "head"]
                if heads:
                    sel = torch.zeros(
                        rows,
                        self.batch,
                        self.n_pos,
                        bk.dims.n_heads,
                        dtype=torch.bool,
                        device=bk.device,
                    )
                    for r, n in heads:
                        m = self.mask(n)
                        sel[r, :, :, n.head] = True if m is None else m
                    hooks.append(
                        (
                            bk.z(layer),
                            _make_where(
                                sel.reshape(rows * self.batch, self.n_pos, -1, 1),
                                c[bk.z(layer)].repeat(rows, 1, 1, 1),
                            ),
                        )
                    )
                mlp_rows = [(r, nodes[i]) for r, i in enumerate(idx) if nodes[i].kind == "mlp"]
                if mlp_rows:
                    sel = torch.zeros(
                        rows, self.batch, self.n_pos, dtype=torch.bool, device=bk.device
                    )
                    for r, n in mlp_rows:
                        m = self.mask(n)
                        sel[r] = True if m is None else m
                    hooks.append(
                        (
                            bk.mlp_out(layer),
                            _make_where(
                                sel.reshape(rows * self.batch, self.n_pos, 1),
                                c[bk.mlp_out(layer)].repeat(rows, 1, 1),
                            ),
                        )
                    )
                for r, i in enumerate(idx):
                    n = nodes[i]
                    if n.kind in ("embed", "resid"):
                        clean_resid = (
                            c[bk.resid_pre(layer)] if layer < bk.dims.n_layers else c.final
                        )
                        m = self.mask(n)
                        sl = slice(r * self.batch, (r + 1) * self.batch)
                        resid[sl] = (
                            clean_resid
                            if m is None
                            else torch.where(m[..., None], clean_resid, resid[sl])
                        )
                final = (
                    bk.run_layers(resid, layer, None, hooks) if layer < bk.dims.n_layers else resid
                )
                final = final.reshape(rows, self.batch, self.n_pos, -1)
                out[idx] = self.readout(self.readout.gather(final))
        return out


def _make_head_sub(heads: list[int], vals: Tensor, masks: list[Tensor | None], rows: int) -> HookFn:
    def hook(act: Tensor, hook: Any) -> Tensor:
        for i, h in enumerate(heads):
            m = masks[i]
            if m is None:
                act[:, :, h] = vals[:, :, i]
            else:
                mm = m.repeat(rows, 1)[..., None]
                act[:, :, h] = torch.where(mm, vals[:, :, i], act[:, :, h])
        return act

    return hook


def _make_sub(val: Tensor, mask: Tensor | None, rows: int) -> HookFn:
    def hook(act: Tensor, hook: Any) -> Tensor:
        if mask is None:
            return val.to(act.dtype)
        return torch.where(mask.repeat(rows, 1)[..., None], val, act)

    return hook


def _make_add(delta: Tensor) -> HookFn:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return act + delta

    return hook


def _make_where(sel: Tensor, value: Tensor) -> HookFn:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return torch.where(sel, value, act)

    return hook


# ---------------------------------------------------------------------- act-patch nodes
def parse_act_nodes(spec: NodeSpec, bk: Backend) -> list[Node]:
    """Nodes for activation patching: heads, MLPs, ``embed``, and ``resid_pre`` streams
    spelled ``"r5"`` / ``"resid5"`` (the residual stream entering block 5; ``rN`` with N the
    number of layers is the final residual)."""
    import re

    items = [spec] if isinstance(spec, (str, Node)) else list(spec)
    out: list[Node] = []
    for item in items:
        if isinstance(item, str):
            m = re.match(r"^(?:r|resid|resid_pre)(\d+)(@.*)?$", item.strip())
            if m:
                layer = int(m.group(1))
                if not 0 <= layer <= bk.dims.n_layers:
                    raise ApexlensError(
                        f"residual node {item!r} is out of range: 0..{bk.dims.n_layers} for this model"
                    )
                pos = parse_nodes(f"embed{m.group(2) or ''}", bk.dims)[0].positions
                out.append(Node("resid", layer, positions=pos))  # type: ignore[arg-type]
                continue
        out.extend(parse_nodes(item, bk.dims))
    for n in out:
        if n.kind == "logits" or (n.kind == "head" and n.channel is not None):
            raise ApexlensError(f"activation patching patches outputs; {n} is not one")
    if not out:
        raise ApexlensError("the node set is empty")
    return out


def _act_layer(n: Node) -> int:
    if n.kind == "embed":
        return 0
    return n.layer


def _act_name(n: Node) -> str:
    if n.kind == "resid":
        base = f"r{n.layer}"
        return base if n.positions is None else f"{base}@{str(n).partition('@')[2]}"
    return str(n)


# ============================================================================ functions
def path_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    senders: NodeSpec,
    receivers: NodeSpec = "logits",
    metric: Callable[[Tensor], Tensor],
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
            :mod:`apexlens.scoring` metrics run the fast path.
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
    metric: Callable[[Tensor], Tensor],
    positions: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> PathPatchResult:
    """Activation patching, TransformerLens' convention: run ``corrupted_tokens`` and put each
    node's activation from the clean run back (heads: ``hook_z``; MLPs: ``hook_mlp_out``;
    ``"rL"``: the residual stream entering block L; ``"embed"``), one node at a time.

    ``nodes="all-heads"`` gives the numbers of ``get_act_patch_attn_head_out_all_pos``;
    ``"L.H@p"`` nodes patch single positions (``get_act_patch_attn_head_out_by_pos``).
    """
    exp = Experiment(
        model,
        clean_tokens,
        corrupted_tokens,
        metric=metric,
        positions=positions,
        memory_budget=memory_budget,
    )
    return exp.act_patch(nodes, progress=progress)


# ============================================================================ interactive
@contextmanager
def patched_paths(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    senders: NodeSpec,
    receivers: NodeSpec = "logits",
    mlps: MLPMode = "live",
    positions: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """Run the model under a path patch: inside the block, every forward pass of the model
    (your metric, ``run_with_cache``, generation...) has the senders (jointly) patched from
    ``corrupted_tokens`` along the paths into the receivers.

    Each forward pass's clean activations are those of its own input, computed by a nested
    clean run the first time the patched hooks fire; the input must have the shape of
    ``corrupted_tokens``.
    """
    bk = backend_for(model)
    dims = bk.dims
    sender_nodes = as_senders(parse_nodes(senders, dims))
    recv = as_receivers(parse_nodes(receivers, dims))
    with inference_mode(model):
        corrupted = cached_run(bk, corrupted_tokens)
    state: dict[str, Any] = {"busy": False, "new": None, "rows": 1}
    shape = tuple(corrupted_tokens.shape)

    def prepare(act: Tensor, hook: Any) -> None:
        if state["busy"]:
            return
        if tuple(act.shape[:2]) != shape:
            raise ApexlensError(
                f"inside apexlens.patched the input must have the corrupted tokens' shape {shape}, "
                f"got {tuple(act.shape[:2])}"
            )
        state["busy"] = True
        try:
            exp = Experiment.__new__(Experiment)
            exp.bk, exp.model = bk, model
            exp.batch, exp.n_pos = shape
            exp.named_positions = dict(positions or {})
            exp.memory_budget = exp._default_budget()
            names = _cache_names(bk)
            acts: dict[str, Tensor] = {}

            def saver(name: str) -> HookFn:
                def save(a: Tensor, hook: Any) -> None:
                    acts[name] = a.detach().clone()

                return save

            final = bk.run_layers(
                act.detach(), 0, None, [(n, saver(n)) for n in dict.fromkeys(names)]
            )
            acts[bk.resid_pre(0)] = act.detach().clone()
            exp.clean = Run(acts, final)
            exp.corrupted = corrupted
            ident: Callable[[Tensor], Tensor] = lambda x: x
            entries = [(s.order(dims.n_layers), 0, exp.sender_delta(s)) for s in sender_nodes]
            if min(o for o, _, _ in entries) >= max(r.order(dims.n_layers) for r in recv):
                raise ApexlensError("no sender has a path to the receivers")
            new = exp._propagate(entries, 1, recv, mlps, ident)
            state["exp"], state["new"] = exp, new
        finally:
            state["busy"] = False

    def make_sub(t: Node) -> HookFn:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            if state["busy"] or state["new"] is None:
                return None
            exp: Experiment = state["exp"]
            sub = exp._substitution_hooks({t: state["new"][t]}, 1)
            return sub[0][1](act, hook)

        return hook

    def add_logits(act: Tensor, hook: Any) -> Tensor | None:
        if state["busy"] or state["new"] is None:
            return None
        exp: Experiment = state["exp"]
        t = next(r for r in recv if r.kind == "logits")
        acc = state["new"][t][0]
        m = exp.mask(t)
        if m is not None:
            acc = acc * m[..., None].to(acc.dtype)
        return act + acc

    hooks: list[tuple[str, HookFn]] = [(bk.resid_pre(0), prepare)]
    for t in recv:
        if t.kind == "head":
            assert t.channel is not None
            hooks.append((bk.qkv(t.layer, t.channel), make_sub(t)))
        elif t.kind == "mlp":
            hooks.append((bk.mlp_out(t.layer), make_sub(t)))
        else:
            hooks.append((bk.resid_post(dims.n_layers - 1), add_logits))
    with attached(model, hooks):
        yield model
