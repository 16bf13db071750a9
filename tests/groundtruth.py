"""Models whose circuit is known by construction (hand-set weights, no LayerNorm).

``induction_model``: 2 layers, 2 heads each, attention only. The residual stream is split
into subspaces: ``A`` (token one-hot), ``P`` (position one-hot), ``B`` (previous token),
``D`` (the answer, read by the unembedding) and ``E`` (a sink nobody reads).

* head 0.0, previous-token head: q/k read ``P`` (position ``i`` attends ``i - 1``), v reads
  ``A``, writes ``B``;
* head 1.0, induction head: q reads ``A`` (current token), k reads ``B`` (the token before
  the key), v reads ``A``, writes ``D``;
* heads 0.1 and 1.1: random reads, write only ``E``.

On ``[t0 t1 t2 t3 t0 t1 t2] -> t3`` with a corrupted first half, exactly these edges carry
the signal: ``embed -> 0.0.v``, ``0.0 -> 1.0.k``, ``embed -> 1.0.v``, ``1.0 -> logits``
(the queries see unchanged tokens and positions; everything else is read by nobody).

``mlp_model``: the same previous-token head, then MLP 0 (ReLU) copies ``B`` into ``D``:
``embed -> 0.0.v``, ``0.0 -> m0``, ``m0 -> logits``; head 0.1 and MLP 1 write ``E``.
"""

from __future__ import annotations

from typing import Any

import torch

from backends import build, hooked_param_shapes

V, T = 8, 8  # vocabulary, context
A, P, B, D, E = (slice(i * 8, (i + 1) * 8) for i in range(5))
D_MODEL = 40
LAM = 12.0

INDUCTION_EDGES = [("embed", "0.0.v"), ("0.0", "1.0.k"), ("embed", "1.0.v"), ("1.0", "logits")]
MLP_EDGES = [("embed", "0.0.v"), ("0.0", "m0"), ("m0", "logits")]


def _cfg(attn_only: bool, n_layers: int) -> dict[str, Any]:
    return dict(
        n_layers=n_layers,
        d_model=D_MODEL,
        n_ctx=T,
        d_head=8,
        n_heads=2,
        d_mlp=None if attn_only else 16,
        attn_only=attn_only,
        d_vocab=V,
        act_fn="relu",
        normalization_type=None,
    )


def _zeros(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(s, dtype=torch.float64) for n, s in hooked_param_shapes(cfg)}


def _embed(sd: dict[str, torch.Tensor]) -> None:
    sd["embed.W_E"][:, A] = torch.eye(V, dtype=torch.float64)
    sd["pos_embed.W_pos"][:, P] = torch.eye(T, dtype=torch.float64)


def _prev_token_head(sd: dict[str, torch.Tensor]) -> None:
    eye = torch.eye(8, dtype=torch.float64)
    sd["blocks.0.attn.W_Q"][0, P] = LAM * eye  # query at i: e_i
    shift = torch.zeros(8, 8, dtype=torch.float64)
    for j in range(T - 1):
        shift[j, j + 1] = 1.0  # key at j: e_{j+1}, so query i matches key i - 1
    sd["blocks.0.attn.W_K"][0, P] = LAM * shift
    sd["blocks.0.attn.W_V"][0, A] = eye
    sd["blocks.0.attn.W_O"][0][:, B] = eye


def _sink_head(sd: dict[str, torch.Tensor], layer: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for w in ("W_Q", "W_K", "W_V"):
        sd[f"blocks.{layer}.attn.{w}"][1] = torch.randn(
            D_MODEL, 8, generator=g, dtype=torch.float64
        )
    sd[f"blocks.{layer}.attn.W_O"][1][:, E] = torch.randn(8, 8, generator=g, dtype=torch.float64)


def induction_model(backend: str | None = None) -> Any:
    from backends import default_backend

    cfg = _cfg(True, 2)
    sd = _zeros(cfg)
    _embed(sd)
    _prev_token_head(sd)
    eye = torch.eye(8, dtype=torch.float64)
    sd["blocks.1.attn.W_Q"][0, A] = LAM * eye
    sd["blocks.1.attn.W_K"][0, B] = LAM * eye
    sd["blocks.1.attn.W_V"][0, A] = eye
    sd["blocks.1.attn.W_O"][0][:, D] = eye
    _sink_head(sd, 0, 1)
    _sink_head(sd, 1, 2)
    sd["unembed.W_U"][D] = eye
    return build(cfg, sd, backend or default_backend())


def mlp_model(backend: str | None = None) -> Any:
    from backends import default_backend

    cfg = _cfg(False, 2)
    sd = _zeros(cfg)
    _embed(sd)
    _prev_token_head(sd)
    eye = torch.eye(8, dtype=torch.float64)
    sd["blocks.0.mlp.W_in"][B, :8] = eye
    sd["blocks.0.mlp.W_out"][:8, D] = 2 * eye
    sd["blocks.1.mlp.W_in"][A, 8:] = eye
    sd["blocks.1.mlp.W_out"][8:, E] = eye
    _sink_head(sd, 0, 3)
    _sink_head(sd, 1, 4)
    sd["unembed.W_U"][D] = eye
    return build(cfg, sd, backend or default_backend())


def induction_data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``[t0 t1 t2 t3 t0 t1 t2]`` -> ``t3``; corrupted: a fresh first half. Metric: logit
    of ``t3`` minus the logit of the corrupted first half's ``t3'``."""
    from apexlens.scoring import LogitDiff

    g = torch.Generator().manual_seed(seed)
    clean = torch.empty(n, 7, dtype=torch.long)
    corrupted = torch.empty(n, 7, dtype=torch.long)
    for i in range(n):
        perm = torch.randperm(V, generator=g)
        first, fresh = perm[:4], perm[4:]
        clean[i] = torch.cat([first, first[:3]])
        corrupted[i] = torch.cat([fresh, first[:3]])
    return clean, corrupted, LogitDiff(clean[:, 3], corrupted[:, 3])


def copy_prev_data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Random tokens; the MLP model copies the previous token: at the last position the
    answer is the token before it. Corrupted: another token there."""
    from apexlens.scoring import LogitDiff

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (n, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, -2] = (clean[:, -2] + 1 + torch.randint(0, V - 1, (n,), generator=g)) % V
    return clean, corrupted, LogitDiff(clean[:, -2], corrupted[:, -2])
