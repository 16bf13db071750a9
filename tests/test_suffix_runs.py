"""Runs from a block on, read from a position on (:func:`apexlens.runs.suffix.run_suffix_rows`).

The last block computes its output only at the positions the result is read from; the
positions before give it their keys and values. Checked here against the same rows run at
every position (float64), on the architectures whose position handling differs: plain,
rotary, ALiBi, shortformer, local windows, grouped-query. Each engine that uses it is
checked against the naive loops in ``test_architectures.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import apexlens
from apexlens.model import edits
from apexlens.runs.suffix import last_block_from, run_suffix_rows

from helpers import random_tokens

pytestmark = pytest.mark.requires_hooked

ARCH = {
    "plain": {},
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=4),
    "alibi": dict(positional_embedding_type="alibi"),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "local-window": dict(use_local_attn=True, attn_types=["local", "global", "local"], window_size=3),
    "gqa": dict(n_key_value_heads=2),
}


def _model(arch: str) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=24, n_ctx=12, d_head=6, n_heads=4, d_mlp=48, d_vocab=41,
        act_fn="gelu", dtype=torch.float64, **ARCH[arch],
    )
    model = HookedTransformer(cfg)
    for p in model.parameters():  # random weights everywhere (biases included)
        p.data.normal_(0, 0.3)
    return model.eval()


def _rows(arch: str, start: int, p0: int) -> tuple[Any, torch.Tensor, list[Any]]:
    """The experiment's runs, ``resid`` of 3 rows entering ``start`` (positions ``p0..``,
    each row changed), and position-wise hooks at every block from ``start`` on."""
    model = _model(arch)
    clean, corrupted = random_tokens(model, batch=2, n_pos=10)
    metric = apexlens.LogitDiff(torch.tensor([1]), torch.tensor([2]))
    exp = apexlens.Experiment(model, clean, corrupted, metric=metric)
    runs = exp.runs
    bk = runs.bk
    g = torch.Generator().manual_seed(5)
    base = runs.clean.resid(start, bk)[:, p0:]
    resid = base + 0.5 * torch.randn(3, *base.shape, generator=g, dtype=base.dtype)
    n_kv = runs.bk.model.cfg.n_key_value_heads or 4
    hooks = []
    for layer in range(start, 3):
        v = torch.randn(3 * 2, 10 - p0, n_kv, 6, generator=g, dtype=base.dtype)
        hooks.append((f"blocks.{layer}.attn.hook_v", edits.replace(v)))
        q = torch.randn(3 * 2, 10 - p0, 4, 6, generator=g, dtype=base.dtype)
        where = torch.rand(3 * 2, 10 - p0, 4, generator=g) < 0.5
        hooks.append((f"blocks.{layer}.attn.hook_q", edits.set_heads(list(range(4)), q, where)))
    return runs, resid, hooks


@pytest.mark.parametrize("arch", list(ARCH))
@pytest.mark.parametrize("start,p0", [(0, 0), (1, 3), (2, 0), (2, 4)])
def test_the_last_block_at_the_read_positions_only(arch: str, start: int, p0: int) -> None:
    runs, resid, hooks = _rows(arch, start, p0)
    whole = run_suffix_rows(runs, runs.clean, resid, start, p0, hooks)
    assert not whole.isnan().any()
    read = 7
    assert last_block_from(runs.bk, start, p0, read, hooks) == read
    part = run_suffix_rows(runs, runs.clean, resid, start, p0, hooks, read_from=read)
    torch.testing.assert_close(part[:, :, read:], whole[:, :, read:], rtol=0, atol=1e-12)
    assert part[:, :, :read].isnan().all()  # never a number that was not computed
    moved = (whole[:, :, read:] - runs.clean.final[None, :, read:]).abs().max()
    assert moved > 1e-2  # the rows and hooks changed what is read


def test_hooks_that_are_not_positionwise_keep_the_run_whole() -> None:
    runs, resid, hooks = _rows("plain", 1, 0)
    seen: dict[str, torch.Tensor] = {}
    spy = ("blocks.2.attn.hook_k", edits.save(seen, "k"))  # records: not position-wise
    assert last_block_from(runs.bk, 1, 0, 7, [*hooks, spy]) == 0
    out = run_suffix_rows(runs, runs.clean, resid, 1, 0, [*hooks, spy], read_from=7)
    assert not out.isnan().any()
    assert seen["k"].shape[1] == 10  # it saw every position
    # a position-wise edit at a hook point that sees every position at once: whole too
    pat = ("blocks.2.attn.hook_pattern", edits.replace_where(None, torch.zeros(1)))
    assert last_block_from(runs.bk, 1, 0, 7, [*hooks, pat]) == 0
    # a callable value is position-wise only where its maker says so
    fn = ("blocks.2.attn.hook_q", edits.replace(lambda a: a * 2))
    assert last_block_from(runs.bk, 1, 0, 7, [fn]) == 0
    fn = ("blocks.2.attn.hook_q", edits.replace(lambda a: a * 2, positionwise=True))
    assert last_block_from(runs.bk, 1, 0, 7, [fn]) == 7


def test_a_prefix_stops_at_the_last_blocks_keys() -> None:
    """A prefix run records every block's keys and values and computes nothing after the last
    block's: its attention pattern never forms."""
    runs, _, _ = _rows("plain", 0, 0)
    model, bk = runs.bk.model, runs.bk
    fired: list[str] = []
    for name in ("blocks.1.attn.hook_pattern", "blocks.2.attn.hook_pattern", "blocks.2.hook_mlp_out"):
        model.hook_dict[name].add_hook(lambda a, hook: fired.append(hook.name))
    try:
        pre = bk.prefix(runs.clean.resid(1, bk)[:, :4], 1)
    finally:
        model.reset_hooks()
    assert fired == ["blocks.1.attn.hook_pattern"]
    k_entry = pre.slots[2]
    torch.testing.assert_close(
        k_entry.past_keys, runs.clean[bk.qkv(2, "k")][:, :4], rtol=0, atol=1e-12
    )


def test_a_hook_of_the_users_on_the_last_block_keeps_the_run_whole() -> None:
    """A hook of someone else's may depend on every position (noise drawn in the activation's
    shape, an edit at a fixed query): with one on the last block, that block runs whole."""
    runs, resid, hooks = _rows("plain", 1, 0)
    model = runs.bk.model
    assert last_block_from(runs.bk, 1, 0, 7, hooks) == 7
    handle = model.blocks[2].attn.hook_pattern.register_forward_hook(lambda m, i, o: None)
    try:
        assert last_block_from(runs.bk, 1, 0, 7, hooks) == 0
        assert not run_suffix_rows(runs, runs.clean, resid, 1, 0, hooks, read_from=7).isnan().any()
    finally:
        handle.remove()
    with apexlens.noise_hooks(model, 0.1, seed=0):
        assert last_block_from(runs.bk, 1, 0, 7, hooks) == 0
    assert last_block_from(runs.bk, 1, 0, 7, hooks) == 7
