"""A byte-level BPE tokenizer trained with HF ``tokenizers`` and saved in transformers format.

Byte-level, so every string (code, prose, any Unicode) round-trips exactly: ``decode(encode(text))
== text``. One special token, ``<|endoftext|>``, serves as BOS, EOS and padding (padding is marked by
the attention mask and −100 labels, never by the id). Training is deterministic for a fixed text
order and vocabulary size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: The one special token: document separator, BOS, EOS and pad.
END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Args:
        texts: the training texts, in a fixed order (the corpus's training split).
        vocab_size: the vocabulary size, special token and the 256 byte symbols included (>= 512).
        out_dir: if given, ``save_pretrained`` there (``tokenizer.json`` + its config), loadable with
            ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 byte symbols + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, clean_up_tokenization_spaces=False)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
