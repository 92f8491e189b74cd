"""Shared test set-up."""

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


# ---------------------------------------------------------------------------- evaluation (eval/)
#: A small synthetic world with real phase structure: 7 turns of 4-8 tokens, vocabulary 64 (the
#: ConversationConfig fields of every eval test's data). Test modules build their module-level
#: specs from it: ``from conftest import TINY_WORLD``.
TINY_WORLD = dict(vocab_size=64, phase_vocab_size=12, topic_vocab_size=8, min_turn_length=4, max_turn_length=8,
                  min_length=32, max_length=56)

