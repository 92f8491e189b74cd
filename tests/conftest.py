"""Shared test set-up.

Sections: general fixtures; model-side fixtures (wrappers, ChronovisorModel, loading, training);
evaluation fixtures (eval/).
"""

import pytest
import torch

from chronovisor.wrappers import build_toy


@pytest.fixture(scope="session")
def mixtral_tiny_dir(tmp_path_factory):
    """A tiny Mixtral saved with save_pretrained (model.safetensors + config.json), built once."""
    directory = tmp_path_factory.mktemp("mixtral-tiny")
    build_toy("mixtral-tiny", seed=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one intra-op thread, then restore the previous count.

    The models and tensors in these tests are tiny: extra threads only add overhead, and OpenMP
    barriers spin badly when another process holds a core of a busy 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------- model side: wrappers, ChronovisorModel, loading
@pytest.fixture
def switch_tiny():
    """A fresh tiny SwitchTransformers (2 encoder + 2 decoder routers, 8 experts, top-1), eval mode."""
    return build_toy("switch-tiny", seed=0)


@pytest.fixture(scope="session")
def switch_tiny_inputs():
    """Encoder and decoder inputs for ``switch_tiny`` (batch 2, encoder 9 / decoder 6 tokens), no padding."""
    generator = torch.Generator().manual_seed(1234)
    return {"input_ids": torch.randint(3, 1000, (2, 9), generator=generator),
            "decoder_input_ids": torch.randint(3, 1000, (2, 6), generator=generator)}


# ---------------------------------------------------------------------------- evaluation (eval/)
#: A small synthetic world with real phase structure: 7 turns of 4-8 tokens, vocabulary 64 (the
#: ConversationConfig fields of every eval test's data). Test modules build their module-level
#: specs from it: ``from conftest import TINY_WORLD``.
TINY_WORLD = dict(vocab_size=64, phase_vocab_size=12, topic_vocab_size=8, min_turn_length=4, max_turn_length=8,
                  min_length=32, max_length=56)



@pytest.fixture(scope="module")
def generator():
    """The default synthetic world (``ConversationConfig()``), sample seed 3; one per test module."""
    from chronovisor.eval.synthetic import ConversationConfig, ConversationGenerator

    return ConversationGenerator(ConversationConfig(), seed=3)


@pytest.fixture(scope="module")
def batch(generator):
    """16 conversations of :func:`generator`."""
    return generator.sample(16)


# --------------------------------------------------- integrations: Trainer, PEFT, datasets, trackers
#: Sentences of a small closed vocabulary: the text every integration test trains and evaluates on.
WORDS = ("the cat sat on a mat while dogs ran far away from big red houses near old trees and "
         "birds sang over quiet green fields").split()
SENTENCES = [" ".join(WORDS[(3 * i) % len(WORDS):] + WORDS[:(3 * i) % len(WORDS)])[: 40 + 7 * (i % 5)]
             for i in range(16)]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A local plain-text file (one sentence per line, a blank line in between) and the same
    sentences as JSONL conversations of two turns each: ``(text_path, jsonl_path)``."""
    import json

    directory = tmp_path_factory.mktemp("corpus")
    text = directory / "corpus.txt"
    text.write_text("\n".join(SENTENCES[:8]) + "\n\n" + "\n".join(SENTENCES[8:]) + "\n")
    conversations = directory / "chat.jsonl"
    conversations.write_text("".join(json.dumps({"turns": [s[:20], s[20:] or "end"], "topic": "t"}) + "\n"
                                     for s in SENTENCES))
    return text, conversations


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory):
    """A WordLevel tokenizer trained here on :data:`WORDS` (pad/unk/bos/eos specials), saved as a
    ``PreTrainedTokenizerFast`` directory: a local tokenizer, nothing from the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    directory = tmp_path_factory.mktemp("word-tokenizer")
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def mixtral_tiny_with_tokenizer(tmp_path_factory, word_tokenizer_dir):
    """A local model directory as users have one: the tiny Mixtral (safetensors) with the word tokenizer."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("mixtral-tiny-tokenizer")
    build_toy("mixtral-tiny", seed=0).save_pretrained(directory)
    AutoTokenizer.from_pretrained(word_tokenizer_dir).save_pretrained(directory)
    return directory


# ----------------------------------------------------- real text: the tiny pretrained checkpoint
@pytest.fixture(scope="session")
def tiny_realtext_run(tmp_path_factory):
    """``chronovisor pretrain configs/realtext/tiny.yaml`` into a temporary run directory, once:
    (run directory, its PretrainRecord). A corpus slice, a 512-token BPE, a 2-layer 4-expert Mixtral."""
    from pathlib import Path

    from chronovisor.eval.pretrain import pretrain
    from chronovisor.eval.pretrain_config import load_pretrain_config

    out = tmp_path_factory.mktemp("realtext_tiny")
    config = load_pretrain_config(Path(__file__).parent.parent / "configs" / "realtext" / "tiny.yaml")
    return out, pretrain(config, out, progress=False)
