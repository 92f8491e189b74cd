"""Conversations and plain text through HF datasets (local files, a tokenizer trained in the test)."""

import json

import pytest
import torch
from conftest import SENTENCES
from transformers import AutoTokenizer

from chronovisor.eval.data import IGNORE_INDEX
from chronovisor.eval.text_datasets import as_conversation_batch, lm_collator, load_lm_dataset


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer_dir):
    return AutoTokenizer.from_pretrained(word_tokenizer_dir)


def test_plain_text_loads_one_sequence_per_non_empty_line_starting_with_bos(text_corpus, word_tokenizer_dir, tokenizer):
    text_path, _ = text_corpus
    dataset = load_lm_dataset(text_path, word_tokenizer_dir, max_length=64)
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(dataset) == len(SENTENCES)                      # the blank line is dropped
    first = dataset[0]
    assert first["input_ids"] == [tokenizer.bos_token_id] + tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]
    assert first["labels"] == first["input_ids"] and first["attention_mask"] == [1] * len(first["input_ids"])


def test_conversations_tokenise_turn_by_turn_and_truncate_to_max_length(text_corpus, tokenizer):
    _, jsonl_path = text_corpus
    dataset = load_lm_dataset(jsonl_path, tokenizer, max_length=6)
    turns = json.loads(jsonl_path.read_text().splitlines()[0])["turns"]
    expected = [tokenizer.bos_token_id] + [i for turn in turns for i in tokenizer(turn, add_special_tokens=False)["input_ids"]]
    assert dataset[0]["input_ids"] == expected[:6]
    assert max(len(ids) for ids in dataset["input_ids"]) == 6


def test_the_collator_pads_ids_with_the_pad_token_and_labels_with_minus_100(text_corpus, tokenizer):
    dataset = load_lm_dataset(text_corpus[0], tokenizer)
    rows = [dataset[0], dataset[1]]
    batch = lm_collator(tokenizer)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    length = len(rows[short]["input_ids"])
    assert length < batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)
    assert bool((batch["input_ids"][short, length:] == tokenizer.pad_token_id).all())
    assert bool((batch["labels"][short, length:] == IGNORE_INDEX).all())
    assert bool((batch["attention_mask"][short, length:] == 0).all())


def test_as_conversation_batch_keeps_every_token_and_masks_padding(text_corpus, tokenizer):
    dataset = load_lm_dataset(text_corpus[0], tokenizer)
    batch = as_conversation_batch(dataset, tokenizer.pad_token_id)
    assert batch.lengths.tolist() == [len(ids) for ids in dataset["input_ids"]]
    assert torch.equal(batch.labels == IGNORE_INDEX, batch.attention_mask == 0)


def test_a_missing_file_a_wrong_json_shape_and_a_remote_tokenizer_name_each_fail_with_one_clear_line(
        tmp_path, word_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="data file not found: .*absent.txt"):
        load_lm_dataset(tmp_path / "absent.txt", word_tokenizer_dir)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "no turns here"}) + "\n")
    with pytest.raises(ValueError, match=r'wrong.jsonl: expected one object with a "turns" list per line \(got keys text\)'):
        load_lm_dataset(wrong, word_tokenizer_dir)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"turns": ["a"]}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl: cannot be read as json by datasets"):
        load_lm_dataset(broken, word_tokenizer_dir)
    text = tmp_path / "ok.txt"
    text.write_text("the cat\n")
    with pytest.raises(FileNotFoundError, match="--tokenizer some-org/some-tokenizer: not a local tokenizer directory"):
        load_lm_dataset(text, "some-org/some-tokenizer")
