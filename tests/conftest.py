import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the tests

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
