"""Squeezed Attention tests run their tiny CPU ops on one thread: faster, and far faster than two threads on a
busy machine (thread hand-offs dominate ops this small)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
