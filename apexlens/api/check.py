"""``apexlens.check(model)``: does apexlens compute this model exactly? A self-check.

Every engine of apexlens rebuilds pieces of the model's forward pass from its weights and
modules (:class:`~apexlens.model.Backend`): a head's q/k/v input from the residual stream,
what attention and the MLP add to the residual stream, the logits of a final residual, a
head's ``z`` under its own key/value input. :func:`check` runs one forward pass of a few
tokens and compares each rebuilt piece with the model's own hook values, in this order:

1. ``logits``: the unembedding (with the soft cap where there is one) of the final residual;
2. per block: ``hook_q``/``hook_k``/``hook_v`` from ``hook_resid_pre``; ``hook_z`` from
   the block's attention under those inputs (grouped-query layers); ``hook_attn_out`` from
   the heads' ``hook_z`` (``sum z W_O + b_O``, post-attention norm included); ``hook_mlp_out``
   from the residual stream the MLP reads;
3. ``resid_final``: embeddings + every ``hook_attn_out`` + every ``hook_mlp_out`` reproduce
   the final residual stream;
4. ``null patch``: path patching the clean input into itself leaves every metric unchanged
   (heads, an MLP and the embeddings into q/k/v, MLP and logits receivers).

It returns a :class:`CheckResult` -- ``.ok``, ``.first_failure`` (the first disagreeing
hook, with its error and tolerance), ``.checks`` (all of them) -- and does not raise;
``result.raise_if_failed()`` raises one :class:`~apexlens.errors.ApexlensError` naming the
first failure. :func:`apexlens.load_model` runs it on every pretrained model it loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from apexlens.errors import ApexlensError
from apexlens.model import backend_for
from apexlens.model.hooks import inference_mode

__all__ = ["CheckResult", "check"]

_TOL = {torch.float64: 1e-7, torch.float32: 1e-3}


@dataclass
class CheckResult:
    """What :func:`check` found: ``checks`` are ``(what, error, tolerance)``, in order; the
    error is ``max |rebuilt - model| / max(1, max |model|)``."""

    checks: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    @property
    def first_failure(self) -> tuple[str, float, float] | None:
        return next((c for c in self.checks if not c[1] <= c[2]), None)

    def raise_if_failed(self) -> CheckResult:
        bad = self.first_failure
        if bad is not None:
            raise ApexlensError(
                f"apexlens cannot compute this model exactly: {bad[0]} disagrees with the model's "
                f"own forward pass (relative error {bad[1]:.2e} > {bad[2]:.0e}); please report it "
                "with the model's config"
            )
        return self

    def __repr__(self) -> str:
        bad = self.first_failure
        state = "ok" if bad is None else f"FAILED at {bad[0]} (error {bad[1]:.2e} > {bad[2]:.0e})"
        return f"CheckResult({state}, {len(self.checks)} checks)"


def _err(got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    want64, got64 = want.double(), got.double()
    scale = max(1.0, float(want64.abs().max())) if want64.numel() else 1.0
    return float((got64 - want64).abs().max()) / scale if want64.numel() else 0.0


def check(model: Any, tokens: Tensor | None = None, *, tol: float | None = None) -> CheckResult:
    """Check that apexlens' rebuilt forward pieces equal ``model``'s own (module docstring).

    ``tokens``: ``[batch, pos]`` ids (default: 2 x 8 seeded random ids). ``tol``: relative
    tolerance (default 1e-7 in float64, 1e-3 in float32, 5e-2 otherwise).
    """
    from apexlens.api.experiment import Experiment
    from apexlens.runs import check_tokens
    from apexlens.scoring import LogitDiff

    bk = backend_for(model)
    d = bk.dims
    if tokens is None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, d.d_vocab_in, (2, min(8, d.n_ctx)), generator=g)
    tokens = check_tokens(bk, tokens)
    if tol is not None and (
        isinstance(tol, bool)
        or not isinstance(tol, (int, float))
        or not math.isfinite(tol)
        or tol < 0
    ):
        raise ApexlensError(f"tol must be a finite number >= 0 (or None), got {tol!r}")
    tol = tol if tol is not None else _TOL.get(bk.dtype, 5e-2)
    out = CheckResult()

    def add(what: str, got: Tensor, want: Tensor) -> None:
        out.checks.append((what, _err(got, want), tol))

    names = [bk.resid_pre(0)]
    for la in range(d.n_layers):
        names += [bk.resid_pre(la), bk.z(la), bk.attn_out(la), *(bk.qkv(la, c) for c in "qkv")]
        if d.has_mlps:
            names += [bk.mlp_in_resid(la), bk.mlp_out(la)]
    with inference_mode(model):
        logits, cache = bk.run_with_cache(tokens, names)
        final, _ = bk.run_with_cache(tokens, [], logits=False)
        add("logits", bk.unembed(final), logits)
        total = cache[bk.resid_pre(0)].clone()
        for la in range(d.n_layers):
            resid = cache[bk.resid_pre(la)]
            for c in "qkv":
                add(bk.qkv(la, c), bk.head_input(la, c, resid), cache[bk.qkv(la, c)])
            if d.group > 1:
                qkv = [cache[bk.qkv(la, c)] for c in "qkv"]
                add(f"{bk.z(la)} (grouped-query)", bk.attn_z(la, resid, *qkv), cache[bk.z(la)])
            add(bk.attn_out(la), bk.attn_output(la, cache[bk.z(la)]), cache[bk.attn_out(la)])
            total = total + cache[bk.attn_out(la)]
            if d.has_mlps:
                mlp = bk.mlp_from_resid(la, cache[bk.mlp_in_resid(la)])
                add(bk.mlp_out(la), mlp, cache[bk.mlp_out(la)])
                total = total + cache[bk.mlp_out(la)]
        add("resid_final (embeddings + attention + MLP outputs)", total, final)
    if out.ok:
        last = d.n_layers - 1
        senders = ["embed", "0.0"] + (["m0"] if d.has_mlps else [])
        receivers = [f"{last}.0", "logits"] + ([f"m{last}"] if d.has_mlps else [])
        metric = LogitDiff(
            torch.zeros(tokens.shape[0], dtype=torch.long),
            torch.ones(tokens.shape[0], dtype=torch.long),
            positions=-1,
        )
        exp = Experiment(model, tokens, tokens, metric=metric)
        res = exp.path_patch(senders, receivers, progress=False)  # a check, not a question
        clean = exp.clean_values.expand_as(res.per_example)
        add("null patch (clean into clean)", res.per_example, clean)
    return out
