"""GPT-2's tokenizer built offline from its BPE files (``vocab.json`` + ``merges.txt``).

The model hub is not always reachable; GPT-2's byte-level BPE is fully described by two
files, so a ``transformers.PreTrainedTokenizerFast`` can be built from them directly.
``transformers`` and ``tokenizers`` are only needed when this function is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apexlens.errors import ApexlensError

EOT = "<|endoftext|>"


def gpt2_tokenizer(path: str | Path) -> Any:
    """GPT-2's tokenizer from the folder ``path`` holding ``vocab.json`` and ``merges.txt``.

    ``<|endoftext|>`` (id 50256) is the BOS, EOS and padding token, as in GPT-2, and it is
    prepended by ``encode`` as in TransformerLens' copy of GPT-2's tokenizer.
    """
    folder = Path(path)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise ApexlensError(f"GPT-2 tokenizer file {f} does not exist")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - dev extra
        raise ApexlensError(
            f"building GPT-2's tokenizer needs `tokenizers` and `transformers` ({e})"
        ) from e
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # add_bos_token=True, as TransformerLens configures GPT-2's tokenizer (it would otherwise
    # fetch a BOS-adding copy from the hub by name): encode(text) starts with <|endoftext|>,
    # encode(text, add_special_tokens=False) gives the raw ids.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        name_or_path="gpt2",
        add_bos_token=True,
    )
