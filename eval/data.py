"""The conversation batch every evaluation module passes around, and how it is split and iterated.

Batch convention (:class:`ConversationBatch`), shapes [B, S] right-padded:
    ``labels`` = ``input_ids`` with padding set to ``IGNORE_INDEX`` (−100), **not shifted**:
    HuggingFace ``*ForCausalLM`` models shift inside the loss (logits[:, t] is scored against
    labels[:, t + 1]). Code that computes per-token losses itself uses :func:`next_token_labels`.

Batches come from the synthetic world (:mod:`chronovisor.eval.synthetic`) or from JSONL files
(:mod:`chronovisor.eval.jsonl`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

PAD_ID = 0
IGNORE_INDEX = -100


@dataclass
class ConversationBatch:
    """A right-padded batch of conversations.

    Fields (B conversations, S = longest conversation):
        input_ids: [B, S] long, padded with ``pad_token_id``.
        attention_mask: [B, S] long, 1 on real tokens, 0 on padding.
        labels: [B, S] long, ``input_ids`` with padding = −100, NOT shifted (HF causal-LM convention;
            see :func:`next_token_labels` for the shifted form).
        turn_ids: [B, S] long, the turn label of each token: for synthetic data the phase (0..6)
            of the token's turn, for JSONL the turn index capped at ``num_turn_ids − 1``; −1 on
            padding.
        turn_boundaries: per conversation, the start position of each turn (ascending, first is 0).
        topic_ids: [B] long, topic index per conversation (−1 when unknown).
        topic_names: name of each topic index.
        pad_token_id: the id used for padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    turn_ids: torch.Tensor
    turn_boundaries: list[list[int]]
    topic_ids: torch.Tensor
    topic_names: tuple[str, ...] = ()
    pad_token_id: int = PAD_ID

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """[B] long: number of real tokens per conversation."""
        return self.attention_mask.sum(dim=1)

    def select(self, indices: Sequence[int] | torch.Tensor) -> ConversationBatch:
        """The conversations at ``indices`` (in that order), trimmed to their longest one."""
        index = torch.as_tensor(indices, dtype=torch.long)
        width = int(self.attention_mask[index].sum(dim=1).max()) if len(index) else 0
        return ConversationBatch(
            input_ids=self.input_ids[index, :width],
            attention_mask=self.attention_mask[index, :width],
            labels=self.labels[index, :width],
            turn_ids=self.turn_ids[index, :width],
            turn_boundaries=[list(self.turn_boundaries[i]) for i in index.tolist()],
            topic_ids=self.topic_ids[index],
            topic_names=self.topic_names,
            pad_token_id=self.pad_token_id,
        )

    def to(self, device: torch.device | str) -> ConversationBatch:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return ConversationBatch(**moved)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Shift HF-style labels to next-token targets aligned with the logits.

    labels [B, S] (unshifted, −100 on padding) → targets [B, S] with targets[:, t] = labels[:, t + 1]
    and targets[:, −1] = −100, so ``cross_entropy(logits.flatten(0, 1), targets.flatten(),
    ignore_index=-100)`` equals the loss an HF ``*ForCausalLM`` computes from ``labels``.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def pad_batch(
    sequences: list[np.ndarray],
    turn_sequences: list[np.ndarray],
    turn_boundaries: list[list[int]],
    topic_ids: Sequence[int],
    topic_names: tuple[str, ...],
    pad_token_id: int,
) -> ConversationBatch:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    turn_ids = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, (tokens, turns) in enumerate(zip(sequences, turn_sequences, strict=True)):
        input_ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
        turn_ids[row, : len(turns)] = torch.as_tensor(turns, dtype=torch.long)
    # Padding is identified by the mask, not by the pad id: a pad id borrowed from eos also occurs
    # in real text.
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return ConversationBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        turn_ids=turn_ids,
        turn_boundaries=turn_boundaries,
        topic_ids=torch.as_tensor(list(topic_ids), dtype=torch.long),
        topic_names=topic_names,
        pad_token_id=pad_token_id,
    )


def split_batch(
    batch: ConversationBatch, heldout_fraction: float, seed: int = 0
) -> tuple[ConversationBatch, ConversationBatch]:
    """Split conversations into (train, heldout) by a seeded permutation (for loaded data)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1) (got {heldout_fraction})")
    num_heldout = round(len(batch) * heldout_fraction)
    if not 0 < num_heldout < len(batch):
        raise ValueError(
            f"heldout_fraction={heldout_fraction} of {len(batch)} conversations leaves a split empty"
        )
    order = np.random.default_rng(seed).permutation(len(batch))
    return batch.select(np.sort(order[num_heldout:])), batch.select(np.sort(order[:num_heldout]))


def iterate_batches(
    batch: ConversationBatch, batch_size: int, *, shuffle_seed: int | None = None, drop_last: bool = False
) -> Iterator[ConversationBatch]:
    """Yield mini-batches of ``batch_size`` conversations, each trimmed to its longest member.

    In order when ``shuffle_seed`` is None, else in a permutation fixed by the seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    order = (
        np.arange(len(batch))
        if shuffle_seed is None
        else np.random.default_rng(shuffle_seed).permutation(len(batch))
    )
    for start in range(0, len(batch), batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield batch.select(chunk)


# ----------------------------------------------------------------------------------------------
# JSONL conversations for real models
# ----------------------------------------------------------------------------------------------
