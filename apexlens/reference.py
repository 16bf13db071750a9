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
APEX: one full forward of one example per (sigma, draw) (:func:`naive_apex`), its noise from
:func:`reference_normal` (the counter-based generator written again with NumPy); brute-force
escape noise on a grid (:func:`first_escape_on_grid`); the bias test's gains with loops
(:func:`naive_gains`).

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


def reference_normal(
    seed: int, example_id: int, draw: int, stream: str, positions: Sequence[int], n_features: int
) -> Tensor:
    """Standard normals ``[len(positions), n_features]`` (float64) of one example and draw at
    the noise stream ``stream``, computed from the definition in
    :mod:`apexlens.engines.noise.rng` with Python integers and NumPy ``uint64`` arithmetic
    (independently of the engine's int64 tensors)."""
    import zlib

    import numpy as np

    m64 = (1 << 64) - 1
    golden, c1, c2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

    def mix(z: int) -> int:
        z &= m64
        z = ((z ^ (z >> 30)) * c1) & m64
        z = ((z ^ (z >> 27)) * c2) & m64
        return z ^ (z >> 31)

    def mix_np(z: Any) -> Any:
        z = (z ^ (z >> np.uint64(30))) * np.uint64(c1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(c2)
        return z ^ (z >> np.uint64(31))

    h = mix(seed * golden + 0x1234567)
    for x in (example_id, draw, zlib.crc32(stream.encode())):
        h = mix(h + (x + 1) * golden)
    out = np.empty((len(positions), n_features))
    feature = np.arange(n_features, dtype=np.uint64)
    for row, p in enumerate(positions):
        hp = np.uint64(mix(h + (int(p) + 1) * golden))
        with np.errstate(over="ignore"):
            u = [
                ((mix_np(hp + (2 * feature + np.uint64(k + 1)) * np.uint64(golden)) >> np.uint64(11))
                 .astype(np.float64) + 0.5) * 2.0**-53
                for k in (0, 1)
            ]
        out[row] = np.sqrt(-2.0 * np.log(u[0])) * np.cos(2.0 * np.pi * u[1])
    return torch.from_numpy(out)


def _site_parts(site: Any) -> tuple[str, str, tuple[int, ...]]:
    """``(hook, noise stream, shared axes)`` of a site given as a hook name or a ``Site``."""
    if isinstance(site, str):
        return site, site, ()
    return site.hook, site.key or site.hook, tuple(site.shared_axes)


def _degenerate_code(logits: Tensor, norm_bad: bool) -> int:
    """The degeneracy code of one logit vector, rule by rule (the engine's table)."""
    if not torch.isfinite(logits).all():
        return 1
    if norm_bad:
        return 2
    x = logits.double()
    top = x.sort(descending=True).values
    if float(top[0] - x.min()) <= 1e-6 * max(1.0, float(x.abs().max())):
        return 3
    if len(top) > 1 and float(top[0]) == float(top[1]):
        return 4
    return 0


def naive_apex(
    model: Any,
    tokens: Tensor,
    sigmas: Sequence[float],
    n_draws: int,
    sites: Sequence[Any],
    *,
    seed: int,
    relative: bool = False,
    noise_positions: Any = None,
    positions: Any = -1,
    example_ids: Sequence[int] | None = None,
    with_codes: bool = False,
) -> Any:
    """APEX the slow way: one plain full forward of one example per (sigma, draw).

    ``sites`` are hook names or ``Site`` objects. The noise of example ``i``, draw ``d`` at a
    site comes from :func:`reference_normal` (its id ``example_ids[i]``, default ``i``), the
    same at every sigma; ``relative`` scales it by the RMS (last axis) of that example's
    clean activation. A pass is degenerate (prediction ``-1``, left out of the mean
    probabilities) when its logits are not finite, a norm's ``hook_scale`` is not finite or
    0, the final residual's mean square overflows, or the logits are constant or tied.
    Returns the predictions ``[n_sigma, n_draws, batch]`` at ``positions`` and the mean
    softmax over usable passes ``[n_sigma, d_vocab]`` (and the codes, ``with_codes``).
    """
    from apexlens.model.hooks import firing

    parts = [_site_parts(s) for s in sites]
    hooks_of = [h for h, _, _ in parts]
    n = tokens.shape[0]
    ids = list(range(n)) if example_ids is None else [int(i) for i in example_ids]
    preds = torch.empty(len(sigmas), n_draws, n, dtype=torch.long)
    codes = torch.zeros(len(sigmas), n_draws, n, dtype=torch.uint8)
    probs = torch.zeros(len(sigmas), model.cfg.d_vocab, dtype=torch.float64)
    with inference_mode(model), firing(model, hooks_of):
        for i in range(n):
            x = tokens[i : i + 1]
            clean: dict[str, Tensor] = {}
            model.run_with_hooks(x, fwd_hooks=[(h, _saver(clean, h)) for h in hooks_of])
            for d in range(n_draws):
                xi = {
                    hook: _reference_xi(seed, ids[i], d, stream, shared, clean[hook], noise_positions)
                    for hook, stream, shared in parts
                }
                for s, sigma in enumerate(sigmas):
                    logits, norm_bad = _noisy_pass(
                        model, x, parts, clean, xi, sigma, relative, noise_positions, positions
                    )
                    code = _degenerate_code(logits, norm_bad)
                    codes[s, d, i] = code
                    preds[s, d, i] = -1 if code else int(logits.argmax())
                    if not code:
                        probs[s] += logits.double().softmax(-1).cpu()
    usable = (preds >= 0).reshape(len(sigmas), -1).sum(-1).clamp_min(1)
    out = (preds.to(tokens.device), (probs / usable[:, None]).to(tokens.device))
    return (*out, codes) if with_codes else out


def _saver(store: dict[str, Tensor], name: str) -> HookFn:
    """Record under ``name`` (by closure: a bridge's ``hook.name`` is an alias)."""

    def save(act: Tensor, hook: Any) -> None:
        store[name] = act.detach().clone()

    return save


def _noise_pos(act: Tensor, noise_positions: Any) -> Any:
    if noise_positions is None:
        return slice(None)
    return [p % act.shape[1] for p in noise_positions]


def _reference_xi(
    seed: int, example: int, draw: int, stream: str, shared: tuple[int, ...], act: Tensor,
    noise_positions: Any,
) -> Tensor:
    """One example's standard noise at a site, shaped like ``act[:, noise positions]`` (size
    1 along ``shared`` axes)."""
    pos = list(range(act.shape[1])) if noise_positions is None else _noise_pos(act, noise_positions)
    rest = [1 if a + 1 in shared else size for a, size in enumerate(act.shape[2:])]
    numel = 1
    for size in rest:
        numel *= size
    z = reference_normal(seed, example, draw, stream, pos, numel)
    return z.reshape(1, len(pos), *rest).to(act.dtype)


def _noisy_pass(
    model: Any, x: Tensor, parts: Sequence[tuple[str, str, tuple[int, ...]]],
    clean: dict[str, Tensor], xi: dict[str, Tensor], sigma: float, relative: bool,
    noise_positions: Any, positions: Any,
) -> tuple[Tensor, bool]:
    """One noisy forward of one example: the logits at ``positions`` and whether a norm
    overflowed (a ``hook_scale`` not finite or 0, or the final residual's mean square)."""
    bad = [False]
    final: dict[str, Tensor] = {}

    def noiser(name: str, shared: tuple[int, ...]) -> HookFn:
        def add_noise(act: Tensor, hook: Any) -> Tensor:
            pos = _noise_pos(act, noise_positions)
            scale = torch.tensor(sigma, dtype=torch.float64).to(act.dtype)
            if relative:
                r = clean[name][:, pos].pow(2).mean(-1, keepdim=True).sqrt()
                for ax in shared:
                    r = r.narrow(ax + 1, 0, 1)
                scale = scale * r
            out = act.clone()
            out[:, pos] = act[:, pos] + scale * xi[name]
            return out

        return add_noise

    def check(act: Tensor, hook: Any) -> None:
        if not torch.isfinite(act).all() or (act == 0).any():
            bad[0] = True

    scale_names = [name for name in model.hook_dict if name.endswith(".hook_scale")]
    final_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    hooks = [(h, noiser(h, sh)) for h, _, sh in parts] + [(n, check) for n in scale_names]
    hooks.append((final_name, _saver(final, "x")))
    logits = model.run_with_hooks(x, fwd_hooks=hooks)[0, positions]
    last = final["x"][0, positions]
    wide = last if last.dtype in (torch.float32, torch.float64) else last.float()
    return logits, bad[0] or not bool(torch.isfinite(wide.pow(2).mean()))


def first_escape_on_grid(
    predictions: Tensor, clean: Tensor, grid: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Brute-force escape noise from predictions ``[n_grid, n_draws, n]`` on a fine sigma
    grid (common random numbers): each draw's first grid sigma whose prediction is neither
    the clean one nor degenerate (``inf`` if none), and each sample's lower median over
    draws. Plain loops."""
    n_grid, n_draws, n = predictions.shape
    first = torch.full((n_draws, n), float("inf"), dtype=torch.float64)
    for i in range(n):
        for d in range(n_draws):
            for g in range(n_grid):
                p = int(predictions[g, d, i])
                if p >= 0 and p != int(clean[i]):
                    first[d, i] = float(grid[g])
                    break
    k = (n_draws + 1) // 2
    median = torch.tensor(
        [sorted(first[:, i].tolist())[k - 1] for i in range(n)], dtype=torch.float64
    )
    return first, median


def naive_gains(
    predictions: Tensor, clean: Tensor, sample_example: Tensor, d_vocab: int
) -> tuple[Tensor, Tensor]:
    """The bias test's gain ``G[s, t]`` (mean over prompts of noisy share minus clean
    indicator) and its standard error ``sd / sqrt(n_prompts)``, ``[n_sigma, d_vocab]``, with
    explicit loops; a prompt's samples are averaged first, degenerate draws (``-1``) skipped."""
    n_sigma, n_draws, n = predictions.shape
    examples = sorted({int(e) for e in sample_example})
    gain = torch.zeros(n_sigma, d_vocab, dtype=torch.float64)
    se = torch.zeros(n_sigma, d_vocab, dtype=torch.float64)
    for s in range(n_sigma):
        for t in range(d_vocab):
            per_prompt = []
            for e in examples:
                vals = []
                for j in range(n):
                    if int(sample_example[j]) != e:
                        continue
                    ok = [int(p) for p in predictions[s, :, j] if int(p) >= 0]
                    q = sum(1 for p in ok if p == t) / max(len(ok), 1)
                    vals.append(q - (1.0 if int(clean[j]) == t else 0.0))
                per_prompt.append(sum(vals) / len(vals))
            m = len(per_prompt)
            mean = sum(per_prompt) / m
            var = sum((v - mean) ** 2 for v in per_prompt) / (m - 1)
            gain[s, t], se[s, t] = mean, (var / m) ** 0.5
    return gain, se


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


def naive_climb(
    model: Any,
    feature: Any,
    starts: Tensor,
    read: int,
    *,
    allowed: Sequence[int] | None = None,
    first_free: int = 0,
    rounds: int = 20,
) -> Tensor:
    """Discrete hill-climbing, one input at a time: every single-token swap of every free
    position (``first_free`` on) to every allowed token, each a plain forward pass; keep the
    best while it raises the feature at ``read``. The activations reached, ``[n]`` (what
    :func:`apexlens.engines.features.climb` computes when its proposals cover the vocabulary)."""

    def value(x: Tensor) -> Tensor:
        with torch.no_grad():
            if feature.kind == "logit":
                act = model(x)
            else:
                _, cache = model.run_with_cache(x, names_filter=[feature.hook])
                act = cache[feature.hook]
            return feature.values(act, model)[:, read].double()

    vocab = list(range(backend_for(model).dims.d_vocab_in)) if allowed is None else list(allowed)
    out = []
    for start in starts:
        cur = start.clone()
        best = float(value(cur[None])[0])
        for _ in range(rounds):
            cands = []
            for pos in range(first_free, cur.numel()):
                for tok in vocab:
                    if tok != int(cur[pos]):
                        c = cur.clone()
                        c[pos] = tok
                        cands.append(c)
            vals = value(torch.stack(cands))
            j = int(vals.argmax())
            if float(vals[j]) <= best:
                break
            cur, best = cands[j], float(vals[j])
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)
