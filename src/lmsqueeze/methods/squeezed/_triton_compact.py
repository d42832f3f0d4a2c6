"""Triton kernels of the compacted Squeezed decode (imported lazily: this module needs triton).

The one-pass kernel (`_triton_kernels._squeezed_decode_kernel`) gives each program a fixed range of clusters:
with a calibrated threshold the kept keys are spread unevenly over those ranges (a head with peaked attention
keeps a few clusters, a flat one many), so a few programs do most of the work while the rest idle. Here the
selection and the attention are split so that every attention program gets the same number of kept rows:

  `_select_rows_kernel`     grid (B*Hkv, NSP): program j decides clusters [j*BLOCK_C, (j+1)*BLOCK_C) (log Z from
                            the chunk logsumexps, threshold, the observation window always) and writes the row
                            ids of their kept keys, packed, at the start of the block's own row range
                            Rows[b, h, offsets[j*BLOCK_C] + p], plus its kept count BlockCnt[b*Hkv + h, j].
                            Deterministic, no atomics, nothing to zero: fixed-size buffers, graph-capturable.
  `_compact_decode_kernel`  grid (B*Hkv, NS + NLOC): the kept rows of a head, numbered 0..total-1 in block order
                            (an exclusive scan of the block counts, in registers), are cut into NS equal ranges;
                            program s < NS gathers its range's row ids, then K/V rows, and runs flash-decoding;
                            programs s >= NS attend the local (user + generated) slots. Partials go to the shared
                            split-merge kernel (kernels/_triton_decode).
Reference: reference.select_rows_reference (the packed rows) and squeezed_decode_reference (the output).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.methods.squeezed._triton_kernels import _attend_local, _log_z, _softmax_tile


@triton.jit
def _select_rows_kernel(
    Offsets, Scores, ChunkLse, LogTau, Rows, BlockCnt,
    stride_oh, stride_sb, stride_sh, stride_eb, stride_eh, stride_rb, stride_rh,
    C, NCH, NSP,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    heads = hkv * G + offs_g
    z = _log_z(ChunkLse, b * stride_eb + heads * stride_eh, offs_g, g_mask, NCH, BLOCK_CH)
    cids = blk * BLOCK_C + offs_c
    real = cids < C
    inr = cids < C + 1                                                   # cluster C: the observation window
    s = tl.load(Scores + b * stride_sb + heads[:, None] * stride_sh + cids[None, :],
                mask=g_mask[:, None] & real[None, :], other=float("-inf"))
    a = tl.max(s - z[:, None], 0)
    keep = ((a > tl.load(LogTau + hkv)) | (cids == C)) & inr
    o_base = Offsets + hkv * stride_oh
    lo = tl.load(o_base + cids, mask=inr, other=0)
    hi = tl.load(o_base + cids + 1, mask=inr, other=0)
    size = hi - lo
    ks = tl.where(keep, size, 0)
    us = size - ks
    ends = tl.cumsum(ks, 0)
    total = tl.sum(ks, 0)
    base = tl.load(o_base + blk * BLOCK_C)
    r_base = Rows + b.to(tl.int64) * stride_rb + hkv.to(tl.int64) * stride_rh + base
    for t0 in range(0, total, BLOCK_N):
        p = t0 + offs_n
        shift = tl.sum(tl.where(ends[None, :] <= p[:, None], us[None, :], 0), 1)
        tl.store(r_base + p, base + p + shift, mask=p < total)
    tl.store(BlockCnt + pid_bh * NSP + blk, total)


@triton.jit
def _compact_decode_kernel(
    Q, K, V, Offsets, Rows, BlockCnt, LK, LV, Lengths, Starts, MidO, MidLse,
    stride_qb, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_rb, stride_rh,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    NSP, NS, NLOC, l_max, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_NSP: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = hkv * G + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if split < NS:
        offs_b = tl.arange(0, BLOCK_NSP)
        cnt = tl.load(BlockCnt + pid_bh * NSP + offs_b, mask=offs_b < NSP, other=0)
        ends = tl.cumsum(cnt, 0)
        total = tl.sum(cnt, 0)
        per = tl.cdiv(tl.cdiv(total, NS), BLOCK_N) * BLOCK_N
        v_lo = split * per
        v_hi = tl.minimum(v_lo + per, total)
        o_base = Offsets + hkv * stride_oh
        r_base = Rows + b.to(tl.int64) * stride_rb + hkv.to(tl.int64) * stride_rh
        k_base = K + hkv.to(tl.int64) * stride_kh
        v_base = V + hkv.to(tl.int64) * stride_vh
        for t0 in range(v_lo, v_hi, BLOCK_N):
            v = t0 + offs_n
            v_mask = v < v_hi
            before = ends[None, :] <= v[:, None]                         # blocks wholly before kept row v
            blk = tl.sum(before.to(tl.int32), 1)
            start_v = tl.sum(tl.where(before, cnt[None, :], 0), 1)
            first = tl.load(o_base + blk * BLOCK_C, mask=v_mask, other=0)
            rows = tl.load(r_base + first + v - start_v, mask=v_mask, other=0)
            if BLOCK_D == D:
                kv_mask = v_mask[:, None]
            else:
                kv_mask = v_mask[:, None] & d_mask[None, :]
            m_i, l_i, acc = _softmax_tile(q, k_base + rows[:, None] * stride_kn + offs_d[None, :],
                                          v_base + rows[:, None] * stride_vn + offs_d[None, :], kv_mask,
                                          v_mask[None, :], scale_log2, m_i, l_i, acc, IEEE_DOT)
    else:
        m_i, l_i, acc = _attend_local(q, LK, LV, Lengths, Starts, b, hkv, split - NS, NLOC, l_max, offs_n, offs_d,
                                      d_mask, stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
                                      scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, HAS_STARTS, IEEE_DOT)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    num_splits = NS + NLOC
    row = (b * HKV * G + heads).to(tl.int64) * num_splits + split
    tl.store(MidO + row[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + row, lse, mask=g_mask)
