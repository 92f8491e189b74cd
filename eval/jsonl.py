"""Conversations for real models from a JSONL file: one ``{"turns": [str, ...], "topic": str?}`` per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from chronovisor.eval.data import ConversationBatch, pad_batch
from chronovisor.eval.synthetic import PHASES


def load_jsonl(
    path: str | Path,
    tokenizer: Any,
    *,
    max_length: int = 1024,
    num_turn_ids: int = len(PHASES),
    prepend_bos: bool = True,
) -> ConversationBatch:
    """Load conversations from a JSONL file, one ``{"turns": [str, ...], "topic": str?}`` per line.

    Args:
        path: the JSONL file. Blank lines are skipped.
        tokenizer: a local tokenizer directory (loaded with ``AutoTokenizer.from_pretrained``) or a
            tokenizer object.
        max_length: conversations are truncated to this many tokens (turns starting later dropped).
        num_turn_ids: turn index of a token, capped at ``num_turn_ids − 1`` (later turns share it).
        prepend_bos: put the tokenizer's BOS (if it has one) before the first turn, in turn 0.

    Each turn is tokenised on its own without special tokens, so boundaries are exact; for
    whitespace-sensitive tokenizers put the separator (" ", "\\n") into the turn text. Padding uses
    the tokenizer's pad token, falling back to eos when it has none (harmless: padding is marked by
    ``attention_mask`` and −100 labels, never by the id). ``topic_ids`` index the sorted topic names
    (−1 where a line has none).
    """
    path = Path(path)
    conversations = read_conversations(path)
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 (got {max_length})")
    if num_turn_ids < 1:
        raise ValueError(f"num_turn_ids must be at least 1 (got {num_turn_ids})")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []


    topic_names = tuple(sorted({topic for _, _, topic in conversations if topic is not None}))
    sequences, turn_sequences, boundaries, topic_ids = [], [], [], []
    for line_number, turns, topic in conversations:
        tokens: list[int] = list(bos)
        turn_of_token: list[int] = [0] * len(bos)
        starts: list[int] = []
        for index, text in enumerate(turns):
            if len(tokens) >= max_length:
                break
            starts.append(0 if index == 0 else len(tokens))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens.extend(ids)
            turn_of_token.extend([min(index, num_turn_ids - 1)] * len(ids))
        if not tokens:
            raise ValueError(f"{path}:{line_number}: the conversation tokenises to no tokens")
        sequences.append(np.asarray(tokens[:max_length], dtype=np.int64))
        turn_sequences.append(np.asarray(turn_of_token[:max_length], dtype=np.int64))
        boundaries.append(starts)
        topic_ids.append(topic_names.index(topic) if topic is not None else -1)
    return pad_batch(sequences, turn_sequences, boundaries, topic_ids, topic_names, pad_token_id)


def read_conversations(path: str | Path) -> list[tuple[int, list[str], str | None]]:
    """Every conversation of a JSONL file as ``(line number, turns, topic)``, checked line by line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``FILE:LINE: what is wrong`` for the first malformed line (not JSON, not an
            object with a non-empty ``"turns"`` list of strings, a non-string ``"topic"``, not
            UTF-8), or a file without any conversation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    conversations: list[tuple[int, list[str], str | None]] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text") from None
            if line.strip():
                conversations.append((line_number, *_parse_line(line, path, line_number)))
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def _parse_line(line: str, path: Path, line_number: int) -> tuple[list[str], str | None]:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or "turns" not in record:
        raise ValueError(f'{where}: expected an object with a "turns" list')
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f'{where}: "turns" must be a non-empty list of strings')
    topic = record.get("topic")
    if topic is not None and not isinstance(topic, str):
        raise ValueError(f'{where}: "topic" must be a string')
    return turns, topic
