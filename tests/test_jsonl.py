"""Specification of the JSONL conversation loader for real models."""

import json

import pytest

from chronovisor.eval.data import IGNORE_INDEX
from chronovisor.eval.jsonl import load_jsonl

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
