"""GPT-2's tokenizer offline, the IOI task, and IOI path patching on a GPT-2-shaped model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import apexlens
from apexlens.toys.tasks import get_task
from apexlens.toys.tasks.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, IOITask
from apexlens.toys.tokenizer import gpt2_tokenizer

DATA = Path(__file__).parent / "data" / "gpt2-tokenizer"
BOS = 50256


@pytest.fixture
def tok(gpt2_tokenizer):
    return gpt2_tokenizer  # the session fixture in conftest.py


def test_tokenizer_is_gpt2s(tok):
    raw = lambda text: tok.encode(text, add_special_tokens=False)
    assert raw(" Mary") == [5335] and raw(" John") == [1757]
    assert tok.encode(" Mary") == [BOS, 5335]  # BOS first, like TransformerLens' GPT-2 tokenizer
    assert tok.bos_token_id == BOS and tok.decode(raw("Hello world, Mary!")) == "Hello world, Mary!"
    assert (DATA / "LICENSE").is_file()
    with pytest.raises(apexlens.ApexlensError, match="does not exist"):
        gpt2_tokenizer(DATA / "nowhere")


def test_hand_tokenised_prompts(tok):
    task = IOITask(tok, order="BABA")
    # "Then, John and Mary went to the store. John gave a ring to" -- ids from GPT-2's tokenizer
    text = task.prompt(BABA_TEMPLATES[0], "Mary", "John", "store", "ring")
    assert text == "Then, John and Mary went to the store. John gave a ring to"
    assert task.encode(text) == [
        BOS,
        6423,
        11,
        1757,
        290,
        5335,
        1816,
        284,
        262,
        3650,
        13,
        1757,
        2921,
        257,
        5858,
        284,
    ]
    abba = IOITask(tok, order="ABBA").prompt(ABBA_TEMPLATES[0], "Mary", "John", "store", "ring")
    assert abba == "Then, Mary and John went to the store. John gave a ring to"
    batch = task.batch(8, seed=0, template=0)
    for i in range(8):
        ids = batch.clean_tokens[i]
        io, s1, s2 = (int(batch.named_positions[k][i]) for k in ("IO", "S1", "S2"))
        # BABA: "Then, [S] and [IO] went to the [PLACE]. [S] gave a [OBJ] to"
        assert (s1, io, s2) == (3, 5, 11) and int(batch.positions[i]) == 15 == ids.shape[0] - 1
        assert (
            ids[0] == BOS
            and ids[io] == batch.answer_tokens[i]
            and ids[s1] == ids[s2] == batch.wrong_tokens[i]
        )
        # ABC corruption: only S2 changes, to a third name
        corr = batch.corrupted_tokens[i]
        assert (corr != ids).nonzero().flatten().tolist() == [s2]
        assert len({int(ids[io]), int(ids[s1]), int(corr[s2])}) == 3
        words = task.token_labels(ids)
        assert words[1] == "Then" and words[s2].strip() == tok.decode([int(ids[s1])]).strip()


def test_batches_equal_length_and_seeded(tok):
    task = get_task("ioi", tokenizer=tok)
    for seed in range(6):
        b = task.batch(16, seed=seed)
        assert b.clean_tokens.shape == b.corrupted_tokens.shape and b.clean_tokens.shape[0] == 16
        assert (b.answer_tokens != b.wrong_tokens).all()
    a, b = task.batch(16, seed=3), task.batch(16, seed=3)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(
        a.corrupted_tokens, b.corrupted_tokens
    )
    assert len(task.names) > 50  # the paper's list, filtered to single GPT-2 tokens
    for template in range(len(task.templates())):
        task.batch(2, seed=0, template=template)  # every template tokenises its names cleanly


@pytest.mark.requires_hooked
def test_ioi_path_patching_on_random_gpt2_shape(tok):
    from apexlens.toys.models import random_gpt2_small

    model = random_gpt2_small(seed=0, n_ctx=64, tokenizer=tok)
    task = IOITask(model.tokenizer)
    batch = task.batch(4, seed=0, template=0)
    prompt = task.prompt(BABA_TEMPLATES[0], "Mary", "John", "store", "ring")
    assert model.to_tokens(prompt)[0].tolist() == task.encode(prompt)
    exp = apexlens.Experiment(
        model,
        batch.clean_tokens,
        batch.corrupted_tokens,
        metric=batch.logit_diff(),
        positions=batch.named_positions,
    )
    to_logits = exp.path_patch("all-heads", "logits")
    assert to_logits.values.shape == (12, 12) and torch.isfinite(to_logits.values).all()
    movers = exp.path_patch("all-heads", ["9.9.q", "9.6.q", "10.0.q"])
    assert movers.values.shape == (12, 12)
    torch.testing.assert_close(
        movers.per_example[11 * 12 :], exp.clean_values.expand(12, -1)
    )  # after receivers
    assert not torch.allclose(movers.per_example[: 9 * 12], exp.clean_values.expand(9 * 12, -1))
    at_end = exp.path_patch("heads:8", ["9.9.q@end"])
    assert at_end.per_example.shape == (12, 4)
