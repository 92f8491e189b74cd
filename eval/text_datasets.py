"""Conversations and plain text from local files through HF ``datasets``, tokenised with a local tokenizer.

    dataset = load_lm_dataset("chat.jsonl", "my-tokenizer")     # {"turns": [...]} per line
    dataset = load_lm_dataset("corpus.txt", tokenizer)          # one sequence per non-empty line
    trainer = Trainer(..., train_dataset=dataset, data_collator=lm_collator(tokenizer))

Files go through ``load_dataset("json" | "text", data_files=...)``: local files only, nothing
from the hub. Every row gets ``input_ids``, ``attention_mask`` and ``labels`` (= ``input_ids``,
unshifted, the HF causal-LM convention of :mod:`chronovisor.eval.data`); :func:`lm_collator` pads
a batch of rows (labels with −100). Conversations are tokenised turn by turn without special
tokens, like :func:`chronovisor.eval.jsonl.load_jsonl`; both kinds start with the tokenizer's BOS
when it has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from chronovisor.eval.data import IGNORE_INDEX, ConversationBatch, pad_batch

#: File suffixes read as JSON lines of conversations; anything else is plain text.
CONVERSATION_SUFFIXES = (".jsonl", ".json")
#: The columns every loaded row has.
COLUMNS = ("input_ids", "attention_mask", "labels")


def local_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object from a local directory (``AutoTokenizer``, no hub) or as given, with a pad
    token (eos when it has none).

    Args:
        tokenizer: a local tokenizer directory or a tokenizer object.
    """
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: not a local tokenizer directory")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lm_dataset(path: str | Path, tokenizer: Any, *, max_length: int = 512) -> Any:
    """A tokenised ``datasets.Dataset`` of the conversations (``.jsonl``/``.json``) or text (else) in ``path``.

    Args:
        path: a local file: JSON lines ``{"turns": [str, ...]}`` (other keys are dropped), or
            plain text with one sequence per non-empty line.
        tokenizer: a local tokenizer directory or a tokenizer object (see :func:`local_tokenizer`).
        max_length: each sequence is truncated to this many tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 (got {max_length})")
    tokenizer = local_tokenizer(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    conversations = path.suffix in CONVERSATION_SUFFIXES
    raw = _load(path, "json" if conversations else "text")
    if conversations:
        if "turns" not in raw.column_names:
            raise ValueError(f'{path}: expected one object with a "turns" list per line (got keys '
                             f'{", ".join(raw.column_names)})')
        for row, turns in enumerate(raw["turns"], start=1):
            _check_turns(turns, path, row)
    else:
        raw = raw.filter(lambda row: bool(row["text"].strip()))
    if not len(raw):
        raise ValueError(f"{path}: no sequences")

    def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
        ids = list(bos)
        for text in row["turns"] if conversations else [row["text"]]:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    dataset = raw.map(tokenize, remove_columns=raw.column_names)
    empty = [index for index, ids in enumerate(dataset["input_ids"], start=1) if not ids]
    if empty:
        raise ValueError(f"{path}: sequence {empty[0]} tokenises to no tokens")
    return dataset


def _load(path: Path, builder: str) -> Any:
    """``load_dataset(builder, data_files=path)["train"]``, with a one-line error naming the file."""
    from datasets import load_dataset

    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parse errors in several exception types
        raise ValueError(f"{path}: cannot be read as {builder} by datasets ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None


def _check_turns(turns: Any, path: Path, row: int) -> None:
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f'{path}: row {row}: "turns" must be a non-empty list of strings')


def lm_collator(tokenizer: Any) -> Any:
    """Pads rows of :func:`load_lm_dataset` into a batch: ``input_ids`` with the pad token,
    ``attention_mask`` with 0, ``labels`` with −100 (transformers' ``DataCollatorForSeq2Seq``).

    Args:
        tokenizer: the tokenizer the rows were made with (see :func:`local_tokenizer`).
    """
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(local_tokenizer(tokenizer), label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def as_conversation_batch(dataset: Any, pad_token_id: int) -> ConversationBatch:
    """The rows of a :func:`load_lm_dataset` dataset as one right-padded
    :class:`~chronovisor.eval.data.ConversationBatch` (every token in turn 0, no topics).

    Args:
        dataset: rows with ``input_ids``.
        pad_token_id: the id that pads.
    """
    sequences = [np.asarray(ids, dtype=np.int64) for ids in dataset["input_ids"]]
    turns = [np.zeros(len(ids), dtype=np.int64) for ids in sequences]
    return pad_batch(sequences, turns, [[0] for _ in sequences], [-1] * len(sequences), (), pad_token_id)
