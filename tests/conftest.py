"""Shared test set-up."""

import pytest
import torch


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
