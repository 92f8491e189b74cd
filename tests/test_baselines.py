"""Specification of the reference losses: the synthetic world's loss floor and the n-gram baselines."""

import math

import numpy as np
import pytest

from chronovisor.eval.baselines import loss_floor, ngram_baselines
from chronovisor.eval.synthetic import ConversationConfig, ConversationGenerator

CONFIG = ConversationConfig()



# ----------------------------------------------------------------------------------------------
# Loss floor
# ----------------------------------------------------------------------------------------------


def test_loss_floor_is_far_below_a_uniform_guess(generator, batch):
    floor = loss_floor(generator, batch.select(range(4)))
    assert floor.uniform == pytest.approx(math.log(CONFIG.vocab_size))
    assert floor.oracle <= floor.bayes < floor.uniform - 2.0


@pytest.mark.parametrize("turn_markers", [False, True])
def test_loss_floor_matches_the_nll_of_sampled_tokens(turn_markers):
    """The exact conditional entropies agree with the true NLL of the sampled tokens (≈ 5k tokens)."""
    config = ConversationConfig(turn_markers=turn_markers)
    generator = ConversationGenerator(config, seed=11)
    floor = loss_floor(generator, generator.sample(6))
    assert floor.num_tokens > 4000
    assert floor.oracle_nll == pytest.approx(floor.oracle, abs=0.1)
    assert floor.bayes_nll == pytest.approx(floor.bayes, abs=0.1)


def test_loss_floor_rejects_a_batch_without_topics(generator, batch):
    unknown = batch.select([0])
    unknown.topic_ids[:] = -1
    with pytest.raises(ValueError, match="topic"):
        loss_floor(generator, unknown)


# Short turns and few topics keep the random-order filter's state (topics × 441 phase histories × turn length) small.
SHORT_TURNS = dict(num_topics=3, min_turn_length=4, max_turn_length=8, min_length=32, max_length=56)


@pytest.mark.parametrize("turn_markers", [False, True])
def test_loss_floor_under_random_phase_order_matches_the_nll_of_sampled_tokens(turn_markers):
    """The filter over (visited phases, current phase) is exact: its entropies agree with the NLL of
    the sampled tokens (a Monte Carlo check over ≈ 3k tokens), and it never beats the phase oracle."""
    config = ConversationConfig(turn_markers=turn_markers, random_phase_order=True, **SHORT_TURNS)
    generator = ConversationGenerator(config, seed=11)
    floor = loss_floor(generator, generator.sample(80))
    assert floor.num_tokens > 3000
    assert floor.bayes_nll == pytest.approx(floor.bayes, abs=0.08)
    assert floor.oracle <= floor.bayes


def test_loss_floor_of_random_order_data_is_higher_than_with_the_order_known():
    """Not knowing the phase order costs the Bayes predictor something; a fixed-order filter run on the
    same tokens would be miscalibrated, so the random-order floor must lie above the oracle but close."""
    config = ConversationConfig(random_phase_order=True, **SHORT_TURNS)
    generator = ConversationGenerator(config, seed=5)
    floor = loss_floor(generator, generator.sample(30))
    assert floor.oracle < floor.bayes < floor.oracle + 0.5


# ----------------------------------------------------------------------------------------------
# n-gram baselines
# ----------------------------------------------------------------------------------------------


def _toy_batch(sequences):
    from chronovisor.eval.data import pad_batch

    return pad_batch([np.asarray(s) for s in sequences], [np.zeros(len(s), dtype=int) for s in sequences],
                     [[0] for _ in sequences], [0] * len(sequences), ("t",), 0)


def test_unigram_baseline_is_the_add_one_frequency_of_training_tokens():
    train, heldout = _toy_batch([[1, 1, 2]]), _toy_batch([[3, 1]])
    baselines = ngram_baselines(train, heldout, vocab_size=4)
    # counts + 1: token 0: 1, 1: 3, 2: 2, 3: 1 → p(1) = 3/7; only the held-out token after the first is scored.
    assert baselines.unigram == pytest.approx(-math.log(3 / 7))
    assert baselines.train_tokens == 3


def test_bigram_baseline_interpolates_discounted_pair_counts_with_the_unigram():
    train, heldout = _toy_batch([[1, 2, 1, 3]]), _toy_batch([[1, 2, 3]])
    baselines = ngram_baselines(train, heldout, vocab_size=4)
    unigram = np.array([1, 3, 2, 2]) / 8
    # context 1 was followed by 2 and 3 once each (c = 2, two types); context 2 by 1 once (c = 1, one type).
    p_2_after_1 = (1 - 0.75) / 2 + 0.75 * 2 / 2 * unigram[2]
    p_3_after_2 = 0.0 + 0.75 * 1 / 1 * unigram[3]
    assert baselines.bigram == pytest.approx(-(math.log(p_2_after_1) + math.log(p_3_after_2)) / 2)


def test_bigram_baseline_falls_back_to_the_unigram_for_unseen_contexts():
    train, heldout = _toy_batch([[1, 1]]), _toy_batch([[3, 2]])
    baselines = ngram_baselines(train, heldout, vocab_size=4)
    assert baselines.bigram == pytest.approx(baselines.unigram)


def test_bigram_baseline_beats_the_unigram_on_the_synthetic_world():
    generator = ConversationGenerator(CONFIG, seed=0, split="train")
    heldout = ConversationGenerator(CONFIG, seed=0, split="heldout").sample(4)
    baselines = ngram_baselines(generator.sample(60), heldout, CONFIG.vocab_size)
    assert baselines.bigram < baselines.unigram < math.log(CONFIG.vocab_size)


def test_ngram_baselines_reject_token_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary of 3"):
        ngram_baselines(_toy_batch([[1, 2]]), _toy_batch([[1, 3]]), vocab_size=3)
