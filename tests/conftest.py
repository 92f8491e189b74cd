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
