"""The corpus as fixed-length token blocks, per domain and split: what pretraining and the study feed the model.

Each domain's documents (in corpus order) are tokenised, joined with ``<|endoftext|>`` after each
one and cut into blocks of ``seq_len`` tokens; the last partial block is dropped. A block is scored
like any causal-LM sequence: every token after its first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chronovisor.eval.corpus import DOMAINS, SPLITS
from chronovisor.eval.data import ConversationBatch, pad_batch


@dataclass
class DomainBlocks:
    """The token blocks of one (domain, split).

    Attributes:
        domain, split: which part of the corpus.
        ids: ``[N, seq_len]`` int64 blocks.
        documents: documents tokenised.
        tokens: tokens of those documents, separators included (before the partial block is dropped).
    """

    domain: str
    split: str
    ids: torch.Tensor
    documents: int
    tokens: int

    def as_batch(self, pad_token_id: int) -> ConversationBatch:
        """The blocks as a :class:`ConversationBatch` (one turn each, topic = nothing), e.g. for
        :func:`~chronovisor.eval.baselines.ngram_baselines`."""
        sequences = [row.numpy() for row in self.ids]
        turns = [np.zeros(len(row), dtype=np.int64) for row in sequences]
        return pad_batch(sequences, turns, [[0]] * len(sequences), [-1] * len(sequences), (), pad_token_id)


def pack_blocks(documents: list[list[int]], seq_len: int, separator: int) -> torch.Tensor:
    """Join the documents (each followed by ``separator``) and cut ``[N, seq_len]`` blocks, remainder dropped.

    Args:
        documents: token ids per document, in order.
        seq_len: block length.
        separator: the id appended after each document.
    """
    stream = np.fromiter((token for doc in documents for token in (*doc, separator)), dtype=np.int64)
    count = len(stream) // seq_len
    return torch.from_numpy(stream[: count * seq_len].reshape(count, seq_len).copy())


def corpus_blocks(corpus, tokenizer, seq_len: int) -> dict[tuple[str, str], DomainBlocks]:
    """Every (domain, split) of a corpus as blocks.

    Args:
        corpus: the ``datasets.DatasetDict`` of :func:`~chronovisor.eval.corpus.load_corpus`.
        tokenizer: a transformers tokenizer with an ``eos_token_id``.
        seq_len: block length.
    """
    blocks = {}
    for split in SPLITS:
        rows = corpus[split]
        ids = tokenizer(list(rows["text"]), add_special_tokens=False)["input_ids"]
        names = list(rows["domain"])
        for domain in DOMAINS:
            docs = [doc for doc, name in zip(ids, names, strict=True) if name == domain]
            blocks[domain, split] = DomainBlocks(domain, split, pack_blocks(docs, seq_len, tokenizer.eos_token_id),
                                                 len(docs), sum(len(doc) + 1 for doc in docs))
    return blocks


def blocks_with_labels(blocks: dict[tuple[str, str], DomainBlocks], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All domains' blocks of ``split`` stacked, with each block's domain index (into DOMAINS)."""
    parts = [blocks[domain, split].ids for domain in DOMAINS]
    labels = [torch.full((len(part),), index, dtype=torch.long) for index, part in enumerate(parts)]
    return torch.cat(parts), torch.cat(labels)
