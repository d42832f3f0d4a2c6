"""Triton kernels of the balanced Squeezed decode (imported lazily: this module needs triton).

The one-pass kernel (`_triton_kernels._squeezed_decode_kernel`) gives each program a fixed range of clusters. A
query keeps clusters unevenly over those ranges, so a few programs read many tiles one after another while the
rest idle: at 128K the longest program ran 27 us after the scores were ready, the median one 7 us
(benchmarks/results/squeezed_decode_trace_h100.json, per-program %globaltimer traces). Here a tiny planning
kernel counts the kept rows of every block of clusters, and the attention programs split the kept rows of their
head into equal shares:

  `_block_counts_kernel`    grid (B*Hkv, NSP): program j decides clusters [j*BLOCK_C, (j+1)*BLOCK_C) (log Z from
                            the chunk logsumexps, threshold, the observation window always) and writes their kept
                            row count Cnt[b*Hkv + h, j]. Nothing else: no row lists, no atomics.
  `_balanced_decode_kernel` grid (B*Hkv, NLOC + NP): programs s < NLOC attend the local (user + generated) slots,
                            before the dependency wait under PDL (they do not read the planning kernel's output).
                            The kept rows of each block are cut into BLOCK_N-row tiles that never cross a block
                            (tile counts scanned in registers); program NLOC + p takes tiles
                            [p*share, (p+1)*share) of its head, share = ceil(tiles / NP), in one flat loop: per
                            tile it re-derives its block's keep decision (a few L2 reads) and maps the tile's kept
                            positions to rows in registers (`_kept_rows`), then runs flash-decoding over them.
                            (A first version walked blocks in a `while` loop around the tile loop: 2x slower per
                            program, squeezed_decode_trace_h100_v2.json.) Partials go to the shared split merge.
On the H100 this evens out the programs but is slower than the one-pass kernel in every config measured (each tile
waits for its block's keep decision, a dependent L2 round trip): kernels.DECODE_IMPL stays "fused".
Both are deterministic and graph-capturable (grids from shapes only, fixed-size scratch). References:
reference.block_counts_reference (the counts) and squeezed_decode_reference (the output).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.kernels._triton_decode import _pdl_prologue
from lmsqueeze.methods.squeezed._triton_kernels import (
    _attend_local,
    _globaltimer,
    _kept_rows,
    _log_z,
    _softmax_tile,
)


@triton.jit
def _block_loads(Offsets, Scores, heads, g_mask, blk, stride_sh, C, BLOCK_C: tl.constexpr):
    """What the keep decision of block `blk` reads: its clusters' scores [BLOCK_G, BLOCK_C] (-inf where absent),
    sizes [BLOCK_C] and first row. Offsets: this head's [C + 2] row offsets; Scores: this sequence's scores."""
    cids = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    real = cids < C
    inr = cids < C + 1
    s = tl.load(Scores + heads[:, None] * stride_sh + cids[None, :], mask=g_mask[:, None] & real[None, :],
                other=float("-inf"))
    size = tl.load(Offsets + cids + 1, mask=inr, other=0) - tl.load(Offsets + cids, mask=inr, other=0)
    return s, size, tl.load(Offsets + tl.minimum(blk * BLOCK_C, C + 1))       # (a block past the last: unused)


@triton.jit
def _block_keep(s, size, blk, z, log_tau, C, BLOCK_C: tl.constexpr):
    """Kept and unkept sizes [BLOCK_C] of block `blk` from `_block_loads` (cluster C: the observation window,
    always kept; clusters past C have size 0)."""
    cids = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = (tl.max(s - z[:, None], 0) > log_tau) | (cids == C)
    ks = tl.where(keep, size, 0)
    return ks, size - ks


@triton.jit
def _block_counts_kernel(
    Offsets, Scores, ChunkLse, LogTau, Cnt,
    stride_oh, stride_sb, stride_sh, stride_eb, stride_eh,
    C, NCH, NSP,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CH: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    heads = hkv * G + offs_g
    z = _log_z(ChunkLse, b * stride_eb + heads * stride_eh, offs_g, g_mask, NCH, BLOCK_CH)
    s, size, _ = _block_loads(Offsets + hkv * stride_oh, Scores + b * stride_sb, heads, g_mask, blk, stride_sh, C,
                              BLOCK_C)
    ks, _ = _block_keep(s, size, blk, z, tl.load(LogTau + hkv), C, BLOCK_C)
    tl.store(Cnt + pid_bh * NSP + blk, tl.sum(ks, 0))


@triton.jit
def _balanced_decode_kernel(
    Q, K, V, Offsets, Scores, ChunkLse, LogTau, Cnt, LK, LV, Lengths, Starts, MidO, MidLse,
    stride_qb, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh,
    stride_sb, stride_sh, stride_eb, stride_eh,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    C, NCH, NSP, NP, NLOC, l_max, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CH: tl.constexpr, BLOCK_NSP: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE_DOT: tl.constexpr,
    PDL: tl.constexpr = False, HOIST_V: tl.constexpr = False, Trace=None, TRACE: tl.constexpr = False,
):
    if TRACE:
        t_start = _globaltimer(NCH)
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
    mine = 0                                                              # tiles (trace)
    if split >= NLOC:
        p = split - NLOC
        log_tau = tl.load(LogTau + hkv)
        o_base = Offsets + hkv * stride_oh
        k_base = K + hkv.to(tl.int64) * stride_kh
        v_base = V + hkv.to(tl.int64) * stride_vh
        _pdl_prologue(PDL)                                                # the counts and scores are ready
        if TRACE:
            t_wait = _globaltimer(NCH)
        offs_j = tl.arange(0, BLOCK_NSP)
        cnt = tl.load(Cnt + pid_bh * NSP + offs_j, mask=offs_j < NSP, other=0)
        nt = (cnt + BLOCK_N - 1) // BLOCK_N                               # tiles of each block's kept rows
        tends = tl.cumsum(nt, 0)                                          # tiles up to and including block j
        ntiles = tl.sum(nt, 0)
        z = _log_z(ChunkLse, b * stride_eb + heads * stride_eh, offs_g, g_mask, NCH, BLOCK_CH)
        share = tl.cdiv(ntiles, NP)
        i_lo = p * share
        i_hi = tl.minimum(i_lo + share, ntiles)
        mine = tl.maximum(i_hi - i_lo, 0)
        # tile i's block and first kept position; its block's scores and sizes are requested one tile ahead
        # (software pipelining: they arrive while the previous tile's keys and values load)
        j = tl.sum((tends <= i_lo).to(tl.int32), 0)
        k0 = (i_lo - tl.sum(tl.where(offs_j == j, tends - nt, 0), 0)) * BLOCK_N
        s_n, size_n, base_n = _block_loads(o_base, Scores + b * stride_sb, heads, g_mask, j, stride_sh, C, BLOCK_C)
        for i in range(i_lo, i_hi):                                       # block-aligned tiles of kept rows
            ks, us = _block_keep(s_n, size_n, j, z, log_tau, C, BLOCK_C)
            rows = _kept_rows(base_n, k0 + offs_n, tl.cumsum(ks, 0), us)
            p_mask = k0 + offs_n < tl.sum(ks, 0)
            j = tl.sum((tends <= i + 1).to(tl.int32), 0)                  # the next tile (past the last: unused)
            k0 = (i + 1 - tl.sum(tl.where(offs_j == j, tends - nt, 0), 0)) * BLOCK_N
            s_n, size_n, base_n = _block_loads(o_base, Scores + b * stride_sb, heads, g_mask, j, stride_sh, C,
                                               BLOCK_C)
            if BLOCK_D == D:
                kv_mask = p_mask[:, None]
            else:
                kv_mask = p_mask[:, None] & d_mask[None, :]
            m_i, l_i, acc = _softmax_tile(q, k_base + rows[:, None] * stride_kn + offs_d[None, :],
                                          v_base + rows[:, None] * stride_vn + offs_d[None, :], kv_mask,
                                          p_mask[None, :], scale_log2, m_i, l_i, acc, IEEE_DOT, HOIST_V)
    else:
        m_i, l_i, acc = _attend_local(q, LK, LV, Lengths, Starts, b, hkv, split, NLOC, l_max, offs_n, offs_d,
                                      d_mask, stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
                                      scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, HAS_STARTS, IEEE_DOT, HOIST_V)
        _pdl_prologue(PDL)
        if TRACE:
            t_wait = _globaltimer(NCH)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (b * HKV * G + heads).to(tl.int64) * (NP + NLOC) + split
    tl.store(MidO + row[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + row, lse, mask=g_mask)
    if TRACE:
        t_end = _globaltimer(NCH)
        tp = Trace + (split * tl.num_programs(0) + pid_bh).to(tl.int64) * 4
        tl.store(tp, t_start)
        tl.store(tp + 1, t_wait)
        tl.store(tp + 2, t_end)
        tl.store(tp + 3, mine.to(tl.int64))
