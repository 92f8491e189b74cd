"""The byte-level BPE tokenizer: trained with HF tokenizers, saved and reloaded in transformers format."""

import json

from transformers import AutoTokenizer

from chronovisor.eval.corpus import build_corpus, load_corpus
from chronovisor.eval.tokenizer import END_OF_TEXT, train_tokenizer


def _texts(tmp_path):
    build_corpus(tmp_path / "corpus", max_sources_per_kind=3)
    return load_corpus(tmp_path / "corpus")["train"]["text"]


def test_the_tokenizer_round_trips_prose_code_and_unicode_exactly_after_save_and_from_pretrained(tmp_path):
    texts = _texts(tmp_path)
    train_tokenizer(texts, 600, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tokenizer) == 600
    assert tokenizer.eos_token == tokenizer.pad_token == END_OF_TEXT
    for text in [*texts[:4], "def f(x):\n\treturn x  # ünïcödé → ✓\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_training_the_tokenizer_twice_on_the_same_texts_gives_the_same_vocabulary_and_merges(tmp_path):
    texts = _texts(tmp_path)
    first = train_tokenizer(texts, 600).backend_tokenizer.to_str()
    second = train_tokenizer(texts, 600).backend_tokenizer.to_str()
    assert json.loads(first)["model"] == json.loads(second)["model"]
