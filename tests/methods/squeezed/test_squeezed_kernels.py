"""Squeezed Attention's Triton kernels (TRITON_INTERPRET=1 on CPU, tiny shapes) against their references.

fp32 only: the Triton 3.x interpreter's bf16 tl.dot is not meaningful on CPU; bf16 is checked on the GPU by
benchmarks/scripts/bench_squeezed.py. Fresh random inputs on every run.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.squeezed import kernels as K
from lmsqueeze.methods.squeezed import reference as R
from lmsqueeze.methods.squeezed.lookup import log_sizes, mask_to_index

pytest.importorskip("triton")

CASES = [(1, 64), (4, 128)]  # (GQA group size, head dim)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _index(Hkv, D, C, W, gen):
    """Random cluster sizes (some empty), offsets with the observation window as cluster C."""
    sizes = torch.randint(0, 6, (Hkv, C), generator=gen)
    n = int(sizes.sum(-1).max()) + W
    offs = torch.zeros(Hkv, C + 2, dtype=torch.int32)
    offs[:, 1:C + 1] = torch.cumsum(sizes, -1).to(torch.int32)
    offs[:, C + 1] = n
    return sizes, offs, torch.randn(Hkv, n, D, generator=gen), torch.randn(Hkv, n, D, generator=gen)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


@pytest.mark.parametrize("G,D,nsub", [(1, 64, 1), (4, 128, 3)])
def test_centroid_scores_and_decode_match_reference(G, D, nsub, gen):
    B, Hkv, C, W, L = 2, 2, 71, 5, 37          # odd sizes; C + 1 spans two programs of BLOCK_C
    sizes, offs, keys, vals = _index(Hkv, D, C, W, gen)
    ls = log_sizes(sizes)
    cents = torch.randn(Hkv, C, D, generator=gen)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    sc = D ** -0.5
    s, e = K.centroid_scores_triton(q, cents, ls, sc)
    s_r, e_r = R.centroid_scores_reference(q, cents, ls, sc, K.BLOCK_C)
    assert _rel(s, s_r) < 1e-5
    assert torch.allclose(torch.nan_to_num(e, neginf=-1e4), torch.nan_to_num(e_r, neginf=-1e4), atol=1e-4)
    a = (s_r - torch.logsumexp(e_r, -1, keepdim=True)).reshape(B, Hkv, G, C).amax(2)
    tau = torch.nan_to_num(a, neginf=-1e30).flatten(0).median().repeat(Hkv)  # keeps about half
    lk, lv = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    lengths = torch.tensor([L - 9, L], dtype=torch.int32)
    starts = torch.tensor([0, 4], dtype=torch.int32)
    o, lse, kept = K.squeezed_decode_triton(q, keys, vals, offs, s_r, e_r, tau, lk, lv, lengths, sc, starts,
                                            local_splits=2, block_c=32, block_n=16, sub_splits=nsub)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(q, keys, vals, offs, s_r, e_r, tau, lk, lv, lengths, sc, starts)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    assert torch.equal(kept, kept_r)
    assert (kept > W).all() and (kept < torch.tensor(keys.shape[1])).all()  # really sparse, window always read


@pytest.mark.parametrize("G,D", CASES)
def test_fine_scores_match_reference_and_skip_pruned(G, D, gen):
    B, Hkv, C1, C2 = 2, 2, 9, 67
    sizes = torch.randint(0, 6, (Hkv, C2), generator=gen)
    parent = torch.sort(torch.randint(0, C1, (Hkv, C2), generator=gen), -1).values.to(torch.int32)
    csz = torch.zeros(Hkv, C1, dtype=torch.long).scatter_add_(1, parent.long(), sizes)
    coarse, fine = torch.randn(Hkv, C1, D, generator=gen), torch.randn(Hkv, C2, D, generator=gen)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    sc = D ** -0.5
    s1, e1 = R.centroid_scores_reference(q, coarse, log_sizes(csz), sc, K.BLOCK_C)
    a1 = (s1 - torch.logsumexp(e1, -1, keepdim=True)).reshape(B, Hkv, G, C1).amax(2)
    tau1 = torch.nan_to_num(a1, neginf=-1e30).flatten().median().repeat(Hkv)
    s2, e2, scored = K.fine_scores_triton(q, fine, log_sizes(sizes), parent, s1, e1, tau1, sc)
    s2_r, e2_r, scored_r = R.fine_scores_reference(q, fine, log_sizes(sizes), parent, s1, e1, tau1, sc, K.BLOCK_C)
    fin = torch.isfinite(s2_r)
    assert torch.equal(torch.isfinite(s2), fin)
    assert _rel(s2[fin], s2_r[fin]) < 1e-5
    assert torch.allclose(torch.nan_to_num(e2, neginf=-1e4), torch.nan_to_num(e2_r, neginf=-1e4), atol=1e-4)
    assert torch.equal(scored, scored_r) and (scored < C2).all()


@pytest.mark.parametrize("G,D", CASES)
def test_indexed_attention_and_prefill_scores_match_reference(G, D, gen):
    B, Hkv, T, L, N, C = 2, 2, 7, 29, 53, 41
    keys, vals = torch.randn(Hkv, N, D, generator=gen), torch.randn(Hkv, N, D, generator=gen)
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    idx, cnt = mask_to_index(torch.rand(B, Hkv, N, generator=gen) < 0.4)
    lk, lv = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    lengths = torch.tensor([T + 2, L], dtype=torch.int32)
    starts = torch.tensor([1, 0], dtype=torch.int32)
    sc = D ** -0.5
    o_r, lse_r = R.indexed_attention_reference(q, keys, vals, idx, cnt, lk, lv, lengths, sc, starts)
    for steady, bn in ((False, 16), (True, 16), (True, 8)):   # whole tiles unmasked + a masked tail, or all masked
        o, lse = K.indexed_attention_triton(q, keys, vals, idx, cnt, lk, lv, lengths, sc, starts, return_lse=True,
                                            block_n=bn, steady=steady)
        assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    cents = torch.randn(Hkv, C, D, generator=gen)
    ls = log_sizes(torch.randint(0, 4, (B, Hkv, C), generator=gen))       # per-sequence exclusions
    p_r = R.prefill_scores_reference(q, cents, ls, sc)
    for e2 in (True, "rows", False):            # transposed pass 2 (default), row-major pass 2, base e
        p = K.prefill_scores_triton(q, cents, ls, sc, block_m=16, block_c=16, exp2=e2)
        assert _rel(p, p_r) < 1e-5


def test_kernel_inputs_are_checked():
    q = torch.randn(1, 4, 24)                                  # head dim not a power of two
    with pytest.raises(LmsqueezeError):
        K.centroid_scores_triton(q, torch.randn(2, 5, 24), torch.zeros(2, 5), 1.0)
    q = torch.randn(1, 3, 64)                                  # 3 query heads over 2 KV heads
    with pytest.raises(LmsqueezeError):
        K.centroid_scores_triton(q, torch.randn(2, 5, 64), torch.zeros(2, 5), 1.0)


@pytest.mark.parametrize("D,block_d", [(64, 16), (128, 32), (128, None)])
def test_merge_splits_matches_softmax_of_partials(D, block_d, gen):
    B, Hq, S = 2, 4, 37
    mid_o, mid_lse = torch.randn(B, Hq, S, D, generator=gen), torch.randn(B, Hq, S, generator=gen)
    mid_lse[0, 0, :5] = float("-inf")                      # empty splits
    mid_lse[1, 2] = float("-inf")                          # a head with no key at all
    out, lse = K.merge_splits(mid_o, mid_lse, torch.float32, block_d)
    ok = torch.isfinite(mid_lse).any(-1)
    ref = (torch.softmax(mid_lse[ok], -1)[..., None] * mid_o[ok]).sum(-2)
    assert _rel(out[ok], ref) < 1e-5 and _rel(lse[ok], torch.logsumexp(mid_lse[ok], -1)) < 1e-6
    assert (out[~ok] == 0).all() and (lse[~ok] == float("-inf")).all()


@pytest.mark.parametrize("D", [64, 128])
def test_gather_rows_matches_torch_gather(D, gen):
    B, Hkv, N, W = 2, 3, 53, 29                                  # odd sizes, a partial last block
    keys, vals = torch.randn(Hkv, N, D, generator=gen), torch.randn(Hkv, N, D, generator=gen)
    idx = torch.randint(0, N, (B, Hkv, W), generator=gen).to(torch.int32)
    kg, vg = torch.full((B, Hkv, W, D), float("nan")), torch.full((B, Hkv, W, D), float("nan"))
    K.gather_rows_triton(keys, vals, idx, kg, vg, block_r=16)
    ii = idx.long()[..., None].expand(-1, -1, -1, D)
    assert torch.equal(kg, keys[None].expand(B, -1, -1, -1).gather(2, ii))
    assert torch.equal(vg, vals[None].expand(B, -1, -1, -1).gather(2, ii))


def _dense_lse(q, k, v, scaling):
    """Plain-torch stand-in for cudnn_attention_lse: q [B, H, M, D], k, v [B, H, N, D]."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scaling
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), torch.logsumexp(s, -1)


@pytest.mark.parametrize("G,D", CASES)
def test_gathered_attention_matches_reference(G, D, gen):
    """Gather the listed rows + dense attention with lse over them (query heads packed as rows) + the causal
    local slots + the log-sum-exp merge = indexed attention over the same rows (batch 2, left padding)."""
    B, Hkv, T, L, N, W = 2, 2, 7, 29, 53, 19
    keys, vals = torch.randn(Hkv, N, D, generator=gen), torch.randn(Hkv, N, D, generator=gen)
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(N, generator=gen)[:W] for _ in range(Hkv)]) for _ in range(B)])
    idx = torch.cat([idx, torch.zeros(B, Hkv, 5, dtype=idx.dtype)], -1).to(torch.int32)   # wider than W
    lk, lv = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    lengths = torch.tensor([T + 2, L], dtype=torch.int32)
    starts = torch.tensor([1, 0], dtype=torch.int32)
    sc = D ** -0.5
    got = K.gathered_attention(q, keys, vals, idx, W, lk, lv, lengths, sc, starts, fixed_attn=_dense_lse)
    counts = torch.full((B, Hkv), W, dtype=torch.int32)
    want, _ = R.indexed_attention_reference(q, keys, vals, idx, counts, lk, lv, lengths, sc, starts)
    assert _rel(got, want) < 1e-5
