"""The one-launch Squeezed decode (split kernel that merges its own partials through an atomic ticket) and the
wider cluster ranges per program, against the PyTorch reference under TRITON_INTERPRET=1 (fp32, tiny shapes,
fresh random inputs): GQA 1/3/4, head dims 64/128, odd sizes, batch 2, sparsity 0 = dense."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.methods.squeezed import kernels as K
from lmsqueeze.methods.squeezed import reference as R
from lmsqueeze.methods.squeezed.lookup import log_sizes

pytest.importorskip("triton")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _case(B, Hkv, G, D, C, W, L, gen, keep_all=False):
    sizes = torch.randint(0, 6, (Hkv, C), generator=gen)
    n = int(sizes.sum(-1).max()) + W
    offs = torch.zeros(Hkv, C + 2, dtype=torch.int32)
    offs[:, 1:C + 1] = torch.cumsum(sizes, -1).to(torch.int32)
    offs[:, C + 1] = n
    keys, vals = torch.randn(Hkv, n, D, generator=gen), torch.randn(Hkv, n, D, generator=gen)
    cents = torch.randn(Hkv, C, D, generator=gen)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    sc = D ** -0.5
    s, e = R.centroid_scores_reference(q, cents, log_sizes(sizes), sc, K.BLOCK_C)
    a = (s - torch.logsumexp(e, -1, keepdim=True)).reshape(B, Hkv, G, C).amax(2)
    tau = (torch.full((Hkv,), float("-inf")) if keep_all
           else torch.nan_to_num(a, neginf=-1e30).flatten(0).quantile(0.7).repeat(Hkv))
    lk, lv = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    lengths = torch.tensor([L - 9] + [L] * (B - 1), dtype=torch.int32)
    starts = torch.tensor([0] + [4] * (B - 1), dtype=torch.int32)
    return q, keys, vals, offs, s, e, tau, lk, lv, lengths, sc, starts


@pytest.mark.parametrize("G,D,block_c,nsub", [(1, 64, 16, 1), (4, 128, 64, 1), (3, 64, 32, 2), (4, 64, 128, 1)])
def test_fused_merge_decode_matches_reference(G, D, block_c, nsub, gen):
    args = _case(2, 2, G, D, 83, 5, 37, gen)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(*args)
    o, lse, kept = K.squeezed_decode_triton(*args, local_splits=2, block_c=block_c, block_n=16, sub_splits=nsub,
                                            fused_merge=True)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    assert torch.equal(kept, kept_r) and (kept < args[1].shape[1]).all()  # really sparse
    assert int(K._tickets(o.device, 4)[:4].abs().sum()) == 0             # tickets left at 0 for the next call
    # a second call reuses the tickets: same answer
    o2, lse2, _ = K.squeezed_decode_triton(*args, local_splits=2, block_c=block_c, block_n=16, sub_splits=nsub,
                                           fused_merge=True)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    # the unfused path (separate merge launch) agrees
    o3, lse3, _ = K.squeezed_decode_triton(*args, local_splits=2, block_c=block_c, block_n=16, sub_splits=nsub,
                                           fused_merge=False)
    assert _rel(o3, o) < 1e-5 and _rel(lse3, lse) < 1e-5


def test_fused_merge_sparsity0_equals_dense(gen):
    """Threshold -inf keeps every cluster: the fused decode is dense attention over context + local slots
    (several tiles per block)."""
    q, keys, vals, offs, s, e, tau, lk, lv, lengths, sc, starts = _case(2, 2, 4, 64, 29, 3, 21, gen, keep_all=True)
    o, lse, kept = K.squeezed_decode_triton(q, keys, vals, offs, s, e, tau, lk, lv, lengths, sc, starts,
                                            local_splits=1, block_c=16, block_n=16, fused_merge=True)
    n_ctx = offs[:, -1].long()
    for b in range(2):
        for h in range(2):
            kk = torch.cat([keys[h, :n_ctx[h]], lk[b, h, starts[b]:lengths[b]]])
            vv = torch.cat([vals[h, :n_ctx[h]], lv[b, h, starts[b]:lengths[b]]])
            qq = q[b, h * 4:(h + 1) * 4]
            logits = qq @ kk.T * sc
            assert _rel(o[b, h * 4:(h + 1) * 4], torch.softmax(logits, -1) @ vv) < 1e-5
            assert _rel(lse[b, h * 4:(h + 1) * 4], torch.logsumexp(logits, -1)) < 1e-5
    assert torch.equal(kept, offs[:, -1].expand(2, -1).to(kept.dtype))


@pytest.mark.parametrize("G,D,block_c,nsub,bpp,fused", [(1, 64, 16, 1, 2, False), (4, 128, 16, 2, 3, False),
                                                         (3, 64, 16, 1, 4, True), (4, 64, 32, 1, 9, False)])
def test_blocks_per_program_decode_matches_reference(G, D, block_c, nsub, bpp, fused, gen):
    """Several blocks of clusters per program (strided, one softmax): same output, lse and kept count; bpp above
    the number of blocks is clamped."""
    args = _case(2, 2, G, D, 83, 5, 37, gen)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(*args)
    o, lse, kept = K.squeezed_decode_triton(*args, local_splits=2, block_c=block_c, block_n=16, sub_splits=nsub,
                                            blocks_per_program=bpp, fused_merge=fused)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    assert torch.equal(kept, kept_r) and (kept < args[1].shape[1]).all()
    mid_o, _ = K.squeezed_decode_triton(*args, local_splits=2, block_c=block_c, block_n=16, sub_splits=nsub,
                                        blocks_per_program=bpp, partials_only=True)
    nsp = -(-(83 + 1) // block_c)
    assert mid_o.shape[2] == -(-nsp // min(bpp, nsp)) * nsub + 2      # fewer partials to merge


@pytest.mark.parametrize("G,D,block_c,nsub,bpp,early,local_first,hoist_v",
                         [(4, 128, 32, 2, 1, True, True, True), (1, 64, 16, 1, 2, True, False, False),
                          (3, 64, 16, 2, 3, False, True, False), (4, 64, 32, 1, 1, False, False, True)])
def test_decode_variants_match_reference(G, D, block_c, nsub, bpp, early, local_first, hoist_v, gen):
    """Local-slot programs first or last, work before the dependency wait, V requested with K: same answer."""
    args = _case(2, 2, G, D, 83, 5, 37, gen)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(*args)
    o, lse, kept = K.squeezed_decode_triton(*args, local_splits=2, block_c=block_c, block_n=16, sub_splits=nsub,
                                            blocks_per_program=bpp, early=early, local_first=local_first,
                                            hoist_v=hoist_v)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    assert torch.equal(kept, kept_r) and (kept < args[1].shape[1]).all()
