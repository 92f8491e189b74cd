"""A seeded synthetic multi-turn conversation world with real turn structure.

Why a new generator. The reference's long-conversation data drew every token i.i.d. uniform in
[0, 1000): turn identity was not recoverable from the tokens, so "turn separation" could only be
noise, and the best causal loss was ln 1000 = 6.908 nats. Here every conversation has seven turns,
one per PHASE, and each phase has its own sparse bigram statistics, mixed with a per-conversation
topic unigram:

    p(x_t | x_{t-1}, phase, topic) = w · B_phase[x_{t-1}, x_t] + (1 − w) · U_topic[x_t]

so the phase is recoverable from a handful of tokens and a router *can* specialise by phase.
Because the distribution is known, :func:`chronovisor.eval.baselines.loss_floor` reports the loss
no model can beat.

Phase order. By default the phases come in the order of PHASES in every conversation, so the
absolute position predicts the phase and "routing separates the phases" cannot be told apart from
"routing drifts with position". With ``random_phase_order=True`` each conversation draws its own
uniformly random order of the seven phases; a separation test that re-draws that order
(:func:`chronovisor.eval.metrics.separation_test`) is then exact.

Token ids: ``PAD_ID = 0`` (never a content token). With ``turn_markers=True`` ids 1..7 are one
marker per phase, emitted as the first token of each turn; this makes the phase trivially
predictable (the router can key on one token), so it is off by default: the phase must then be
inferred from token statistics. Content tokens are the remaining ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chronovisor.eval.data import PAD_ID, ConversationBatch, pad_batch

PHASES = ("Inquiry", "Clarification", "Exploration", "Analysis", "Challenge", "Refinement", "Synthesis")
SPLITS = ("train", "heldout")

# Stream tags mixed into the seeds so that the world (generator parameters) and each split's samples
# come from independent random streams even when world_seed == seed.
_WORLD_STREAM = 0
_SAMPLE_STREAM = 1


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
        random_phase_order: each conversation visits the seven phases in its own uniformly random
            order (off: the order of PHASES, so position predicts the phase).
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
    random_phase_order: bool = False

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

    def _phase_orders(self, num: int) -> np.ndarray:
        """[num, P] the phase of each turn: PHASES' order, or a uniform random permutation per
        conversation (drawn only then, so fixed-order streams are unchanged by the option)."""
        order = np.tile(np.arange(len(PHASES)), (num, 1))
        return self._rng.permuted(order, axis=1) if self.config.random_phase_order else order

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
        # turn[b, t] = number of turn starts at or before t, minus one; phase[b, t] = the phase of that turn.
        turns = (starts[:, None, :] <= positions[None, :, None]).sum(axis=-1) - 1
        phases = self._phase_orders(B)[np.arange(B)[:, None], turns]
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

        return pad_batch(
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

    def content_likelihood(self, token: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For N tokens: ([N, P] w·B_p[prev, token], [N, T] (1 − w)·U_τ[token])."""
        cfg = self.config
        slot = self._support_index[:, token].T  # [N, P]
        phase_index = np.arange(len(PHASES))[None, :]
        bigram = np.where(slot >= 0, self.phase_bigram[phase_index, prev[:, None], np.maximum(slot, 0)], 0.0)
        return cfg.phase_weight * bigram, (1.0 - cfg.phase_weight) * self.topic_unigram[:, token].T
