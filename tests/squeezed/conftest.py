import pytest
import torch


@pytest.fixture
def gen():
    """A generator with a fresh random seed: every run draws new inputs."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
