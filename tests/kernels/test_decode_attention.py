"""Triton decode attention (TRITON_INTERPRET=1 on CPU, tiny shapes) against the float32 reference.

bf16 is not covered here: the Triton 3.x interpreter's bf16 tl.dot returns garbage on CPU (numpy has no
bf16); bf16 is checked on the GPU by benchmarks/scripts/bench_decode_kernel.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported (lazily, at first call)

import pytest
import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.decode_attention import decode_attention, decode_attention_triton, default_num_splits
from lmsqueeze.kernels.merge import merge_attention_states
from lmsqueeze.kernels.reference import decode_attention_reference

triton = pytest.importorskip("triton")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _inputs(B, Hkv, G, D, S, dtype, layout="plain", seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    if layout == "plain":
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    elif layout == "slice":  # a view of a longer buffer (static cache with S_max larger than used here)
        k = torch.randn(B, Hkv, S + 7, D, generator=g).to(dtype)[:, :, :S]
        v = torch.randn(B, Hkv, S + 7, D, generator=g).to(dtype)[:, :, :S]
    else:  # "bshd": [B, S, Hkv, D] storage seen as [B, Hkv, S, D]
        k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize(
    "G, D, dtype, layout, window, num_splits",
    [
        (1, 64, torch.float32, "plain", None, 3),
        (4, 128, torch.float32, "slice", 9, 2),
        (4, 64, torch.float16, "bshd", None, 4),
        (1, 128, torch.float16, "plain", 16, 1),
    ],
)
def test_kernel_matches_reference_batch_lengths_starts(G, D, dtype, layout, window, num_splits):
    B, Hkv, S = 3, 2, 45
    q, k, v = _inputs(B, Hkv, G, D, S, dtype, layout)
    lengths = torch.tensor([45, 1, 30], dtype=torch.int32)  # full, single slot, odd partial
    starts = torch.tensor([0, 0, 7], dtype=torch.int32)
    scaling = D ** -0.5
    out, lse = decode_attention_triton(q, k, v, lengths, scaling, starts, window, num_splits, return_lse=True,
                                       block_n=16)
    ref, ref_lse = decode_attention_reference(q, k, v, lengths, scaling, starts, window, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, G * Hkv, D) and lse.dtype == torch.float32
    assert _rel(out, ref) < TOL[dtype]
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_splits_and_tiles_do_not_change_result():
    q, k, v = _inputs(2, 1, 2, 64, 77, torch.float32)
    lengths = torch.tensor([77, 50], dtype=torch.int32)
    a = decode_attention_triton(q, k, v, lengths, 0.125, num_splits=1, block_n=64)
    b = decode_attention_triton(q, k, v, lengths, 0.125, num_splits=5, block_n=16)
    assert _rel(a, b) < 1e-5


def test_empty_sequences_and_empty_splits():
    """Length 0 (or start == length) gives out 0, lse -inf; many splits over few slots stay exact."""
    q, k, v = _inputs(3, 1, 4, 64, 20, torch.float32)
    lengths = torch.tensor([0, 3, 5], dtype=torch.int32)
    starts = torch.tensor([0, 0, 5], dtype=torch.int32)
    out, lse = decode_attention_triton(q, k, v, lengths, 0.125, starts, num_splits=6, return_lse=True,
                                       block_n=16)
    ref, ref_lse = decode_attention_reference(q, k, v, lengths, 0.125, starts, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all() and torch.isneginf(lse[[0, 2]]).all()
    assert _rel(out[1], ref[1]) < 1e-5 and torch.allclose(lse[1], ref_lse[1], atol=1e-4)


def test_reference_equals_exact_sdpa_dense():
    B, Hkv, G, S, D = 2, 2, 4, 33, 64
    q, k, v = _inputs(B, Hkv, G, D, S, torch.float32)
    lengths = torch.full((B,), S, dtype=torch.int32)
    ref = decode_attention_reference(q, k, v, lengths, D ** -0.5)
    k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k_rep, v_rep, scale=D ** -0.5)[:, :, 0]
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)
    # and the masked case equals SDPA over exactly the valid slots
    lengths = torch.tensor([20, 33], dtype=torch.int32)
    starts = torch.tensor([4, 0], dtype=torch.int32)
    ref = decode_attention_reference(q, k, v, lengths, D ** -0.5, starts)
    sdpa0 = F.scaled_dot_product_attention(q[:1, :, None], k_rep[:1, :, 4:20], v_rep[:1, :, 4:20],
                                           scale=D ** -0.5)[:, :, 0]
    torch.testing.assert_close(ref[:1], sdpa0, atol=1e-5, rtol=1e-5)


def test_merge_attention_states_equals_attention_over_union():
    B, Hkv, G, S, D = 2, 2, 2, 40, 64
    q, k, v = _inputs(B, Hkv, G, D, S, torch.float32)
    full, full_lse = decode_attention_reference(q, k, v, torch.full((B,), S, dtype=torch.int32), 0.125,
                                                return_lse=True)
    cut = torch.tensor([13, 0], dtype=torch.int32)  # second sequence: part A is empty
    out_a, lse_a = decode_attention_reference(q, k, v, cut, 0.125, return_lse=True)
    out_b, lse_b = decode_attention_reference(q, k, v, torch.full((B,), S, dtype=torch.int32), 0.125,
                                              starts=cut, return_lse=True)
    out_a = torch.where(torch.isneginf(lse_a)[..., None], float("nan"), out_a)  # empty side must be ignored
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    both_empty = merge_attention_states(out_a, torch.full_like(lse_a, float("-inf")), out_b,
                                        torch.full_like(lse_b, float("-inf")))
    assert (both_empty[0] == 0).all() and torch.isneginf(both_empty[1]).all()


def test_cpu_dispatch_is_reference_and_bad_inputs_raise():
    q, k, v = _inputs(1, 2, 2, 64, 9, torch.float32)
    lengths = torch.tensor([9], dtype=torch.int32)
    torch.testing.assert_close(decode_attention(q, k, v, lengths, 0.1, window=4),
                               decode_attention_reference(q, k, v, lengths, 0.1, window=4))
    with pytest.raises(LmsqueezeError, match="int32"):
        decode_attention(q, k, v, lengths.long(), 0.1)
    with pytest.raises(LmsqueezeError, match="multiple"):
        decode_attention(q[:, :3], k, v, lengths, 0.1)
    with pytest.raises(LmsqueezeError, match="head dim"):
        decode_attention_triton(q[..., :48], k[..., :48], v[..., :48], lengths, 0.1)
    with pytest.raises(LmsqueezeError, match="window"):
        decode_attention(q, k, v, lengths, 0.1, window=0)


def test_default_num_splits_depends_on_shapes_only():
    assert default_num_splits(1, 8, 131072, 64, sms=132, programs_per_sm=2) == 33  # 264 programs, 132 SMs
    assert default_num_splits(1, 8, 100, 64, sms=132, programs_per_sm=2) == 2  # never more splits than tiles
    assert default_num_splits(16, 8, 131072, 64, sms=132, programs_per_sm=2) == 3
    assert default_num_splits(256, 8, 131072, 64, sms=132, programs_per_sm=2) == 1
