import math

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity, sliding_windows
from lmsqueeze.models.tiny import tiny_model

MODELS = [
    ("llama", {}),                                                              # GQA 4:2, head_dim 16
    ("llama", {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}),  # head_dim 64, MQA
    ("qwen3", {}),                                                              # q/k norms
    ("mistral", {}),                                                            # sliding window 24
]


def hf_guide_nll(model, ids: torch.Tensor, context_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop with plain transformers (its own loss), as summed NLL."""
    total, count, prev_end, n = 0.0, 0, 0, ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + context_length, n)
        trg_len = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        total += float(loss) * valid
        count += valid
        prev_end = end
        if end == n:
            break
    return total, count


CASES = [(f, o, 64, 24, 17) for f, o in MODELS] + [("llama", {}, 64, 64, 16), ("llama", {}, 50, 37, 64)]


@pytest.mark.parametrize("family,overrides,context_length,stride,chunk_size", CASES)
def test_dense_perplexity_equals_plain_transformers(family, overrides, context_length, stride, chunk_size):
    model = tiny_model(family, seed=1, **overrides)
    ids = torch.randint(0, model.config.vocab_size, (203,), generator=torch.Generator().manual_seed(2))
    total, count = hf_guide_nll(model, ids, context_length, stride)
    got = perplexity(model, ids, None, PerplexityConfig(context_length, stride, chunk_size), progress=False)
    assert got.tokens == count
    assert got.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got.nll == pytest.approx(total / count, rel=1e-5)


def test_perplexity_notices_a_changed_model():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(3))
    base = perplexity(model, ids, None, PerplexityConfig(48, 16, 8), progress=False).ppl
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    assert perplexity(model, ids, None, PerplexityConfig(48, 16, 8), progress=False).ppl != pytest.approx(base)


@pytest.mark.parametrize("n,ctx,stride", [(2, 2, 1), (10, 4, 4), (101, 16, 5), (100, 32, 32), (7, 64, 3)])
def test_windows_score_each_token_once(n, ctx, stride):
    scored, unscored, prev_end = [], [], 0
    for begin, end, first in sliding_windows(n, ctx, stride):
        assert 0 <= begin < first < end <= n and end - begin <= ctx
        if begin >= prev_end:  # a window with no overlap: its first token has no context (as in the guide)
            unscored.append(begin)
        scored += range(first, end)
        prev_end = end
    assert sorted(scored + unscored) == list(range(n))
    if stride < ctx:
        assert scored == list(range(1, n))


@pytest.mark.parametrize("kwargs", [{"context_length": 1}, {"context_length": 8, "stride": 9},
                                    {"context_length": 8, "stride": 0}, {"chunk_size": 0}, {"max_tokens": 1}])
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(LmsqueezeError):
        PerplexityConfig(**kwargs)


def test_too_few_tokens_is_a_user_error():
    with pytest.raises(LmsqueezeError):
        perplexity(tiny_model("llama"), [5], None, PerplexityConfig(8), progress=False)
