"""The kvquant rows of `lmsqueeze bench attention`: registered, and the same attention up to quantization."""

import math

import pytest
import torch

from lmsqueeze.bench.attention import ATTENTION_VARIANTS, AttentionInputs, reference_attention, rel_err


@pytest.mark.parametrize("bits,tol", [(4, 0.3), (3, 0.45)])
def test_bench_variant_matches_dense_attention(bits, tol):
    B, Hq, Hkv, N, D = 2, 4, 2, 77, 64
    k = torch.randn(B, Hkv, N, D)
    inp = AttentionInputs(torch.randn(B, Hq, 1, D), k, torch.randn(B, Hkv, N, D), 1 / math.sqrt(D))
    bench = ATTENTION_VARIANTS[f"kvquant-nuq{bits}"](inp)
    out = bench.fn()
    assert out.shape == (B, Hq, 1, D) and not bench.exact
    # a wrong inverse rotation of the post-RoPE keys gives errors near 0.75
    assert rel_err(out, reference_attention(inp)) < tol
    assert bench.bytes_moved < (k.nbytes + inp.v.nbytes) * bits / 16
