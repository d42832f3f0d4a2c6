"""A²ATS kernels: Triton (TRITON_INTERPRET=1 on CPU) vs the PyTorch references, and the references' semantics.

bf16 is not covered: the Triton interpreter's bf16 tl.dot is wrong on CPU (numpy has no bf16); fp16 is.
"""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.a2ats import retrieval
from lmsqueeze.methods.a2ats.kernels import (
    band_edge_tensor,
    code_append_triton,
    select_codes,
    select_codes_triton,
    sparse_decode_attention,
    sparse_decode_attention_triton,
)
from lmsqueeze.methods.a2ats.offload import selected_attention_cpu
from lmsqueeze.methods.a2ats.reference import (
    code_append_reference,
    select_codes_reference,
    selected_slots,
    sparse_decode_attention_reference,
)


@pytest.mark.parametrize("G,C,ties,wide,split", [(1, 50, False, None, False), (4, 64, True, None, False),
                                                (3, 37, False, None, False), (4, 64, True, True, False),
                                                (3, 37, False, True, False), (4, 64, True, None, True),
                                                (3, 37, False, None, True)])
def test_select_kernel_equals_reference(G, C, ties, wide, split):
    """The select kernels (all heads at once; head by head for large codebooks, `wide`; one program per head
    then the union, `split`) equal the reference."""
    B, Hkv = 3, 2
    lut = torch.randn(B, Hkv, G, C)
    if ties:
        lut = (lut * 2).round() / 2  # few distinct values: many ties at the threshold
    counts = torch.randint(0, 6, (B, Hkv, C), dtype=torch.int32)
    lengths = torch.tensor([40, 3000, 100], dtype=torch.int32)
    starts = torch.tensor([0, 7, 0], dtype=torch.int32)
    for ratio in (0.01, 0.03, 1.0):  # 0.01 x 40 keeps no token; 0.03 x 100: float64 rounding must agree
        got = select_codes_triton(lut, counts, lengths, starts, ratio, wide=wide, split=split)
        kth = retrieval.tokens_to_keep(ratio, lengths, starts)
        want = select_codes_reference(lut, counts, kth)
        assert got.dtype == torch.int8 and torch.equal(got.bool(), want), ratio
        assert torch.equal(select_codes(lut, counts, lengths, starts, ratio).bool(), want)
    assert not select_codes_reference(lut, counts, torch.zeros(B, dtype=torch.int32)).any()  # k = 0: nothing
    everything = select_codes_reference(lut, counts, torch.full((B,), 10**6, dtype=torch.int32))
    assert everything[counts > 0].all()  # k above the candidates keeps every code in use


@pytest.mark.parametrize("sinks,window,bands", [(2, 5, ()), (0, 2, ()), (2, 5, (7, 12)), (1, 3, (4, 6, 15))])
def test_code_append_kernel_equals_reference(sinks, window, bands):
    """Code write + histogram update, Triton vs reference, over forward steps, replays and rewinds."""
    B, Hkv, S, C = 3, 2, 40, 33
    codes = torch.randint(0, C, (B, Hkv, S), dtype=torch.int16)
    starts = torch.tensor([0, 3, 9], dtype=torch.int32)
    counts, counted = retrieval.recount(codes, starts, 20, sinks, window, C, bands)
    edges = band_edge_tensor(window, bands, "cpu")
    state = [t.clone() for t in (codes, counts, counted)]
    for n in (21, 22, 22, 23, 24, 25, 23, 24, 24, 25, 26, 27, 28, 26, 27):  # replays; rewinds (warm-up)
        scores = torch.randn(Hkv, B, C)
        slot = torch.tensor([n - 1])
        lengths = torch.full((B,), n, dtype=torch.int32)
        code_append_triton(scores, *state, slot, lengths, starts, sinks, edges)
        code_append_reference(scores, codes, counts, counted, slot, lengths, starts, sinks, window, bands)
        assert torch.equal(state[0], codes) and torch.equal(state[1], counts) and torch.equal(state[2], counted)
        assert torch.equal(codes[:, :, n - 1].long(), scores.argmax(-1).T)
        want, _ = retrieval.recount(codes, starts, n, sinks, window, C, bands)
        assert torch.equal(counts, want), n


def test_select_reference_keeps_the_top_tokens():
    """Per head, the kept tokens number >= kth and outscore every dropped token (brute force over tokens)."""
    B, Hkv, G, C = 2, 2, 4, 40
    lut = torch.randn(B, Hkv, G, C)
    counts = torch.randint(0, 4, (B, Hkv, C), dtype=torch.int32)
    kth = torch.tensor([7, 19], dtype=torch.int32)
    sel = select_codes_reference(lut, counts, kth)
    for b in range(B):
        for h in range(Hkv):
            tokens = torch.repeat_interleave(torch.arange(C), counts[b, h].long())
            union = torch.zeros(tokens.numel(), dtype=torch.bool)
            for g in range(G):
                s = lut[b, h, g, tokens]
                t = s.sort(descending=True).values[int(kth[b]) - 1]
                union |= s >= t
            assert torch.equal(union, sel[b, h, tokens])


def _sparse_inputs(B, Hkv, G, S, D, C, dtype, seed=0, nb=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    codes = torch.randint(0, C, (B, Hkv, S), generator=gen).to(torch.int16)
    sel = (torch.rand(B, Hkv, nb * C, generator=gen) < 0.2).to(torch.int8)
    starts = torch.randint(0, 9, (B,), generator=gen).to(torch.int32)
    lengths = (S - torch.randint(0, 30, (B,), generator=gen)).to(torch.int32)
    return q, k, v, codes, sel, starts, lengths


@pytest.mark.parametrize("D,G,dtype,compact,bands", [(64, 4, torch.float32, False, ()),
                                                     (128, 1, torch.float32, False, (40, 90)),
                                                     (64, 2, torch.float16, False, ()),
                                                     (64, 4, torch.float32, True, (30, 60, 120)),
                                                     (128, 2, torch.float16, True, ())])
@pytest.mark.parametrize("near", [True, False])
def test_sparse_kernel_equals_reference(D, G, dtype, compact, bands, near):
    B, Hkv, S, C = 2, 2, 203, 24
    q, k, v, codes, sel, starts, lengths = _sparse_inputs(B, Hkv, G, S, D, C, dtype, nb=len(bands) + 1)
    sinks, window, scale = 3, 17, D ** -0.5
    want, want_lse = sparse_decode_attention_reference(q, k, v, codes, sel, starts, lengths, sinks, window, scale,
                                                       near, return_lse=True, bands=bands)
    # poison every slot the step must not read: a kernel that loads one gives NaN
    mask = selected_slots(codes, sel, starts, lengths, sinks, window, near, bands)
    kp = k.masked_fill(~mask[..., None], float("nan"))
    vp = v.masked_fill(~mask[..., None], float("nan"))
    got, got_lse = sparse_decode_attention_triton(q, kp, vp, codes, sel, starts, lengths, sinks, window, scale, near,
                                                  return_lse=True, num_splits=3, block_n=32, compact=compact,
                                                  edges=band_edge_tensor(window, bands, "cpu"))
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compact", [False, True])
def test_sparse_kernel_with_nothing_selected(compact):
    q, k, v, codes, sel, starts, lengths = _sparse_inputs(2, 2, 2, 90, 64, 8, torch.float32, seed=3)
    sel.zero_()
    out, lse = sparse_decode_attention_triton(q, k, v, codes, sel, starts, lengths, 2, 8, 0.1, near=False,
                                              return_lse=True, compact=compact)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out, lse = sparse_decode_attention_triton(q, k, v, codes, sel, starts, lengths, 2, 8, 0.1, near=True,
                                              return_lse=True)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("near,bands", [(True, ()), (False, ()), (False, (20, 70))])
def test_cpu_attention_path_equals_reference(near, bands):
    """The CPU-threads path (gathers only the selected rows) computes the reference's function."""
    q, k, v, codes, sel, starts, lengths = _sparse_inputs(3, 2, 4, 150, 64, 16, torch.float32, seed=5,
                                                          nb=len(bands) + 1)
    want, want_lse = sparse_decode_attention_reference(q, k, v, codes, sel, starts, lengths, 4, 10, 0.125, near,
                                                       return_lse=True, bands=bands)
    got, got_lse = selected_attention_cpu(q, k, v, codes, sel, starts, lengths, 4, 10, 0.125, near, bands)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)


def test_dispatch_and_bad_inputs():
    q, k, v, codes, sel, starts, lengths = _sparse_inputs(2, 2, 2, 40, 64, 8, torch.float32)
    out = sparse_decode_attention(q, k, v, codes, sel, starts, lengths, 2, 4, 0.1)
    assert out.shape == q.shape
    with pytest.raises(LmsqueezeError):
        sparse_decode_attention(q, k, v, codes[:, :, :-1], sel, starts, lengths, 2, 4, 0.1)
    with pytest.raises(LmsqueezeError):
        sparse_decode_attention(q, k, v, codes, sel, starts.long(), lengths, 2, 4, 0.1)
    with pytest.raises(LmsqueezeError):
        sparse_decode_attention(q[:, :3], k, v, codes, sel, starts, lengths, 2, 4, 0.1)
    one = torch.ones(2, dtype=torch.int32)
    with pytest.raises(LmsqueezeError):
        select_codes(torch.randn(2, 2, 2, 8), torch.zeros(2, 2, 9, dtype=torch.int32), one, one, 0.1)
    with pytest.raises(LmsqueezeError):
        select_codes_triton(torch.randn(2, 2, 2, 8), torch.zeros(2, 2, 8), one, one, 0.1)
    with pytest.raises(LmsqueezeError):
        select_codes(torch.randn(2, 2, 2, 8), torch.zeros(2, 2, 8, dtype=torch.int32), one[:1], one, 0.1)
