"""Gradients at every receiver's input, for the gradient attribution methods.

The gradient at a head's q input (one per head, though all heads read the same residual
stream) is the gradient at ``hook_q`` pulled back through ``W_Q`` and ``ln1``: one batched
vector-Jacobian product of ``ln1`` per layer. An MLP's input gradient is
``dm/d attn_out - dm/d mlp_out`` (the residual stream into the MLP minus its skip path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from apexlens.engines.attribution.base import Job
from apexlens.errors import ApexlensError
from apexlens.model.hooks import inference_mode
from apexlens.runs.rows import row_chunks, rows_per_chunk
from apexlens.runs.shard import Share, current


class Pieces:
    """Differentiable ``ln1`` and ``ln_final`` + unembedding, checked against the backend's
    (a model whose pieces differ is refused, never silently mis-attributed)."""

    def __init__(self, job: Job):
        bk = job.bk
        self.bk, self.readout = bk, job.readout
        self.ln1 = [bk.differentiable_norm("ln1", la) for la in range(bk.dims.n_layers)]
        self.ln_final = bk.differentiable_norm("ln_final")
        # same function up to rounding (the backend's norms are fused kernels)
        rtol, atol = (1e-6, 1e-9) if bk.dtype == torch.float64 else (1e-4, 1e-5)
        with torch.no_grad():
            for la in range(bk.dims.n_layers):
                x = job.runs.clean[bk.resid_pre(la)]
                if not torch.allclose(self.ln1[la](x), bk.ln1(la, x), rtol=rtol, atol=atol):
                    raise ApexlensError(
                        f"attribution needs blocks.{la}.ln1 to be the norm in front of attention; "
                        "this model's is not (is it post-norm?)"
                    )
            mine = self.metric(job.runs.clean.final[None])[0]
            if not torch.allclose(mine, job.clean_values, rtol=rtol, atol=atol):
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
        cap = bk.logit_soft_cap
        return ro.from_logits(logits if cap is None else cap * torch.tanh(logits / cap))


def receiver_grads(
    job: Job,
    alphas: Sequence[float],
    *,
    n_total: int | None = None,
    examples: range | None = None,
) -> Float[Tensor, "receiver batch pos d_model"]:
    """``dm / d input_r`` for every receiver of the graph, averaged over the inputs
    ``x_corr + alpha (x_clean - x_corr)`` (``alphas``; ``[1.0]``: the clean input).

    ``m`` is the per-example metric summed over the batch, so each example's gradient is its
    own metric's. All alphas run as rows of one forward and one backward pass (in chunks of
    the memory budget). ``n_total``: divide by this many alphas (a rank's share of them);
    ``examples``: only these examples (the others' metric reads their clean run).
    """
    bk, idx, runs = job.bk, job.index, job.runs
    d = bk.dims
    ex = slice(None) if examples is None else slice(examples.start, examples.stop)
    x_full = runs.clean[bk.resid_pre(0)]
    if x_full.is_inference():
        raise ApexlensError(
            "gradient attribution needs the Experiment's cached runs outside "
            "torch.inference_mode(): build the Experiment outside that block (torch.no_grad() "
            "is fine), or use method='exact'"
        )
    x_clean = x_full[ex]
    x_corr = job.abl.embed.expand_as(x_full)[ex]  # the corrupted run's, for resample ablation
    pieces = Pieces(job)
    out = torch.zeros(len(idx.receivers), *x_clean.shape, dtype=bk.dtype, device=bk.device)
    batch = x_clean.shape[0]
    per_row = 9 * d.n_heads * x_clean.numel() * bk.dtype.itemsize  # the ln1 VJP's copies
    chunk = rows_per_chunk(
        bk, runs.memory_budget, len(alphas), batch, runs.n_pos, batch * runs.n_pos,
        attention=True, extra=per_row,
    )
    for alpha_rows in row_chunks(list(alphas), chunk, desc="gradients", progress=False):
        a = torch.tensor(alpha_rows, dtype=bk.dtype, device=bk.device)[:, None, None, None]
        resid0 = (x_corr + a * (x_clean - x_corr)).reshape(-1, *x_clean.shape[1:])
        out += _grads_once(job, pieces, resid0, len(alpha_rows), ex)
    return out / (len(alphas) if n_total is None else n_total)


def _whole_batch(job: Job, final: Tensor, ex: slice) -> Tensor:
    """``[rows, examples, ...]`` final residuals -> the whole batch, the other examples'
    from the clean run (a metric is called on whole batches)."""
    if ex == slice(None):
        return final
    clean = job.runs.clean.final.detach()
    rows = final.shape[0]
    before = clean[None, : ex.start].expand(rows, *clean[: ex.start].shape)
    after = clean[None, ex.stop :].expand(rows, *clean[ex.stop :].shape)
    return torch.cat([before, final, after], dim=1)


def _grads_once(
    job: Job, pieces: Pieces, resid0: Tensor, rows: int, ex: slice = slice(None)
) -> Float[Tensor, "receiver batch pos d_model"]:
    bk, idx = job.bk, job.index
    d = bk.dims
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
    with inference_mode(bk.model, grad=True):
        resid = bk.run_layers(resid0.detach(), 0, None, hooks)
        final_leaf = torch.zeros_like(resid, requires_grad=True)
        final = resid + final_leaf
        values = pieces.metric(_whole_batch(job, final.reshape(rows, -1, *final.shape[1:]), ex))
        if not values.requires_grad:
            raise ApexlensError(
                f"gradient attribution (EAP, EAP-IG) needs the metric's gradient, but metric "
                f"{job.readout.name} gives none (an argmax, a comparison or a detach: it is "
                "not differentiable); use method='exact', which needs no gradient"
            )
        names = list(leaves)
        grads = torch.autograd.grad(
            values.sum(), [leaves[n] for n in names] + [final_leaf], allow_unused=True
        )
    g = {
        n: (gr if gr is not None else torch.zeros_like(leaves[n]))
        for n, gr in zip(names, grads[:-1], strict=True)
    }
    g_final = grads[-1] if grads[-1] is not None else torch.zeros_like(final_leaf)
    batch = resid0.shape[0] // rows
    fold = lambda t: t.reshape(rows, batch, *t.shape[1:]).sum(0)  # noqa: E731
    out = torch.zeros(
        len(idx.receivers), batch, *resid0.shape[1:], dtype=bk.dtype, device=bk.device
    )
    out[idx.logits] = fold(g_final)
    for la in range(d.n_layers):
        # per-head cotangents at the residual stream, pulled back through ln1 in one VJP
        cots = [torch.einsum("nphk,hmk->nphm", g[f"{la}{ch}"], bk.W_in(ch)[la]) for ch in "qkv"]
        cot = torch.cat(cots, dim=2)  # [n, pos, 3H, d]
        with inference_mode(bk.model, grad=True):
            x = resids[la][:, :, None, :].expand_as(cot).clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(pieces.ln1[la](x), x, cot)
        H = d.n_heads
        for c_i, ch in enumerate("qkv"):
            sl = idx.head_receiver[(la, ch)]
            out[sl] = fold(gx[:, :, c_i * H : (c_i + 1) * H]).permute(2, 0, 1, 3)
        if la in idx.mlp_receiver:
            out[idx.mlp_receiver[la]] = fold(g[f"{la}a"] - g[f"{la}m"])
    return out.detach()


def gradient_scores(job: Job, alphas: Sequence[float]) -> Float[Tensor, "edge batch"]:
    """``Delta_s . grad_r`` per example for every edge row ``(s, r, p)``.

    Under a shard, the alphas are the rows (each rank's products summed over the ranks: the
    scores are linear in the gradient); with one alpha at the clean input (EAP) the examples
    are split instead."""
    shard = current()
    if shard is not None and len(alphas) == 1 and float(alphas[0]) == 1.0:
        B = job.runs.batch
        with Share("gradients (examples)", B) as share:
            mine = share.block(B)
            if len(mine):
                G = receiver_grads(job, alphas, examples=mine)
                share.put(mine, _products(job, G, slice(mine.start, mine.stop)).T)
        out = torch.empty(len(job.table), B, dtype=job.bk.dtype, device=job.bk.device)
        share.fill(out.T)
        return out
    with Share("gradients", len(alphas)) as share:
        rows = share.mine(list(alphas))
        if rows:
            G = receiver_grads(job, rows, n_total=len(alphas))
            share.add(_products(job, G))
    return share.sum(device=job.bk.device)


def _products(
    job: Job, G: Float[Tensor, "receiver batch pos d_model"], ex: slice = slice(None)
) -> Float[Tensor, "edge batch"]:
    """``Delta_s . G_r`` per example for every edge row (examples ``ex`` of the batch)."""
    D = job.delta()[:, ex]
    S, B, P, dm = D.shape
    table = job.table
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
