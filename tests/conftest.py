"""Test-session settings: under pytest-xdist each worker gets one torch thread, so the workers
share the machine's cores instead of oversubscribing them."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for one test (results that depend on the thread count)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for one test (the code paths that use several threads)."""
    yield from _torch_threads(2)
