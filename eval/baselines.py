"""The losses a model is judged against: the synthetic world's loss floor and n-gram baselines.

* :func:`loss_floor` — the entropy of the Bayes-optimal causal predictor of a synthetic batch (it
  knows the generator and infers topic and phase from the prefix): the loss no model can beat.
* :func:`ngram_baselines` — a unigram and a count-bigram model fit on the training tokens a model
  saw. A trained model that does not beat the bigram has not learnt more than counting pairs, so a
  Δloss measured on it says little about routing.

Every loss here is a mean over the tokens an HF causal LM is scored on: positions 1..len−1 of each
conversation, pooled over the batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import entr

from chronovisor.eval.data import PAD_ID, ConversationBatch
from chronovisor.eval.synthetic import PHASES, ConversationGenerator

#: Absolute discount of the count-bigram baseline (the usual Kneser–Ney/absolute-discounting value).
BIGRAM_DISCOUNT = 0.75


# ----------------------------------------------------------------------------------- loss floor
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

    For each position the exact conditional entropy of the next-token distribution is averaged,
    which has the expected NLL as its expectation but less variance than the NLL of the sampled
    tokens.
    """
    cfg = generator.config
    if bool((batch.topic_ids < 0).any()):
        raise ValueError("loss_floor needs a batch sampled from a ConversationGenerator (topic ids are missing)")
    if int(batch.input_ids.max()) >= cfg.vocab_size:
        raise ValueError(f"batch has token ids >= vocab_size={cfg.vocab_size}: not from this generator's world")
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


@dataclass(frozen=True)
class _PhaseChain:
    """The phase process of a conversation as a chain over *histories* of its non-final turns.

    A history is (phases visited so far, current phase); H histories. With the fixed order they are
    the six prefixes of PHASES; with a random order every (visited set, current ∈ set) with at most
    six phases visited (7 · (2⁶ − 1) = 441), the next phase uniform over the unvisited ones.

    phase: [H] the current phase of each history.
    start: [H] probability that the first turn is in each history.
    to_running: [H, H] probability that leaving a history enters another non-final one.
    to_final: [H, P] probability that leaving a history enters the final turn with phase p.
    """

    phase: np.ndarray
    start: np.ndarray
    to_running: np.ndarray
    to_final: np.ndarray


def _phase_chain(random_order: bool) -> _PhaseChain:
    P = len(PHASES)
    if random_order:
        histories = [(frozenset(visited), current)
                     for size in range(1, P) for visited in itertools.combinations(range(P), size)
                     for current in visited]
    else:
        histories = [(frozenset(range(i + 1)), i) for i in range(P - 1)]
    index = {history: h for h, history in enumerate(histories)}
    H = len(histories)
    to_running, to_final, start = np.zeros((H, H)), np.zeros((H, P)), np.zeros(H)
    for h, (visited, current) in enumerate(histories):
        if len(visited) == 1:
            start[h] = 1.0
        unvisited = sorted(set(range(P)) - visited) if random_order else [current + 1]
        for following in unvisited:
            if len(visited) == P - 1:
                to_final[h, following] = 1.0 / len(unvisited)
            else:
                to_running[h, index[(visited | {following}, following)]] = 1.0 / len(unvisited)
    return _PhaseChain(np.array([current for _, current in histories]), start / start.sum(), to_running, to_final)


def _bayes_filter(
    generator: ConversationGenerator, input_ids: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact forward filter over (topic, phase history, time in turn), all conversations in parallel.

    The first six turn lengths are i.i.d. uniform on [min_turn_length, max_turn_length], so the
    phase process is semi-Markov with hazard h(d) = 1 / (max − d + 1) for d >= min. The last turn
    has no successor, so how its length was fitted to the conversation bounds never matters.
    Returns (entropy of the predictive, NLL of the actual token) for every scored token.
    """
    cfg = generator.config
    chain = _phase_chain(cfg.random_phase_order)
    B, width = input_ids.shape
    T, P, D = cfg.num_topics, len(PHASES), cfg.max_turn_length
    w = cfg.phase_weight
    duration = np.arange(1, D + 1)
    hazard = np.where(duration >= cfg.min_turn_length, 1.0 / (D - duration + 1), 0.0)
    stay = 1.0 - hazard
    markers = np.array([cfg.marker_id(p) for p in range(P)])
    by_phase = np.eye(P)[chain.phase]  # [H, P] one-hot: sums history mass per current phase

    # running[b, τ, h, d−1]: posterior mass of topic τ, history h (a non-final turn), d tokens into the turn;
    # final[b, τ, p]: mass of topic τ in the final turn, whose phase is p.
    running = np.zeros((B, T, len(chain.phase), D))
    final = np.zeros((B, T, P))
    if cfg.turn_markers:  # the first token is the first phase's marker: no topic evidence
        is_marker = (input_ids[:, :1] == markers[None, :]).astype(float)  # [B, P]
        running[..., 0] = chain.start * is_marker[:, None, chain.phase] / T
    else:
        bigram_lik, topic_lik = generator.content_likelihood(input_ids[:, 0], np.full(B, PAD_ID))
        running[..., 0] = chain.start * (bigram_lik[:, None, chain.phase] + topic_lik[:, :, None])
    running /= running.sum(axis=(1, 2, 3), keepdims=True)

    entropies, nlls = [], []
    for t in range(width - 1):
        active = lengths > t + 1
        prev, token = input_ids[:, t], input_ids[:, t + 1]

        # Predict: stay in the turn (d → d+1) or move to the next turn's first token.
        switched = running @ hazard  # [B, T, H]
        predicted = np.empty_like(running)
        np.multiply(running[..., :-1], stay[:-1], out=predicted[..., 1:])
        predicted[..., 0] = switched @ chain.to_running
        entering_final, staying_final = switched @ chain.to_final, final  # [B, T, P]

        # With markers, the mass at a turn's first token emits that phase's marker, the rest content.
        if cfg.turn_markers:
            start_mass = predicted[..., 0].sum(axis=1) @ by_phase + entering_final.sum(axis=1)  # [B, P]
            content_tp = predicted[..., 1:].sum(axis=-1) @ by_phase + staying_final
        else:
            start_mass = np.zeros((B, P))
            content_tp = predicted.sum(axis=-1) @ by_phase + entering_final + staying_final  # [B, T, P]

        # Predictive distribution: the emission is linear in phase and topic, so marginals suffice.
        phase_mass, topic_mass = content_tp.sum(axis=1), content_tp.sum(axis=2)  # [B, P], [B, T]
        predictive = (1.0 - w) * topic_mass @ generator.topic_unigram
        for p in range(P):
            predictive[:, generator.phase_support[p]] += w * phase_mass[:, p, None] * generator.phase_bigram[p, prev]
        predictive[:, markers] += start_mass

        # Update on the observed token.
        bigram_lik, topic_lik = generator.content_likelihood(token, prev)
        content_lik = bigram_lik[:, None, :] + topic_lik[:, :, None]  # [B, T, P]
        running = predicted * content_lik[:, :, chain.phase, None]
        if cfg.turn_markers:
            is_marker = (token[:, None] == markers[None, :]).astype(float)  # [B, P]
            running[..., 0] = predicted[..., 0] * is_marker[:, None, chain.phase]
            final = staying_final * content_lik + entering_final * is_marker[:, None, :]
        else:
            final = (entering_final + staying_final) * content_lik
        evidence = running.sum(axis=(1, 2, 3)) + final.sum(axis=(1, 2))  # = predictive[token]
        safe = np.where(evidence > 0, evidence, 1.0)
        running /= safe[:, None, None, None]
        final /= safe[:, None, None]

        entropies.append(entr(predictive[active]).sum(axis=1))
        nlls.append(-np.log(evidence[active]))
    return np.concatenate(entropies), np.concatenate(nlls)


# ------------------------------------------------------------------------------ n-gram baselines
@dataclass(frozen=True)
class NgramBaselines:
    """Held-out loss (nats per scored token) of count models fit on the training tokens.

    unigram: add-one smoothed token frequencies.
    bigram: interpolated absolute discounting, p(x | y) = max(c(y, x) − δ, 0) / c(y) + λ(y) · p_uni(x)
        with δ = :data:`BIGRAM_DISCOUNT` and λ(y) = δ · #{x : c(y, x) > 0} / c(y) (the unigram alone
        for a context never seen in training).
    train_tokens: tokens the models were fit on.
    """

    unigram: float
    bigram: float
    train_tokens: int


def _sequences(batch: ConversationBatch) -> list[np.ndarray]:
    lengths, ids = batch.lengths.numpy(), batch.input_ids.numpy()
    return [ids[b, : lengths[b]] for b in range(len(batch))]


def ngram_baselines(train: ConversationBatch, heldout: ConversationBatch, vocab_size: int) -> NgramBaselines:
    """Fit the unigram and count-bigram baselines on ``train`` and score them on ``heldout``.

    Args:
        train: the conversations the model trained on (every real token counts; pairs never cross
            a conversation boundary).
        heldout: the conversations the model is evaluated on (scored like the model: each
            conversation's tokens after the first).
        vocab_size: size of the token space the models predict over (the model's vocabulary).
    """
    train_sequences, heldout_sequences = _sequences(train), _sequences(heldout)
    largest = max(int(seq.max()) for seq in train_sequences + heldout_sequences)
    if largest >= vocab_size:
        raise ValueError(f"token id {largest} is outside the vocabulary of {vocab_size} ids")
    unigram_counts = np.ones(vocab_size)
    pair_counts: dict[tuple[int, int], int] = {}
    for seq in train_sequences:
        np.add.at(unigram_counts, seq, 1)
        pairs = seq[:-1].astype(np.int64) * vocab_size + seq[1:]
        values, counts = np.unique(pairs, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            key = divmod(value, vocab_size)
            pair_counts[key] = pair_counts.get(key, 0) + count
    unigram = unigram_counts / unigram_counts.sum()
    context_total = np.zeros(vocab_size)
    context_types = np.zeros(vocab_size)
    for (context, _), count in pair_counts.items():
        context_total[context] += count
        context_types[context] += 1

    prev = np.concatenate([seq[:-1] for seq in heldout_sequences])
    target = np.concatenate([seq[1:] for seq in heldout_sequences])
    pair = np.array([pair_counts.get((p, x), 0) for p, x in zip(prev.tolist(), target.tolist(), strict=True)])
    total = context_total[prev]
    seen = total > 0
    safe_total = np.where(seen, total, 1.0)
    backoff = np.where(seen, BIGRAM_DISCOUNT * context_types[prev] / safe_total, 1.0)
    bigram = np.where(seen, np.maximum(pair - BIGRAM_DISCOUNT, 0.0) / safe_total, 0.0) + backoff * unigram[target]
    return NgramBaselines(
        unigram=float(-np.log(unigram[target]).mean()),
        bigram=float(-np.log(bigram).mean()),
        train_tokens=int(sum(len(seq) for seq in train_sequences)),
    )
