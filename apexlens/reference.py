"""Slow, obviously-correct loops: the references the fast engines are tested against.

Each function follows the definition word for word with whole forward passes and hooks,
one sender (or node, or draw) at a time. They are part of the package so that the test
suite and the benchmarks measure the same thing; use the fast engines for real work.

Path patching, per sender ``s`` (Wang et al. 2022, appendix B; ARENA's loop):

1. *freeze pass*: run the clean input with every head's ``z`` frozen to its clean value
   except ``s``, whose output is set to its corrupted value at its positions; MLPs are
   recomputed (``mlps="live"``) or frozen to their clean output too. Record what each
   receiver reads: its ``hook_q/k/v`` values, its MLP input, the final residual stream.
   For multi-hop paths, the next pass freezes everything except the hop node, whose input
   is the value recorded in the previous pass.
2. *patch pass*: run the clean input normally, except that each receiver reads the
   recorded values (at its positions); the final residual stream of a ``logits`` receiver
   gets the recorded direct-path change added.

Activation patching: one full corrupted forward per node (:func:`naive_act_patch`).
APEX: one full forward per (sigma, draw) (:func:`naive_apex`).

Nothing here uses apexlens' engines, runs or edits: only whole forward passes with plain
TransformerLens hooks, so a bug in the shared machinery cannot hide in both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import backend_for
from apexlens.model.build import ungrouped_copy
from apexlens.model.hooks import HookFn, inference_mode
from apexlens.vocab import (
    Node,
    NodeSpec,
    as_receivers,
    as_senders,
    parse_node,
    parse_nodes,
    position_mask,
)


def naive_path_patch(
    model: Any,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    *,
    senders: NodeSpec,
    receivers: NodeSpec = "logits",
    metric: Callable[[Tensor], Tensor],
    mlps: str = "live",
    via: Sequence[NodeSpec] = (),
    positions: Mapping[str, Any] | None = None,
    ungrouped: Any = None,
) -> Tensor:
    """Per-example metric ``[n_senders, batch]``, one sender at a time, whole forward passes.

    Long on purpose: a reference is one loop that reads like the definition, with no helper
    shared with the fast engines.

    Receivers are read and set where the model has them: a head's ``hook_q/k/v`` slot, an
    MLP's output ``hook_mlp_out`` (recorded with that MLP computing, frozen or not), the final
    residual stream. A grouped-query model runs as its ungrouped copy (:func:`ungrouped_copy`
    for a ``HookedTransformer``; pass ``ungrouped`` for a bridge), where query head ``H``'s
    key is slot ``H`` of ``hook_k``, and KV head ``J``'s key is every slot of its group.
    """
    dims = backend_for(model).dims
    n_layers = dims.n_layers
    sender_nodes = as_senders(parse_nodes(senders, dims))
    recv = as_receivers(parse_nodes(receivers, dims))
    hops = [as_receivers(parse_nodes(h, dims)) for h in via]
    group = dims.group
    if group > 1:
        model = ungrouped if ungrouped is not None else ungrouped_copy(model)
    bk = backend_for(model)
    assert bk.dims.group == 1
    batch, n_pos = clean_tokens.shape

    def mask(node: Node) -> Tensor | None:
        return position_mask(node, batch, n_pos, positions, bk.device)

    def slots(t: Node) -> list[int]:
        """The (ungrouped) hook_k/v slots a receiver reads."""
        h = int(t.head or 0)
        return list(range(h * group, (h + 1) * group)) if t.kind == "kv" else [h]

    all_names = []
    for layer in range(n_layers):
        all_names += [bk.z(layer), *(bk.qkv(layer, c) for c in "qkv")]
        if dims.has_mlps:
            all_names += [bk.mlp_out(layer)]
    all_names += [bk.resid_pre(0), bk.resid_post(n_layers - 1)]

    with inference_mode(model):
        clean_logits, clean = bk.run_with_cache(clean_tokens, all_names)
        _, corr = bk.run_with_cache(corrupted_tokens, all_names)
        clean_value = metric(clean_logits)

        def freeze_hooks(
            active: Node | None, seen: dict[int, Tensor] | None = None
        ) -> list[tuple[str, HookFn]]:
            """Every head frozen at its clean z (and MLPs too if frozen), except ``active``.
            A frozen MLP's own output is kept in ``seen`` before it is frozen."""
            hooks: list[tuple[str, HookFn]] = []
            for layer in range(n_layers):

                def fz(act: Tensor, hook: Any, layer: int = layer) -> Tensor:
                    new = clean[bk.z(layer)].clone()
                    if active is not None and active.kind == "head" and active.layer == layer:
                        new[:, :, active.head] = act[:, :, active.head]
                    return new

                hooks.append((bk.z(layer), fz))
                if dims.has_mlps and mlps == "frozen":

                    def fm(act: Tensor, hook: Any, layer: int = layer) -> Tensor:
                        if seen is not None:
                            seen[layer] = act.clone()
                        if active is not None and active.kind == "mlp" and active.layer == layer:
                            return act
                        return clean[bk.mlp_out(layer)]

                    hooks.append((bk.mlp_out(layer), fm))
            return hooks

        def sender_hooks(s: Node) -> list[tuple[str, HookFn]]:
            m = mask(s)

            def put(name: str, head: int | None = None) -> HookFn:
                def fn(act: Tensor, hook: Any) -> Tensor:
                    act = act.clone()
                    src = corr[name]
                    if head is None:
                        return src if m is None else torch.where(m[..., None], src, act)
                    mm = (
                        torch.ones(batch, n_pos, dtype=torch.bool, device=act.device)
                        if m is None
                        else m
                    )
                    act[:, :, head] = torch.where(mm[..., None], src[:, :, head], act[:, :, head])
                    return act

                return fn

            if s.kind == "embed":
                return [(bk.resid_pre(0), put(bk.resid_pre(0)))]
            if s.kind == "head":
                return [(bk.z(s.layer), put(bk.z(s.layer), s.head))]
            return [(bk.mlp_out(s.layer), put(bk.mlp_out(s.layer)))]

        def site(t: Node) -> str:
            if t.kind in ("head", "kv"):
                assert t.channel is not None
                return bk.qkv(t.layer, t.channel)
            if t.kind == "mlp":
                return bk.mlp_out(t.layer)
            return bk.resid_post(n_layers - 1)

        def record(
            targets: list[Node], active: Node, hooks: list[tuple[str, HookFn]]
        ) -> dict[Node, Tensor]:
            """What each target reads in a clean run with everything frozen but ``active``
            (and ``hooks``); a frozen MLP target: what it computes before it is frozen."""
            names = [site(t) for t in targets]
            seen: dict[int, Tensor] = {}
            # record after the freeze hooks have run
            _, cache = bk.run_with_cache(
                clean_tokens, names, fwd_hooks=freeze_hooks(active, seen) + hooks
            )
            out: dict[Node, Tensor] = {}
            for t, name in zip(targets, names, strict=True):
                if t.kind in ("head", "kv"):
                    out[t] = cache[name][:, :, slots(t)[0]]
                elif t.kind == "mlp" and mlps == "frozen":
                    out[t] = seen[t.layer]
                else:
                    out[t] = cache[name]
            return out

        def input_hooks(values: Mapping[Node, Tensor]) -> list[tuple[str, HookFn]]:
            hooks: list[tuple[str, HookFn]] = []
            for t, v in values.items():
                m = mask(t)

                def sub(
                    act: Tensor, hook: Any, t: Node = t, v: Tensor = v, m: Tensor | None = m
                ) -> Tensor:
                    act = act.clone()
                    if t.kind in ("head", "kv"):
                        mm = (
                            torch.ones(batch, n_pos, dtype=torch.bool, device=act.device)
                            if m is None
                            else m
                        )
                        for h in slots(t):
                            act[:, :, h] = torch.where(mm[..., None], v, act[:, :, h])
                        return act
                    if t.kind == "mlp":
                        return v if m is None else torch.where(m[..., None], v, act)
                    delta = v - clean[bk.resid_post(n_layers - 1)]
                    if m is not None:
                        delta = delta * m[..., None]
                    return act + delta

                hooks.append((site(t), sub))
            return hooks

        results = []
        first = hops[0] if hops else recv
        for s in sender_nodes:
            if all(s.order(n_layers) >= t.order(n_layers) for t in first):
                results.append(clean_value)
                continue
            if not hops and all(t.kind == "logits" and t.positions is None for t in recv):
                # receiver = logits only: the freeze pass's own logits are the answer
                with model.hooks(fwd_hooks=freeze_hooks(s) + sender_hooks(s)):
                    results.append(metric(model(clean_tokens)))
                continue
            values = record(first, s, sender_hooks(s))
            for i, hop in enumerate(hops):
                nxt = hops[i + 1] if i + 1 < len(hops) else recv
                values = record(nxt, hop[0].as_sender, input_hooks(values))
            with model.hooks(fwd_hooks=input_hooks(values)):
                logits = model(clean_tokens)
            results.append(metric(logits))
    if not results:
        raise ApexlensError("no senders")
    return torch.stack([torch.as_tensor(r) for r in results])


def naive_act_patch(
    model: Any,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    *,
    nodes: Sequence[tuple[str, int | None] | tuple[str, int | None, int | None]],
    metric: Callable[[Tensor], Tensor],
) -> Tensor:
    """Activation patching with one full corrupted forward per node.

    ``nodes`` are ``(hook_name, head_or_None)`` or ``(hook_name, head_or_None, position)``:
    the clean activation at that hook (that head only, if given; that position only, if
    given) is put into the corrupted run.
    """
    bk = backend_for(model)
    with inference_mode(model):
        _, clean = bk.run_with_cache(clean_tokens, [n[0] for n in nodes])
        out = []
        for node in nodes:
            name, head = node[0], node[1]
            pos = node[2] if len(node) > 2 else None

            def hook(
                act: Tensor, hook: Any, name: str = name, head: int | None = head, pos: Any = pos
            ) -> Tensor:
                act = act.clone()
                at = slice(None) if pos is None else pos
                if head is None:
                    act[:, at] = clean[name][:, at]
                else:
                    act[:, at, head] = clean[name][:, at, head]
                return act

            with model.hooks(fwd_hooks=[(name, hook)]):
                out.append(metric(model(corrupted_tokens)))
    return torch.stack(out)


def naive_apex(
    model: Any,
    tokens: Tensor,
    sigmas: Sequence[float],
    n_draws: int,
    sites: Sequence[str],
    *,
    seed: int,
    relative: bool = False,
    noise_positions: Any = None,
    positions: Any = -1,
) -> tuple[Tensor, Tensor]:
    """APEX the slow way: one plain full forward per (sigma, draw).

    ``sites`` are hook names. Hooks sample ``randn`` from a generator seeded with ``seed``
    when they fire; draw ``d`` re-uses its noise at every sigma (the generator state is
    rewound), so the stream is consumed draw by draw, site by site in firing order.
    Relative noise uses the RMS (last axis) of the clean activation at the site.
    Returns the predictions ``[n_sigma, n_draws, batch]`` at ``positions`` and the mean
    softmax ``[n_sigma, d_vocab]``.
    """
    g = torch.Generator(device=tokens.device).manual_seed(seed)
    cache: dict[str, Tensor] = {}

    def saver(name: str) -> HookFn:  # names by closure: a TransformerBridge's hook.name is an alias
        def save(act: Tensor, hook: Any) -> None:
            cache[name] = act.detach().clone()

        return save

    with inference_mode(model):
        model.run_with_hooks(tokens, fwd_hooks=[(name, saver(name)) for name in sites])
        n = tokens.shape[0]
        preds = torch.empty(len(sigmas), n_draws, n, dtype=torch.long, device=tokens.device)
        probs = torch.zeros(
            len(sigmas), model.cfg.d_vocab, dtype=torch.float64, device=tokens.device
        )
        for d in range(n_draws):
            state = g.get_state()
            for s, sigma in enumerate(sigmas):
                g.set_state(state)

                def noiser(name: str, sigma: float) -> HookFn:
                    def add_noise(act: Tensor, hook: Any) -> Tensor:
                        idx = slice(None) if noise_positions is None else noise_positions
                        target = act[:, idx]
                        xi = torch.randn(
                            target.shape, generator=g, dtype=act.dtype, device=act.device
                        )
                        scale: Any = sigma
                        if relative:
                            scale = sigma * cache[name][:, idx].pow(2).mean(-1, keepdim=True).sqrt()
                        out = act.clone()
                        out[:, idx] = target + scale * xi
                        return out

                    return add_noise

                logits = model.run_with_hooks(
                    tokens, fwd_hooks=[(name, noiser(name, sigma)) for name in sites]
                )
                at = logits[:, positions].double()
                preds[s, d] = at.argmax(-1)
                probs[s] += at.softmax(-1).sum(0)
    return preds, probs / (n_draws * n)


# ============================================================================ edge attribution
def naive_edge_attribution(
    model: Any,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    *,
    metric: Callable[[Tensor], Tensor],
    edges: Sequence[tuple[str, str]],
    alphas: Sequence[float] = (1.0,),
) -> Tensor:
    """EAP / EAP-IG scores ``[n_edges]`` by the definition, one receiver at a time.

    For each receiver, every alpha in ``alphas`` runs one whole forward pass whose input
    embedding (``hook_resid_pre`` of block 0) is ``x_corr + alpha (x_clean - x_corr)``, with
    a zero tensor ``e`` (requiring gradients) added to that receiver's input *only*: for a
    head's q/k/v the head's projection is recomputed from ``ln1(resid_pre + e)`` and put in
    at ``hook_q/k/v``; for an MLP its output is recomputed from ``resid_mid + e``; for the
    logits ``e`` is added to the final residual stream. ``metric(logits).sum()`` is
    differentiated by ``torch.autograd.grad``, the gradients are averaged over ``alphas``
    and the score of ``s -> r`` is ``mean over examples of sum_pos (out_s(corr) -
    out_s(clean)) . grad_r``. ``alphas=(1.0,)`` is EAP; ``k / n, k = 0..n-1`` is EAP-IG.
    Edges are ``(sender, receiver)`` with the receiver's channel (``"1.3.k"``); senders
    ``embed``, heads, MLPs (no positions, no split embedding).
    """
    bk = backend_for(model)
    n_layers = bk.dims.n_layers
    names = [bk.resid_pre(0)]
    for layer in range(n_layers):
        names += [bk.z(layer), bk.resid_pre(layer)]
        if bk.dims.has_mlps:
            names += [bk.mlp_out(layer), bk.resid_mid(layer)]
    with inference_mode(model):
        _, clean = bk.run_with_cache(clean_tokens, names)
        _, corr = bk.run_with_cache(corrupted_tokens, names)

    def delta(s: Node) -> Tensor:
        if s.kind == "embed":
            return corr[bk.resid_pre(0)] - clean[bk.resid_pre(0)]
        if s.kind == "head":
            dz = corr[bk.z(s.layer)][:, :, s.head] - clean[bk.z(s.layer)][:, :, s.head]
            return dz @ model.W_O[s.layer, s.head].detach()
        return corr[bk.mlp_out(s.layer)] - clean[bk.mlp_out(s.layer)]

    grads: dict[Node, Tensor] = {}
    x_clean, x_corr = clean[bk.resid_pre(0)], corr[bk.resid_pre(0)]
    was_training = model.training
    model.eval()
    try:
        for _, r_spec in edges:
            r = parse_node(r_spec)
            if r in grads:
                continue
            total = torch.zeros_like(x_clean)
            for alpha in alphas:
                e = torch.zeros_like(x_clean, requires_grad=True)

                def embed_in(act: Tensor, hook: Any, alpha: float = alpha) -> Tensor:
                    return x_corr + alpha * (x_clean - x_corr)

                hooks: list[tuple[str, HookFn]] = [(bk.resid_pre(0), embed_in)]
                if r.kind == "head":
                    store: dict[str, Tensor] = {}
                    block = model.blocks[r.layer]

                    def grab(act: Tensor, hook: Any, store: dict[str, Tensor] = store) -> None:
                        store["resid"] = act

                    def recompute(
                        act: Tensor,
                        hook: Any,
                        r: Node = r,
                        e: Tensor = e,
                        block: Any = block,
                        store: dict[str, Tensor] = store,
                    ) -> Tensor:
                        ch = str(r.channel).upper()
                        W = getattr(model, f"W_{ch}")[r.layer, r.head]
                        b = getattr(model, f"b_{ch}")[r.layer, r.head]
                        out = act.clone()
                        out[:, :, r.head] = block.ln1(store["resid"] + e) @ W + b
                        return out

                    hooks += [
                        (bk.resid_pre(r.layer), grab),
                        (bk.qkv(r.layer, str(r.channel)), recompute),
                    ]
                elif r.kind == "mlp":
                    store2: dict[str, Tensor] = {}
                    block = model.blocks[r.layer]

                    def grab_mid(act: Tensor, hook: Any, store: dict[str, Tensor] = store2) -> None:
                        store["mid"] = act

                    def recompute_mlp(
                        act: Tensor,
                        hook: Any,
                        e: Tensor = e,
                        block: Any = block,
                        store: dict[str, Tensor] = store2,
                    ) -> Tensor | None:
                        if store.get("busy") is not None:  # a bridge's MLP fires its own
                            return None  # hook_mlp_out inside this recomputation
                        store["busy"] = e
                        try:
                            return block.mlp(block.ln2(store["mid"] + e))
                        finally:
                            del store["busy"]

                    hooks += [
                        (bk.resid_mid(r.layer), grab_mid),
                        (bk.mlp_out(r.layer), recompute_mlp),
                    ]
                else:

                    def add_e(act: Tensor, hook: Any, e: Tensor = e) -> Tensor:
                        return act + e

                    hooks.append((bk.resid_post(n_layers - 1), add_e))
                with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
                    value = metric(model(clean_tokens)).sum()
                    (g,) = torch.autograd.grad(value, e, allow_unused=True)
                if g is not None:
                    total = total + g
            grads[r] = total / len(alphas)
    finally:
        model.train(was_training)
    out = []
    for s_spec, r_spec in edges:
        s, r = parse_node(s_spec), parse_node(r_spec)
        out.append((delta(s) * grads[r]).sum((-1, -2)).mean())
    return torch.stack(out).detach()
