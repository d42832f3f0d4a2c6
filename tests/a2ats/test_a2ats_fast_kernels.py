"""A²ATS fast selection kernels (`_triton_fast.py`, TRITON_INTERPRET=1 on CPU) vs the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.methods.a2ats import retrieval
from lmsqueeze.methods.a2ats.kernels import band_edge_tensor, code_append_triton, select_codes_triton
from lmsqueeze.methods.a2ats.reference import code_append_reference, select_codes_reference


@pytest.mark.parametrize("G,C,dtype,ties", [(4, 64, torch.float16, True), (3, 37, torch.float32, False),
                                            (2, 1100, torch.float16, False)])
def test_radix_select_equals_reference(G, C, dtype, ties):
    """16-way search per head + union == the sorted reference: fp32 (32-bit keys) and fp16 (16-bit keys),
    ties at the threshold, signed zeros, k = 0, k above the candidates, chunked codebooks (C > BLOCK)."""
    B, Hkv = 3, 2
    lut = torch.randn(B, Hkv, G, C)
    if ties:
        lut = (lut * 2).round() / 2  # few distinct values, many ties, +0.0 and -0.0
        lut[0, 0, 0, :5] = -0.0
    lut = lut.to(dtype)
    counts = torch.randint(0, 6, (B, Hkv, C), dtype=torch.int32)
    lengths = torch.tensor([40, 3000, 100], dtype=torch.int32)
    starts = torch.tensor([0, 7, 0], dtype=torch.int32)
    for ratio in (0.01, 0.03, 0.3, 1.0):
        got = select_codes_triton(lut, counts, lengths, starts, ratio, radix=True)
        want = select_codes_reference(lut, counts, retrieval.tokens_to_keep(ratio, lengths, starts))
        assert got.dtype == torch.int8 and torch.equal(got.bool(), want), ratio
    if C > 1024:  # the chunk loop runs more than once; a wrong chunk sum would move the threshold
        got = select_codes_triton(lut, counts, lengths, starts, 0.05, radix=True)
        assert 0 < int(got.sum()) < got.numel()


def test_radix_select_keeps_the_top_codes():
    """Distinct scores: the kept codes of one head are exactly the top codes whose counts first reach k."""
    C = 300
    lut = torch.randperm(C).float().reshape(1, 1, 1, C) - 150.0
    counts = torch.randint(1, 4, (1, 1, C), dtype=torch.int32)
    lengths, starts = torch.tensor([400], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    got = select_codes_triton(lut, counts, lengths, starts, 0.25, radix=True)[0, 0].bool()
    order = lut[0, 0, 0].argsort(descending=True)
    need = int(0.25 * 400)
    n_keep = int((counts[0, 0][order].cumsum(0) < need).sum()) + 1
    want = torch.zeros(C, dtype=torch.bool)
    want[order[:n_keep]] = True
    assert torch.equal(got, want)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("sinks,window,bands,Hkv", [(2, 5, (), 2), (0, 2, (), 3), (2, 5, (7, 12), 2),
                                                    (1, 3, (4, 6, 15), 1)])
def test_code_append_per_head_equals_reference(sinks, window, bands, Hkv, per_head):
    """Code append (one program per (sequence, KV head), the default, or per sequence) == reference over
    forward steps, replays and rewinds (graph warm-up)."""
    B, S, C = 3, 40, 33
    codes = torch.randint(0, C, (B, Hkv, S), dtype=torch.int16)
    starts = torch.tensor([0, 3, 9], dtype=torch.int32)
    counts, counted = retrieval.recount(codes, starts, 20, sinks, window, C, bands)
    edges = band_edge_tensor(window, bands, "cpu")
    state = [t.clone() for t in (codes, counts, counted)]
    for n in (21, 22, 22, 23, 24, 25, 23, 24, 24, 25, 26, 27, 28, 26, 27, 28, 29, 22, 23):
        scores = torch.randn(Hkv, B, C)
        slot = torch.tensor([n - 1])
        lengths = torch.full((B,), n, dtype=torch.int32)
        code_append_triton(scores, *state, slot, lengths, starts, sinks, edges, per_head=per_head)
        code_append_reference(scores, codes, counts, counted, slot, lengths, starts, sinks, window, bands)
        assert torch.equal(state[0], codes) and torch.equal(state[1], counts) and torch.equal(state[2], counted)
        assert torch.equal(codes[:, :, n - 1].long(), scores.argmax(-1).T)
        want, _ = retrieval.recount(codes, starts, n, sinks, window, C, bands)
        assert torch.equal(counts, want), n


@pytest.mark.parametrize("B,Hkv,D,C,bands", [(3, 2, 64, 33, ()), (2, 1, 128, 200, (7, 12)), (5, 2, 64, 64, (9,))])
def test_fused_assign_append_equals_reference(B, Hkv, D, C, bands):
    """Partial-argmax assignment + per-head append == assign_scores + reference append (codes may differ only
    where two codewords tie to float32 rounding)."""
    from lmsqueeze.methods.a2ats.kernels import assign_append

    sinks, window = 2, 5
    S = 40
    codes = torch.randint(0, C, (B, Hkv, S), dtype=torch.int16)
    starts = torch.randint(0, 4, (B,), dtype=torch.int32)
    counts, counted = retrieval.recount(codes, starts, 20, sinks, window, C, bands)
    edges = band_edge_tensor(window, bands, "cpu")
    cb = torch.randn(Hkv, C, D)
    hn = 0.5 * cb.pow(2).sum(-1)
    state = [t.clone() for t in (codes, counts, counted)]
    for n in (21, 22, 23, 22, 23, 24, 25):
        k = torch.randn(B, Hkv, 1, D).to(torch.float16).float()
        slot = torch.tensor([n - 1])
        lengths = torch.full((B,), n, dtype=torch.int32)
        assign_append(k, cb, hn, *state, slot, lengths, starts, sinks, window, bands, edges, fused=True)
        scores = retrieval.assign_scores(k, cb, hn)  # [Hkv, B, C]
        code_append_reference(scores, codes, counts, counted, slot, lengths, starts, sinks, window, bands)
        got = state[0][:, :, n - 1].long().T  # [Hkv, B]
        picked = scores.gather(2, got[..., None])[..., 0]
        assert torch.allclose(picked, scores.max(-1).values, rtol=0, atol=1e-4)  # the best code, to rounding
        assert (got == scores.argmax(-1)).float().mean() > 0.9
        codes[:, :, n - 1] = state[0][:, :, n - 1]  # follow the kernel's codes so the histograms are comparable
        want, _ = retrieval.recount(state[0], starts, n, sinks, window, C, bands)
        assert torch.equal(state[1], want) and torch.equal(state[2], counted), n


@pytest.mark.parametrize("algo", ["bisect16", "bisect16_mark", "bisect16v_mark"])
@pytest.mark.parametrize("G,C,dtype,ties", [(4, 64, torch.float16, True), (3, 37, torch.float32, False),
                                            (2, 300, torch.float16, False), (1, 50, torch.float32, True)])
def test_bisect16_select_equals_reference(algo, G, C, dtype, ties):
    """Bisection per query head (16-bit keys for fp16 tables) with a union launch or direct marking == the
    sorted reference, ties and signed zeros included; marking clears codes selected by a previous step."""
    B, Hkv = 3, 2
    lut = torch.randn(B, Hkv, G, C)
    if ties:
        lut = (lut * 2).round() / 2
        lut[1, 0, 0, :7] = -0.0
    lut = lut.to(dtype)
    counts = torch.randint(0, 6, (B, Hkv, C), dtype=torch.int32)
    lengths = torch.tensor([40, 3000, 100], dtype=torch.int32)
    starts = torch.tensor([0, 7, 0], dtype=torch.int32)
    out = torch.ones(B, Hkv, C, dtype=torch.int8)  # stale selection from an earlier step
    for ratio in (1.0, 0.01, 0.03, 0.3):
        got = select_codes_triton(lut, counts, lengths, starts, ratio, algo=algo, out=out)
        want = select_codes_reference(lut, counts, retrieval.tokens_to_keep(ratio, lengths, starts))
        assert got.dtype == torch.int8 and torch.equal(got.bool(), want), ratio


@pytest.mark.parametrize("B,Hkv,G,D,NB,dtype", [(2, 2, 4, 64, 4, torch.float32), (3, 1, 2, 128, 1, torch.float16),
                                                (1, 2, 3, 64, 3, torch.float32)])
def test_fused_band_lookup_table_equals_reference(B, Hkv, G, D, NB, dtype):
    """One-launch band queries + bmm == band_queries + lookup_table (a strided query view as the model gives)."""
    from lmsqueeze.methods.a2ats.kernels import band_lookup_table

    C = 40
    q = torch.randn(B, 1, Hkv * G, D).transpose(1, 2)[:, :, 0]  # [B, Hq, D], non-contiguous heads
    ang = torch.rand(NB, D // 2) * 6.0
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cb = torch.randn(Hkv, C, D).to(dtype)
    want = band_lookup_table(q, cos, sin, cb, fused=False)
    got = band_lookup_table(q, cos, sin, cb, fused=True)
    assert got.shape == want.shape == (B, Hkv, G, NB * C)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 3e3])
def test_value_bisection_on_awkward_ranges(dtype, scale):
    """The value-first bisection stays exact on tiny, unit and huge scores, infinities and constant rows."""
    B, Hkv, G, C = 2, 2, 2, 90
    lut = torch.randn(B, Hkv, G, C) * scale
    lut[0, 0, 0, 3] = float("inf")
    lut[0, 1, 1, :10] = float("-inf")
    lut[1, 0, 0] = 0.5  # one value for the whole head: everything with a count is kept
    lut = lut.to(dtype)
    counts = torch.randint(0, 4, (B, Hkv, C), dtype=torch.int32)
    lengths = torch.tensor([300, 120], dtype=torch.int32)
    starts = torch.zeros(B, dtype=torch.int32)
    for ratio in (0.02, 0.2, 1.0):
        got = select_codes_triton(lut, counts, lengths, starts, ratio, algo="bisect16v_mark")
        want = select_codes_reference(lut, counts, retrieval.tokens_to_keep(ratio, lengths, starts))
        assert torch.equal(got.bool(), want), ratio
