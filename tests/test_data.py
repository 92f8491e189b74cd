"""Specification of the conversation batch: padding, the label convention, selection, splits and iteration."""

import torch
import torch.nn.functional as F

from chronovisor.eval.data import IGNORE_INDEX, PAD_ID, iterate_batches, next_token_labels, split_batch
from chronovisor.eval.synthetic import ConversationConfig

CONFIG = ConversationConfig()



def test_padding_is_masked_everywhere(batch):
    padding = batch.attention_mask == 0
    assert torch.equal(padding, batch.turn_ids == -1)
    assert bool((batch.input_ids[padding] == PAD_ID).all())
    assert bool((batch.labels[padding] == IGNORE_INDEX).all())
    assert padding.any(), "the fixture should contain padding"


def test_labels_are_unshifted_input_ids_on_real_tokens(batch):
    real = batch.attention_mask == 1
    assert torch.equal(batch.labels[real], batch.input_ids[real])
    assert not bool((batch.input_ids[real] == PAD_ID).any())


def test_next_token_labels_target_the_following_token(batch):
    targets = next_token_labels(batch.labels)
    row, length = 0, int(batch.lengths[0])
    assert torch.equal(targets[row, : length - 1], batch.input_ids[row, 1:length])
    assert int(targets[row, length - 1]) == IGNORE_INDEX
    assert bool((targets[:, -1] == IGNORE_INDEX).all())


def test_labels_give_the_huggingface_causal_lm_loss(batch):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=CONFIG.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=CONFIG.max_length,
    )
    model = MixtralForCausalLM(config).eval()
    small = batch.select([0, 1])
    with torch.no_grad():
        out = model(input_ids=small.input_ids, attention_mask=small.attention_mask, labels=small.labels)
    manual = F.cross_entropy(
        out.logits.flatten(0, 1).float(), next_token_labels(small.labels).flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(out.loss, manual)


def test_select_trims_to_the_longest_selected_conversation(batch):
    shortest = int(torch.argmin(batch.lengths))
    single = batch.select([shortest])
    assert single.input_ids.shape == (1, int(batch.lengths[shortest]))
    assert bool(single.attention_mask.all())


def test_iterate_batches_is_deterministic_and_covers_every_conversation(batch):
    first = [b.topic_ids.tolist() for b in iterate_batches(batch, 5, shuffle_seed=1)]
    second = [b.topic_ids.tolist() for b in iterate_batches(batch, 5, shuffle_seed=1)]
    assert first == second
    assert [len(b) for b in iterate_batches(batch, 5)] == [5, 5, 5, 1]
    assert [len(b) for b in iterate_batches(batch, 5, drop_last=True)] == [5, 5, 5]
    seen = sorted(sum((b.turn_boundaries for b in iterate_batches(batch, 5, shuffle_seed=1)), []))
    assert seen == sorted(batch.turn_boundaries)


def test_split_batch_partitions_the_conversations(batch):
    train, heldout = split_batch(batch, 0.25, seed=0)
    assert (len(train), len(heldout)) == (12, 4)
    assert sorted(train.turn_boundaries + heldout.turn_boundaries) == sorted(batch.turn_boundaries)
