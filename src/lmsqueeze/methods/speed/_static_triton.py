"""Triton kernels of the static (CUDA-graph) looped decode step; imported lazily (needs triton).

Plain-PyTorch references of the same functions live in `static_kernels.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rope_write_kernel(QKV, Cos, Sin, RPos, WPos, KC, VC, QO,
                      sqkv, scs, skcb, skch, skcs, svcb, svch, svcs,
                      HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, h): h < HQ rotates query head h of row b into QO; else rotates key head h - HQ of row b and
    writes it and the matching value head into the caches at slot WPos[b]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    rp = tl.load(RPos + b)
    c1 = tl.load(Cos + rp * scs + offs, mask=m, other=0.0)
    c2 = tl.load(Cos + rp * scs + HALF + offs, mask=m, other=0.0)
    s1 = tl.load(Sin + rp * scs + offs, mask=m, other=0.0)
    s2 = tl.load(Sin + rp * scs + HALF + offs, mask=m, other=0.0)
    base = QKV + b.to(tl.int64) * sqkv + h * (2 * HALF)
    x1 = tl.load(base + offs, mask=m, other=0.0)
    x2 = tl.load(base + HALF + offs, mask=m, other=0.0)
    # as apply_rope: x * cos + rotate_half(x) * sin, each product rounded to the input dtype
    o1 = (x1 * c1).to(tl.float32) - (x2 * s1).to(tl.float32)
    o2 = (x2 * c2).to(tl.float32) + (x1 * s2).to(tl.float32)
    if h < HQ:
        out = QO + (b * HQ + h).to(tl.int64) * (2 * HALF)
        tl.store(out + offs, o1.to(x1.dtype), mask=m)
        tl.store(out + HALF + offs, o2.to(x1.dtype), mask=m)
    else:
        hk = h - HQ
        slot = tl.load(WPos + b)
        kc = KC + b.to(tl.int64) * skcb + hk.to(tl.int64) * skch + slot * skcs
        tl.store(kc + offs, o1.to(x1.dtype), mask=m)
        tl.store(kc + HALF + offs, o2.to(x1.dtype), mask=m)
        vb = QKV + b.to(tl.int64) * sqkv + (HQ + HKV + hk) * (2 * HALF)
        vc = VC + b.to(tl.int64) * svcb + hk.to(tl.int64) * svch + slot * svcs
        tl.store(vc + offs, tl.load(vb + offs, mask=m, other=0.0), mask=m)
        tl.store(vc + HALF + offs, tl.load(vb + HALF + offs, mask=m, other=0.0), mask=m)


@triton.jit
def pipeline_update_kernel(Pred, Tok, Pos, Valid, WPos, Lens, Hout, Hin, Emb, Out, Stats, LastPos,
                           d, dummy, sho, shi, semb,
                           R: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """One program: flush / commit / shift of the R pipeline slots (slot r = the token at pass r), then the
    next step's inputs. See `pipeline_update_reference` for the exact contract."""
    r = tl.arange(0, BR)
    inr = r < R
    pred = tl.load(Pred + r, mask=inr, other=0)
    tok = tl.load(Tok + r, mask=inr, other=0)
    pos = tl.load(Pos + r, mask=inr, other=0)
    valid = (tl.load(Valid + r, mask=inr, other=0) != 0) & inr
    last = tl.load(LastPos)
    # successor of slot r = the deepest valid slot above it in order, i.e. the largest valid j < r
    succ_tok = tl.full([BR], -1, tl.int64)
    has_succ = r < 0
    for j in tl.static_range(R):
        vj = tl.sum(tl.where((r == j) & valid, 1, 0), axis=0) > 0
        tj = tl.sum(tl.where(r == j, tok, 0), axis=0)
        upd = (r > j) & vj
        succ_tok = tl.where(upd, tj, succ_tok)
        has_succ = has_succ | upd
    mism = valid & has_succ & (pred != succ_tok)
    f = tl.max(tl.where(mism, r, -1), axis=0)
    keep = valid & (r >= f)
    s = tl.min(tl.where(keep, r, BR), axis=0)
    new_tok = tl.sum(tl.where(r == s, pred, 0), axis=0)
    new_pos = tl.sum(tl.where(r == s, pos, 0), axis=0) + 1
    new_valid = (s < R) & (new_pos <= last)
    fin = tl.sum(tl.where((r == R - 1) & valid, 1, 0), axis=0) > 0
    fin_pred = tl.sum(tl.where(r == R - 1, pred, 0), axis=0)
    fin_pos = tl.sum(tl.where(r == R - 1, pos, 0), axis=0)
    n_flushed = tl.sum(tl.where(valid & (r < f), 1, 0), axis=0)
    # shift: slot r + 1 <- slot r; slot 0 <- the new token
    tok_n = tl.where(r == 0, new_tok, 0).to(tl.int64)
    pos_n = tl.where(r == 0, new_pos, 0).to(tl.int64)
    val_n = (r == 0) & new_valid
    for j in tl.static_range(R - 1):
        tj = tl.sum(tl.where(r == j, tok, 0), axis=0)
        pj = tl.sum(tl.where(r == j, pos, 0), axis=0)
        kj = tl.sum(tl.where((r == j) & keep, 1, 0), axis=0) > 0
        tok_n = tl.where(r == j + 1, tj, tok_n)
        pos_n = tl.where(r == j + 1, pj, pos_n)
        val_n = tl.where(r == j + 1, kj, val_n)
    tl.debug_barrier()
    tl.store(Tok + r, tok_n, mask=inr)
    tl.store(Pos + r, pos_n, mask=inr)
    tl.store(Valid + r, val_n.to(tl.int32), mask=inr)
    tl.store(WPos + r, tl.where(val_n, pos_n, dummy), mask=inr)
    tl.store(Lens + r, tl.where(val_n, pos_n + 1, 1).to(tl.int32), mask=inr)
    tl.store(Out + fin_pos + 1, fin_pred, mask=fin)
    c0 = tl.load(Stats)
    c1 = tl.load(Stats + 1)
    c2 = tl.load(Stats + 2)
    tl.store(Stats, c0 + fin.to(tl.int64))
    tl.store(Stats + 1, c1 + (f >= 0).to(tl.int64))
    tl.store(Stats + 2, c2 + n_flushed.to(tl.int64))
    # next inputs: h_in[r + 1] = h_out[r], h_in[0] = embedding of the new token
    cols0 = tl.arange(0, BD)
    for d0 in range(0, d, BD):
        cols = d0 + cols0
        msk = inr[:, None] & (cols < d)[None, :]
        src = tl.where(r[:, None] == 0, Emb + new_tok * semb + cols[None, :],
                       Hout + (r[:, None] - 1).to(tl.int64) * sho + cols[None, :])
        x = tl.load(src, mask=msk, other=0.0)
        tl.store(Hin + r[:, None].to(tl.int64) * shi + cols[None, :], x, mask=msk)


@triton.jit
def greedy_update_kernel(Pred, Pos, WPos, Lens, Hin, Emb, Out, Stats, d, semb, BD: tl.constexpr):
    """One program: commit argmax Pred[0] as the token after position Pos[0], advance, embed it."""
    pred = tl.load(Pred)
    pos = tl.load(Pos) + 1
    tl.store(Out + pos, pred)
    tl.store(Pos, pos)
    tl.store(WPos, pos)
    tl.store(Lens, (pos + 1).to(tl.int32))
    tl.store(Stats, tl.load(Stats) + 1)
    cols0 = tl.arange(0, BD)
    for d0 in range(0, d, BD):
        cols = d0 + cols0
        m = cols < d
        tl.store(Hin + cols, tl.load(Emb + pred * semb + cols, mask=m, other=0.0), mask=m)
