import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
