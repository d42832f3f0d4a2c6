"""KV-quantization baselines (int-uniform, KIVI) in the cache framework, on tiny models."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.generation import generate
from lmsqueeze.methods.base import get_method
from lmsqueeze.methods.baselines import KIVI, IntUniform
from lmsqueeze.methods.baselines.int_uniform import dequantize_uniform, quantize_uniform
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw


def decode_logits(model, method, ids, prompt):
    with torch.no_grad(), lmsqueeze.apply(model, method) as s:
        cache = s.new_cache()
        outs = [model(ids[:, :prompt], **cache_kw(model, cache)).logits]
        outs += [model(ids[:, t:t + 1], **cache_kw(model, cache)).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(outs, 1), cache


def test_registered_and_validated():
    assert get_method("kivi") is KIVI and get_method("int-uniform") is IntUniform
    with pytest.raises(LmsqueezeError, match="bits"):
        IntUniform(bits=5)
    with pytest.raises(LmsqueezeError, match="multiple of group"):
        KIVI(group=32, residual=48)


def test_uniform_quantizer_error_bound():
    x = torch.randn(4, 7, 64)
    codes, s, z = quantize_uniform(x, 4)
    assert ((dequantize_uniform(codes, s, z) - x).abs() <= s.float()[..., None] / 2 + 1e-3).all()


def test_int_uniform_8bit_tracks_and_2bit_does_not():
    model = tiny_model("llama", head_dim=32)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    out8, cache = decode_logits(model, IntUniform(bits=8), ids, 12)
    out2, _ = decode_logits(model, IntUniform(bits=2), ids, 12)
    e8, e2 = (out8 - ref).abs().max(), (out2 - ref)[:, 12:].abs().max()
    assert e8 / ref.abs().max() < 1e-2 and e2 > 3 * e8
    # per token: 8-bit codes (128 B), fp16 scale + zero per (K or V, head) (16 B), a padding flag (1 B)
    assert cache.layers[0].bits_per_element() == 8 * (128 + 16 + 1) / 128


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kivi_residual_window(family):
    """Tokens in the full-precision tail are exact; blocks of `residual` tokens get quantized."""
    model = tiny_model(family, head_dim=32)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    exact, cache = decode_logits(model, KIVI(bits=2, group=8, residual=64), ids, 8)
    assert cache.layers[0].qlen == 0 and (exact - ref).abs().max() < 1e-4   # nothing quantized yet
    quant, cache = decode_logits(model, KIVI(bits=2, group=8, residual=16), ids, 8)
    assert cache.layers[0].qlen == 32 and (quant - ref).abs().max() > 1e-3


def test_kivi_padded_generate_matches_static_path():
    model = tiny_model("mistral", head_dim=32)
    ids = torch.randint(0, 256, (2, 18), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    method = KIVI(bits=4, group=8, residual=16)
    with torch.no_grad(), lmsqueeze.apply(model, method) as s:
        hf = model.generate(ids, attention_mask=mask, **cache_kw(model, s.new_cache()), max_new_tokens=5,
                            do_sample=False)
    ours = generate(model, ids, mask, max_new_tokens=5, method=method, use_graph=False)
    assert torch.equal(ours.new_tokens, hf[:, 18:])
