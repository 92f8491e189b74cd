"""Specification of the evaluation data: the synthetic conversation world, its loss floor, the JSONL loader."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chronovisor.eval.data import (
    IGNORE_INDEX,
    PAD_ID,
    PHASES,
    ConversationConfig,
    ConversationGenerator,
    iterate_batches,
    load_jsonl,
    loss_floor,
    next_token_labels,
    split_batch,
    train_heldout,
)

CONFIG = ConversationConfig()


@pytest.fixture(scope="module")
def generator():
    return ConversationGenerator(CONFIG, seed=3)


@pytest.fixture(scope="module")
def batch(generator):
    return generator.sample(16)


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
    train, heldout = train_heldout(CONFIG, 3, 3, seed=0)
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
    train, heldout = train_heldout(CONFIG, 24, 6, seed=5)
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


# ----------------------------------------------------------------------------------------------
# JSONL loader
# ----------------------------------------------------------------------------------------------

WORDS = "hello there how are you i am fine thanks what about the weather it is sunny today".split()


def _save_tokenizer(directory, *, pad: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]" if pad else None,
    )
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _save_tokenizer(tmp_path_factory.mktemp("tokenizer"), pad=True)


def _write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_loader_marks_turns_topics_and_padding(tmp_path, tokenizer_dir):
    path = _write_jsonl(
        tmp_path / "conv.jsonl",
        [
            {"turns": ["hello there", "how are you", "i am fine thanks"], "topic": "smalltalk"},
            {"turns": ["what about the weather", "it is sunny today"], "topic": "weather"},
        ],
    )
    batch = load_jsonl(path, tokenizer_dir)
    assert batch.lengths.tolist() == [1 + 2 + 3 + 4, 1 + 4 + 4]  # BOS + words
    assert batch.turn_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert batch.turn_boundaries == [[0, 3, 6], [0, 5]]
    assert batch.topic_names == ("smalltalk", "weather") and batch.topic_ids.tolist() == [0, 1]
    assert batch.labels[1, 9].item() == IGNORE_INDEX and batch.turn_ids[1, 9].item() == -1
    assert batch.input_ids[1, 9].item() == batch.pad_token_id == 1


def test_jsonl_loader_truncates_and_caps_turn_ids(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "conv.jsonl", [{"turns": ["hello", "there", "how", "are", "you"]}])
    batch = load_jsonl(path, tokenizer_dir, max_length=4, num_turn_ids=2)
    assert batch.turn_ids.tolist() == [[0, 0, 1, 1]]
    assert batch.turn_boundaries == [[0, 2, 3]]
    assert batch.topic_ids.tolist() == [-1]


def test_jsonl_loader_names_the_bad_line(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "conv.jsonl", [{"turns": ["hello"]}, "", '{"turns": "hello"}'])
    with pytest.raises(ValueError, match=r"conv\.jsonl:3: .*non-empty list of strings"):
        load_jsonl(path, tokenizer_dir)


def test_jsonl_loader_rejects_invalid_json_with_its_line(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "conv.jsonl", [{"turns": ["hello"]}, "{not json"])
    with pytest.raises(ValueError, match=r"conv\.jsonl:2: not valid JSON"):
        load_jsonl(path, tokenizer_dir)


def test_jsonl_loader_reports_a_missing_file(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl", tokenizer_dir)


def test_jsonl_loader_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_save_tokenizer(tmp_path / "tok", pad=False))
    assert tokenizer.pad_token_id is None
    path = _write_jsonl(tmp_path / "conv.jsonl", [{"turns": ["hello there"]}, {"turns": ["hello"]}])
    batch = load_jsonl(path, tokenizer)
    assert batch.pad_token_id == tokenizer.eos_token_id
    assert (
        batch.input_ids[1, 2].item() == tokenizer.eos_token_id and batch.labels[1, 2].item() == IGNORE_INDEX
    )
