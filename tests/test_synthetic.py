"""Specification of the synthetic conversation world: seeds, turn structure, phase order, markers, validation."""

import numpy as np
import pytest
import torch

from chronovisor.eval.synthetic import PHASES, ConversationConfig, ConversationGenerator

CONFIG = ConversationConfig()



# ----------------------------------------------------------------------------------------------
# Determinism and seeds
# ----------------------------------------------------------------------------------------------


def test_same_seeds_give_identical_batches():
    first = ConversationGenerator(CONFIG, seed=7).sample(4)
    second = ConversationGenerator(CONFIG, seed=7).sample(4)
    for name in ("input_ids", "attention_mask", "labels", "turn_ids", "topic_ids"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.turn_boundaries == second.turn_boundaries


def test_different_sample_seed_gives_different_conversations():
    first = ConversationGenerator(CONFIG, seed=7).sample(4)
    second = ConversationGenerator(CONFIG, seed=8).sample(4)
    width = min(first.input_ids.shape[1], second.input_ids.shape[1])
    assert not torch.equal(first.input_ids[:, :width], second.input_ids[:, :width])


def test_train_and_heldout_share_the_world_but_not_the_samples():
    train_gen = ConversationGenerator(CONFIG, seed=0, split="train")
    heldout_gen = ConversationGenerator(CONFIG, seed=0, split="heldout")
    np.testing.assert_array_equal(train_gen.phase_bigram, heldout_gen.phase_bigram)
    np.testing.assert_array_equal(train_gen.topic_unigram, heldout_gen.topic_unigram)
    train = train_gen.sample(3)
    heldout = heldout_gen.sample(3)
    assert train.turn_boundaries != heldout.turn_boundaries


def test_world_seed_changes_the_parameters():
    other = ConversationGenerator(ConversationConfig(world_seed=1))
    assert not np.array_equal(ConversationGenerator(CONFIG).phase_support, other.phase_support)


# ----------------------------------------------------------------------------------------------
# Structure and label convention
# ----------------------------------------------------------------------------------------------


def test_turn_lengths_lie_within_bounds(batch):
    for starts, length in zip(batch.turn_boundaries, batch.lengths.tolist(), strict=True):
        turn_lengths = np.diff([*starts, length])
        assert len(turn_lengths) == len(PHASES)
        assert turn_lengths.min() >= CONFIG.min_turn_length and turn_lengths.max() <= CONFIG.max_turn_length


def test_conversation_lengths_lie_within_bounds(batch):
    lengths = batch.lengths
    assert lengths.min() >= CONFIG.min_length and lengths.max() <= CONFIG.max_length


def test_every_conversation_walks_the_seven_phases_in_order(batch):
    for row, starts in enumerate(batch.turn_boundaries):
        turns = batch.turn_ids[row, : batch.lengths[row]]
        changes = [0, *(torch.nonzero(turns[1:] != turns[:-1]).flatten() + 1).tolist()]
        assert changes == starts
        assert turns[starts].tolist() == list(range(len(PHASES)))


def test_turn_markers_open_every_turn():
    config = ConversationConfig(turn_markers=True)
    batch = ConversationGenerator(config, seed=1).sample(3)
    for row, starts in enumerate(batch.turn_boundaries):
        assert batch.input_ids[row, starts].tolist() == [config.marker_id(p) for p in range(len(PHASES))]
        content = batch.input_ids[row, : batch.lengths[row]].clone()
        content[starts] = config.first_content_id
        assert content.min() >= config.first_content_id


def test_phase_is_recoverable_from_token_statistics():
    """Per-phase unigram models fitted on train turns classify held-out turns far above chance (1/7)."""
    train = ConversationGenerator(CONFIG, seed=5, split="train").sample(24)
    heldout = ConversationGenerator(CONFIG, seed=5, split="heldout").sample(6)
    counts = np.ones((len(PHASES), CONFIG.vocab_size))  # add-one smoothing
    real = train.attention_mask.bool()
    np.add.at(counts, (train.turn_ids[real].numpy(), train.input_ids[real].numpy()), 1)
    log_unigram = np.log(counts / counts.sum(axis=1, keepdims=True))

    correct = total = 0
    for row, starts in enumerate(heldout.turn_boundaries):
        ends = [*starts[1:], int(heldout.lengths[row])]
        for phase, (start, end) in enumerate(zip(starts, ends, strict=True)):
            tokens = heldout.input_ids[row, start:end].numpy()
            correct += int(np.argmax(log_unigram[:, tokens].sum(axis=1)) == phase)
            total += 1
    assert correct / total > 0.9


# ----------------------------------------------------------------------------------------------
# Config validation, splits and iteration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"phase_weight": 1.5}, "phase_weight"),
        ({"bigram_concentration": 0.0}, "bigram_concentration"),
        ({"vocab_size": 150}, "vocab_size"),
        ({"max_turn_length": 60}, "max_turn_length"),
        ({"min_length": 1100, "max_length": 1200}, "min_length"),
        ({"max_length": 900}, "max_length"),
        ({"num_topics": 0}, "num_topics"),
    ],
)
def test_invalid_config_is_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ConversationConfig.{field}"):
        ConversationConfig(**overrides)


# ----------------------------------------------------------------------------------------------
# Random phase order
# ----------------------------------------------------------------------------------------------

RANDOM_ORDER = ConversationConfig(random_phase_order=True)


def _turn_phases(batch, row):
    return batch.turn_ids[row, batch.turn_boundaries[row]].tolist()


def test_random_phase_order_visits_every_phase_once_per_conversation():
    batch = ConversationGenerator(RANDOM_ORDER, seed=2).sample(12)
    for row in range(len(batch)):
        assert sorted(_turn_phases(batch, row)) == list(range(len(PHASES)))


def test_random_phase_order_draws_different_orders_across_conversations():
    batch = ConversationGenerator(RANDOM_ORDER, seed=2).sample(12)
    orders = {tuple(_turn_phases(batch, row)) for row in range(len(batch))}
    assert len(orders) > 6


def test_random_phase_order_makes_the_first_turn_phase_roughly_uniform():
    batch = ConversationGenerator(RANDOM_ORDER, seed=4).sample(700)
    first = np.bincount([_turn_phases(batch, row)[0] for row in range(len(batch))], minlength=len(PHASES))
    assert first.min() > 60 and first.max() < 140  # expected 100 each; ±4 binomial SD


def test_random_phase_order_keeps_turn_lengths_and_turn_spans():
    batch = ConversationGenerator(RANDOM_ORDER, seed=2).sample(6)
    for row, starts in enumerate(batch.turn_boundaries):
        turns = batch.turn_ids[row, : batch.lengths[row]]
        changes = [0, *(torch.nonzero(turns[1:] != turns[:-1]).flatten() + 1).tolist()]
        assert changes == starts
        assert np.diff([*starts, int(batch.lengths[row])]).min() >= RANDOM_ORDER.min_turn_length


def test_random_phase_order_off_leaves_the_sample_stream_unchanged():
    explicit = ConversationGenerator(ConversationConfig(random_phase_order=False), seed=9).sample(3)
    default = ConversationGenerator(CONFIG, seed=9).sample(3)
    assert torch.equal(explicit.input_ids, default.input_ids)


def test_turn_markers_name_the_phase_of_each_turn_under_random_order():
    config = ConversationConfig(turn_markers=True, random_phase_order=True)
    batch = ConversationGenerator(config, seed=1).sample(3)
    for row, starts in enumerate(batch.turn_boundaries):
        phases = _turn_phases(batch, row)
        assert batch.input_ids[row, starts].tolist() == [config.marker_id(p) for p in phases]
