"""Evaluation data: a synthetic multi-turn conversation generator with real turn structure, its loss
floor, and a JSONL loader for real models.

Why a new generator. The reference's long-conversation data drew every token i.i.d. uniform in
[0, 1000): turn identity was not recoverable from the tokens, so "turn separation" could only be
noise, and the best causal loss was ln 1000 = 6.908 nats (it reported 1.85 because its model had no
causal mask and read the label). Here every conversation walks through the seven PHASES in order,
and each phase has its own sparse bigram statistics, mixed with a per-conversation topic unigram:

    p(x_t | x_{t-1}, phase, topic) = w · B_phase[x_{t-1}, x_t] + (1 − w) · U_topic[x_t]

so the phase is recoverable from a handful of tokens and a router *can* specialise by phase.
Because the distribution is known, :func:`loss_floor` reports the loss no model can beat.

Token ids: ``PAD_ID = 0`` (never a content token). With ``turn_markers=True`` ids 1..7 are one
marker per phase, emitted as the first token of each turn; this makes the phase trivially
predictable (the router can key on one token), so it is off by default: the phase must then be
inferred from token statistics. Content tokens are the remaining ids.

Batch convention (:class:`ConversationBatch`), shapes [B, S] right-padded:
    ``labels`` = ``input_ids`` with padding set to ``IGNORE_INDEX`` (−100), **not shifted**:
    HuggingFace ``*ForCausalLM`` models shift inside the loss (logits[:, t] is scored against
    labels[:, t + 1]). Code that computes per-token losses itself uses :func:`next_token_labels`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import entr

PHASES = ("Inquiry", "Clarification", "Exploration", "Analysis", "Challenge", "Refinement", "Synthesis")
PAD_ID = 0
IGNORE_INDEX = -100
SPLITS = ("train", "heldout")

# Stream tags mixed into the seeds so that the world (generator parameters) and each split's samples
# come from independent random streams even when world_seed == seed.
_WORLD_STREAM = 0
_SAMPLE_STREAM = 1


@dataclass
class ConversationBatch:
    """A right-padded batch of conversations.

    Fields (B conversations, S = longest conversation):
        input_ids: [B, S] long, padded with ``pad_token_id``.
        attention_mask: [B, S] long, 1 on real tokens, 0 on padding.
        labels: [B, S] long, ``input_ids`` with padding = −100, NOT shifted (HF causal-LM convention;
            see :func:`next_token_labels` for the shifted form).
        turn_ids: [B, S] long, turn index of each token (for synthetic data the phase index 0..6,
            for JSONL the turn index capped at ``num_turn_ids − 1``); −1 on padding.
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


def _pad_batch(
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


# ----------------------------------------------------------------------------------------------
# Synthetic generator
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversationConfig:
    """Parameters of the synthetic conversation world (validated at construction).

    Attributes:
        vocab_size: V, including PAD (and the 7 markers when ``turn_markers``).
        num_topics: topics; each conversation draws one uniformly.
        phase_vocab_size: size of each phase's token subset (the support of its bigram rows).
        topic_vocab_size: size of each topic's token subset (the support of its unigram).
        bigram_concentration: Dirichlet concentration of each bigram row (small = sparse, peaky).
        topic_concentration: Dirichlet concentration of each topic unigram.
        phase_weight: w, the mixing weight of the phase bigram; the topic unigram gets 1 − w.
        min_turn_length, max_turn_length: turn lengths in tokens (inclusive bounds).
        min_length, max_length: conversation lengths in tokens (inclusive bounds).
        turn_markers: emit a per-phase marker token at the start of each turn (makes phase trivial).
        world_seed: seeds the world's parameters (bigram matrices, topic unigrams, token subsets).
    """

    vocab_size: int = 1000
    num_topics: int = 9
    phase_vocab_size: int = 200
    topic_vocab_size: int = 100
    bigram_concentration: float = 0.1
    topic_concentration: float = 1.0
    phase_weight: float = 0.7
    min_turn_length: int = 70
    max_turn_length: int = 150
    min_length: int = 500
    max_length: int = 1000
    turn_markers: bool = False
    world_seed: int = 0

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"ConversationConfig.{name}: {message} (got {getattr(self, name)!r})")

        for name in ("num_topics", "phase_vocab_size", "topic_vocab_size", "min_turn_length"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        for name in ("bigram_concentration", "topic_concentration"):
            if not getattr(self, name) > 0:
                fail(name, "must be > 0")
        if not 0.0 <= self.phase_weight <= 1.0:
            fail("phase_weight", "must lie in [0, 1]")
        largest_subset = max(self.phase_vocab_size, self.topic_vocab_size)
        if self.vocab_size - self.first_content_id < largest_subset:
            fail("vocab_size", f"leaves fewer than {largest_subset} content tokens for a phase/topic subset")
        if self.turn_markers and self.min_turn_length < 2:
            fail("min_turn_length", "must be at least 2 with turn_markers (marker + one content token)")
        if self.max_turn_length < self.min_turn_length:
            fail("max_turn_length", f"must be >= min_turn_length={self.min_turn_length}")
        if self.max_length < self.min_length:
            fail("max_length", f"must be >= min_length={self.min_length}")
        # The first six turns are drawn freely; the last one then fits the conversation into
        # [min_length, max_length], which must be possible whatever the first six drew.
        free = len(PHASES) - 1
        if free * self.min_turn_length + self.max_turn_length < self.min_length:
            fail("min_length", f"unreachable: {free}·min_turn_length + max_turn_length is smaller")
        if free * self.max_turn_length + self.min_turn_length > self.max_length:
            fail("max_length", f"too small: {free}·max_turn_length + min_turn_length exceeds it")

    @property
    def first_content_id(self) -> int:
        """Smallest content token id (after PAD and, with ``turn_markers``, the phase markers)."""
        return 1 + (len(PHASES) if self.turn_markers else 0)

    def marker_id(self, phase: int) -> int:
        """Token id of the turn-start marker of ``phase`` (only meaningful with ``turn_markers``)."""
        return 1 + phase


class ConversationGenerator:
    """Seeded sampler of synthetic conversations from the world described by ``config``.

    The world's parameters derive from ``config.world_seed`` only, so generators for different
    seeds or splits share them. Samples derive from (world_seed, seed, split): the same triple and
    the same sequence of :meth:`sample` calls give identical tensors.

    Parameters (P = 7 phases, V = vocab_size, S = phase_vocab_size, T = num_topics):
        phase_support: [P, S] token ids of each phase's subset.
        phase_bigram: [P, V, S] p(next = phase_support[p, j] | prev, phase p); every prev id,
            PAD included (PAD is the context of a conversation's first token).
        topic_unigram: [T, V] p(token | topic), zero outside the topic's subset.
    """

    def __init__(self, config: ConversationConfig, seed: int = 0, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        self.config = config
        self.seed = seed
        self.split = split

        world = np.random.default_rng([_WORLD_STREAM, config.world_seed])
        content = np.arange(config.first_content_id, config.vocab_size)
        num_phases, V = len(PHASES), config.vocab_size
        self.phase_support = np.stack(
            [
                np.sort(world.choice(content, config.phase_vocab_size, replace=False))
                for _ in range(num_phases)
            ]
        )
        self.phase_bigram = world.dirichlet(
            np.full(config.phase_vocab_size, config.bigram_concentration), size=(num_phases, V)
        )
        self.topic_unigram = np.zeros((config.num_topics, V))
        for topic in range(config.num_topics):
            subset = world.choice(content, config.topic_vocab_size, replace=False)
            self.topic_unigram[topic, subset] = world.dirichlet(
                np.full(config.topic_vocab_size, config.topic_concentration)
            )
        # Position of each token id inside each phase's support (−1 outside), to look up B_p[prev, x].
        self._support_index = np.full((num_phases, V), -1)
        for phase in range(num_phases):
            self._support_index[phase, self.phase_support[phase]] = np.arange(config.phase_vocab_size)
        self._bigram_cdf = np.cumsum(self.phase_bigram, axis=-1)
        self._topic_cdf = np.cumsum(self.topic_unigram, axis=-1)

        self._rng = np.random.default_rng([_SAMPLE_STREAM, config.world_seed, seed, SPLITS.index(split)])

    def _turn_lengths(self, num: int) -> np.ndarray:
        """[num, P] turn lengths: six free draws, then a last turn that fits the length bounds."""
        cfg, rng = self.config, self._rng
        lengths = rng.integers(cfg.min_turn_length, cfg.max_turn_length + 1, size=(num, len(PHASES)))
        so_far = lengths[:, :-1].sum(axis=1)
        low = np.maximum(cfg.min_turn_length, cfg.min_length - so_far)
        high = np.minimum(cfg.max_turn_length, cfg.max_length - so_far)
        lengths[:, -1] = rng.integers(low, high + 1)
        return lengths

    def sample(self, num_conversations: int) -> ConversationBatch:
        """Draw the next ``num_conversations`` conversations from this generator's stream."""
        if num_conversations < 1:
            raise ValueError(f"num_conversations must be at least 1 (got {num_conversations})")
        cfg, rng = self.config, self._rng
        B = num_conversations
        topics = rng.integers(cfg.num_topics, size=B)
        turn_lengths = self._turn_lengths(B)
        lengths = turn_lengths.sum(axis=1)
        width = int(lengths.max())

        starts = np.concatenate(
            [np.zeros((B, 1), dtype=np.int64), np.cumsum(turn_lengths, axis=1)[:, :-1]], axis=1
        )
        positions = np.arange(width)
        # phase[b, t] = number of turn starts at or before t, minus one.
        phases = (starts[:, None, :] <= positions[None, :, None]).sum(axis=-1) - 1
        turn_start = (starts[:, None, :] == positions[None, :, None]).any(axis=-1)

        tokens = np.zeros((B, width), dtype=np.int64)
        prev = np.full(B, PAD_ID)
        rows = np.arange(B)
        for t in range(width):
            phase = phases[:, t]
            from_bigram = rng.random(B) < cfg.phase_weight
            u = rng.random(B)[:, None]
            # Inverse-CDF sampling row by row: the index of the first cdf entry above u·total, which
            # never is a zero-probability id (scaling by the total absorbs rounding in the cumsum).
            bigram_cdf, topic_cdf = self._bigram_cdf[phase, prev], self._topic_cdf[topics]
            bigram_slot = (bigram_cdf <= u * bigram_cdf[:, -1:]).sum(axis=1)
            topic_token = (topic_cdf <= u * topic_cdf[:, -1:]).sum(axis=1)
            token = np.where(from_bigram, self.phase_support[phase, bigram_slot], topic_token)
            if cfg.turn_markers:
                token = np.where(turn_start[:, t], cfg.marker_id(phase), token)
            tokens[rows, t] = token
            prev = token

        return _pad_batch(
            sequences=[tokens[b, : lengths[b]] for b in range(B)],
            turn_sequences=[phases[b, : lengths[b]] for b in range(B)],
            turn_boundaries=[starts[b].tolist() for b in range(B)],
            topic_ids=topics.tolist(),
            topic_names=tuple(f"topic{i}" for i in range(cfg.num_topics)),
            pad_token_id=PAD_ID,
        )

    def next_token_distribution(self, prev: np.ndarray, phase: np.ndarray, topic: np.ndarray) -> np.ndarray:
        """[N, V] content distribution p(x | prev, phase, topic) for N contexts (markers excluded)."""
        cfg = self.config
        dist = (1.0 - cfg.phase_weight) * self.topic_unigram[topic]
        rows = np.arange(len(prev))[:, None]
        dist[rows, self.phase_support[phase]] += cfg.phase_weight * self.phase_bigram[phase, prev]
        return dist

    def _content_likelihood(self, token: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For N tokens: ([N, P] w·B_p[prev, token], [N, T] (1 − w)·U_τ[token])."""
        cfg = self.config
        slot = self._support_index[:, token].T  # [N, P]
        phase_index = np.arange(len(PHASES))[None, :]
        bigram = np.where(slot >= 0, self.phase_bigram[phase_index, prev[:, None], np.maximum(slot, 0)], 0.0)
        return cfg.phase_weight * bigram, (1.0 - cfg.phase_weight) * self.topic_unigram[:, token].T


# ----------------------------------------------------------------------------------------------
# Loss floor
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossFloor:
    """Per-token cross-entropy floors (nats) of a synthetic batch; see :func:`loss_floor`.

    oracle: mean conditional entropy for a predictor that knows the generator, the topic and the
        phase of every position. A lower bound: no model can beat it in expectation.
    bayes: mean conditional entropy of the Bayes-optimal causal predictor, which knows the generator
        but infers topic and phase from the prefix (exact forward filtering). What a perfect causal
        model achieves in expectation; oracle <= bayes.
    oracle_nll, bayes_nll: the same predictors' mean NLL of the sampled tokens, a Monte Carlo check
        that agrees with the entropies up to sampling noise.
    uniform: ln V, the loss of a uniform guess (the reference's i.i.d. data sat exactly here).
    num_tokens: number of scored tokens (every real token but each conversation's first).
    """

    oracle: float
    bayes: float
    oracle_nll: float
    bayes_nll: float
    uniform: float
    num_tokens: int


def loss_floor(generator: ConversationGenerator, batch: ConversationBatch) -> LossFloor:
    """Loss floors of ``batch`` (sampled from ``generator``'s world), averaged over scored tokens.

    Scored tokens are those an HF causal LM is scored on: positions 1..len−1 of each conversation
    (position 0 has no prefix), pooled over the batch like the model's token-mean loss. For each
    position the exact conditional entropy of the next-token distribution is averaged, which has
    the expected NLL as its expectation but less variance than the NLL of the sampled tokens.
    """
    cfg = generator.config
    if bool((batch.topic_ids < 0).any()):
        raise ValueError(
            "loss_floor needs a batch sampled from a ConversationGenerator (topic ids are missing)"
        )
    if int(batch.input_ids.max()) >= cfg.vocab_size:
        raise ValueError(
            f"batch has token ids >= vocab_size={cfg.vocab_size}: not from this generator's world"
        )
    lengths = batch.lengths.numpy()
    input_ids, turn_ids = batch.input_ids.numpy(), batch.turn_ids.numpy()
    topics = batch.topic_ids.numpy()

    oracle_entropy, oracle_nll = [], []
    for b in range(len(batch)):
        tokens, phases = input_ids[b, : lengths[b]], turn_ids[b, : lengths[b]]
        prev, target, phase = tokens[:-1], tokens[1:], phases[1:]
        dist = generator.next_token_distribution(prev, phase, np.full(len(prev), topics[b]))
        entropy = entr(dist).sum(axis=1)
        prob = dist[np.arange(len(target)), target]
        if cfg.turn_markers:
            starts = np.asarray(batch.turn_boundaries[b][1:]) - 1  # index into the shifted arrays
            entropy[starts], prob[starts] = 0.0, 1.0  # a marker is certain given the phase
        oracle_entropy.append(entropy)
        oracle_nll.append(-np.log(prob))

    bayes_entropy, bayes_nll = _bayes_filter(generator, input_ids, lengths)
    oracle_entropy, oracle_nll = np.concatenate(oracle_entropy), np.concatenate(oracle_nll)
    return LossFloor(
        oracle=float(oracle_entropy.mean()),
        bayes=float(bayes_entropy.mean()),
        oracle_nll=float(oracle_nll.mean()),
        bayes_nll=float(bayes_nll.mean()),
        uniform=math.log(cfg.vocab_size),
        num_tokens=int(oracle_entropy.size),
    )


def _bayes_filter(
    generator: ConversationGenerator, input_ids: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact forward filter over (topic, phase, time in turn), all conversations in parallel.

    The first six turn lengths are i.i.d. uniform on [min_turn_length, max_turn_length], so the
    phase process is semi-Markov with hazard h(d) = 1 / (max − d + 1) for d >= min. The last phase
    has no successor, so how its length was fitted to the conversation bounds never matters.
    Returns (entropy of the predictive, NLL of the actual token) for every scored token.
    """
    cfg = generator.config
    B, width = input_ids.shape
    T, P, D = cfg.num_topics, len(PHASES), cfg.max_turn_length
    w = cfg.phase_weight
    duration = np.arange(1, D + 1)
    hazard = np.where(duration >= cfg.min_turn_length, 1.0 / (D - duration + 1), 0.0)
    markers = np.array([cfg.marker_id(p) for p in range(P)])

    # running[b, τ, p, d−1]: posterior mass of topic τ, non-final phase p, d tokens into the turn.
    running = np.zeros((B, T, P - 1, D))
    final = np.zeros((B, T))
    if cfg.turn_markers:
        running[:, :, 0, 0] = 1.0 / T  # the first token is phase 0's marker: no topic evidence
    else:
        bigram_lik, topic_lik = generator._content_likelihood(input_ids[:, 0], np.full(B, PAD_ID))
        running[:, :, 0, 0] = bigram_lik[:, None, 0] + topic_lik
    running /= running.sum(axis=(1, 2, 3), keepdims=True)

    entropies, nlls = [], []
    for t in range(width - 1):
        active = lengths > t + 1
        prev, token = input_ids[:, t], input_ids[:, t + 1]

        # Predict: stay in the turn (d → d+1) or move to the next phase's first token.
        leaving = running * hazard
        switched = leaving.sum(axis=-1)  # [B, T, P−1]
        predicted = np.zeros_like(running)
        predicted[..., 1:] = (running - leaving)[..., :-1]
        predicted[:, :, 1:, 0] = switched[:, :, :-1]
        entering_final, staying_final = switched[:, :, -1], final

        # With markers, the mass at a turn's first token emits that phase's marker, the rest content.
        if cfg.turn_markers:
            start_mass = np.concatenate(
                [predicted[..., 0].sum(axis=1), entering_final.sum(axis=1)[:, None]], axis=1
            )
            content_tp = np.concatenate([predicted[..., 1:].sum(axis=-1), staying_final[..., None]], axis=-1)
        else:
            start_mass = np.zeros((B, P))
            content_tp = np.concatenate(
                [predicted.sum(axis=-1), (entering_final + staying_final)[..., None]], axis=-1
            )

        # Predictive distribution: the emission is linear in phase and topic, so marginals suffice.
        phase_mass, topic_mass = content_tp.sum(axis=1), content_tp.sum(axis=2)  # [B, P], [B, T]
        predictive = (1.0 - w) * topic_mass @ generator.topic_unigram
        for p in range(P):
            predictive[:, generator.phase_support[p]] += (
                w * phase_mass[:, p, None] * generator.phase_bigram[p, prev]
            )
        predictive[:, markers] += start_mass

        # Update on the observed token.
        bigram_lik, topic_lik = generator._content_likelihood(token, prev)
        content_lik = bigram_lik[:, None, :] + topic_lik[:, :, None]  # [B, T, P]
        running = predicted * content_lik[:, :, :-1, None]
        if cfg.turn_markers:
            is_marker = (token[:, None] == markers[None, :]).astype(float)  # [B, P]
            running[..., 0] = predicted[..., 0] * is_marker[:, None, :-1]
            final = staying_final * content_lik[:, :, -1] + entering_final * is_marker[:, None, -1]
        else:
            final = (entering_final + staying_final) * content_lik[:, :, -1]
        evidence = running.sum(axis=(1, 2, 3)) + final.sum(axis=1)  # = predictive[token]
        safe = np.where(evidence > 0, evidence, 1.0)
        running /= safe[:, None, None, None]
        final /= safe[:, None]

        entropies.append(entr(predictive[active]).sum(axis=1))
        nlls.append(-np.log(evidence[active]))
    return np.concatenate(entropies), np.concatenate(nlls)


# ----------------------------------------------------------------------------------------------
# Splits and iteration
# ----------------------------------------------------------------------------------------------


def train_heldout(
    config: ConversationConfig, num_train: int, num_heldout: int, seed: int = 0
) -> tuple[ConversationBatch, ConversationBatch]:
    """Train and held-out batches from one world: same parameters, independent sample streams."""
    train = ConversationGenerator(config, seed=seed, split="train").sample(num_train)
    heldout = ConversationGenerator(config, seed=seed, split="heldout").sample(num_heldout)
    return train, heldout


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
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
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

    conversations: list[tuple[int, list[str], str | None]] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                conversations.append((line_number, *_parse_line(line, path, line_number)))
    if not conversations:
        raise ValueError(f"{path}: no conversations")

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
    return _pad_batch(sequences, turn_sequences, boundaries, topic_ids, topic_names, pad_token_id)


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
