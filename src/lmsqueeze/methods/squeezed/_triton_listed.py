"""Triton kernels of the listed Squeezed decode (imported lazily: this module needs triton). Reference:
reference.squeezed_decode_reference; wrapper and contract: listed.squeezed_decode_listed_triton.

The block decode (`_triton_kernels._squeezed_decode_kernel`) gives each program a fixed range of clusters, so a
program's work is the kept rows of its range: binomial, and the step waits for the few ranges that keep many.
Here the kept clusters are first listed, then dealt out in turn, so every program gets the same number of them:

  `_select_list_kernel`   grid (B*Hkv,): one (sequence, KV head): log Z from the chunk logsumexps, the keep
                          decision of every cluster (BLOCK_S at a time; cluster C is the observation window,
                          always kept), and the i-th kept non-empty cluster written as (first row, size) to slot
                          i // P of program i % P: Start / Size [B*Hkv, P, KPC]; Count [B*Hkv] = kept clusters,
                          KeptRows [B*Hkv] = their rows.
  `_listed_decode_kernel` grid (B*Hkv, NLOC + P): programs s < NLOC attend the local (user + generated) slots
                          (before the dependency wait, as they need nothing from the selection); program NLOC + s
                          requests its first BLOCK_E slots with the count (no second round trip in the common
                          case) and runs flash-decoding over their rows packed in full BLOCK_N tiles: position p
                          of the concatenated clusters is row start_e + p - excl_e for the entry e with
                          excl_e <= p < excl_e + size_e (computed in registers).
Partials (normalised out, lse) are merged by the shared split-merge kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.kernels._triton_decode import _pdl_prologue
from lmsqueeze.methods.squeezed._triton_kernels import _attend_local, _log_z, _softmax_tile


@triton.jit
def _select_list_kernel(
    Scores, ChunkLse, LogTau, Offsets, Start, Size, Count, KeptRows,
    stride_sb, stride_sh, stride_eb, stride_eh, stride_oh,
    C, NCH, P, KPC,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CH: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    heads = hkv * G + offs_g
    z = _log_z(ChunkLse, b * stride_eb + heads * stride_eh, offs_g, g_mask, NCH, BLOCK_CH)
    log_tau = tl.load(LogTau + hkv)
    n = 0
    rows = 0
    for c0 in range(0, C + 1, BLOCK_S):
        cids = c0 + tl.arange(0, BLOCK_S)
        real = cids < C
        inr = cids < C + 1
        lo = tl.load(Offsets + hkv * stride_oh + cids, mask=inr, other=0)
        hi = tl.load(Offsets + hkv * stride_oh + cids + 1, mask=inr, other=0)
        s = tl.load(Scores + b * stride_sb + heads[:, None] * stride_sh + cids[None, :],
                    mask=g_mask[:, None] & real[None, :], other=float("-inf"))
        a = tl.max(s - z[:, None], 0)
        keep = ((a > log_tau) | (cids == C)) & inr & (hi > lo)
        ki = keep.to(tl.int32)
        i = n + tl.cumsum(ki, 0) - 1                                     # index among the kept clusters
        dst = (pid_bh * P + i % P).to(tl.int64) * KPC + i // P
        tl.store(Start + dst, lo, mask=keep)
        tl.store(Size + dst, hi - lo, mask=keep)
        n += tl.sum(ki, 0)
        rows += tl.sum(tl.where(keep, hi - lo, 0), 0)
    tl.store(Count + pid_bh, n)
    tl.store(KeptRows + pid_bh, rows)


@triton.jit
def _listed_decode_kernel(
    Q, K, V, Start, Size, Count, LK, LV, Lengths, Starts, MidO, MidLse,
    stride_qb, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    P, KPC, NLOC, l_max, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_STARTS: tl.constexpr, IEEE_DOT: tl.constexpr, PDL: tl.constexpr = False,
    HOIST_V: tl.constexpr = False,
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
    if split < NLOC:
        m_i, l_i, acc = _attend_local(q, LK, LV, Lengths, Starts, b, hkv, split, NLOC, l_max, offs_n, offs_d,
                                      d_mask, stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
                                      scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, HAS_STARTS, IEEE_DOT, HOIST_V)
        _pdl_prologue(PDL)
    else:
        sp = split - NLOC
        k_base = K + hkv.to(tl.int64) * stride_kh
        v_base = V + hkv.to(tl.int64) * stride_vh
        offs_e = tl.arange(0, BLOCK_E)
        ebase = (pid_bh * P + sp).to(tl.int64) * KPC
        _pdl_prologue(PDL)
        n = tl.load(Count + pid_bh)
        # the first BLOCK_E slots are requested with the count (slots past the share hold stale data: masked after)
        st = tl.load(Start + ebase + offs_e, mask=offs_e < KPC, other=0)
        sz = tl.load(Size + ebase + offs_e, mask=offs_e < KPC, other=0)
        used = tl.where(n > sp, (n - sp + P - 1) // P, 0)               # clusters dealt to this program
        for e0 in range(0, used, BLOCK_E):
            if e0 > 0:
                st = tl.load(Start + ebase + e0 + offs_e, mask=e0 + offs_e < used, other=0)
                sz = tl.load(Size + ebase + e0 + offs_e, mask=e0 + offs_e < used, other=0)
            sz = tl.where(e0 + offs_e < used, sz, 0)
            ends = tl.cumsum(sz, 0)
            excl = ends - sz
            delta = st - excl
            total = tl.sum(sz, 0)
            for t0 in range(0, total, BLOCK_N):
                p = t0 + offs_n
                p_mask = p < total
                hit = (excl[None, :] <= p[:, None]) & (p[:, None] < ends[None, :])
                rows = p + tl.sum(tl.where(hit, delta[None, :], 0), 1)   # int32: N * D < 2**31
                if BLOCK_D == D:
                    kv_mask = p_mask[:, None]
                else:
                    kv_mask = p_mask[:, None] & d_mask[None, :]
                m_i, l_i, acc = _softmax_tile(q, k_base + rows[:, None] * stride_kn + offs_d[None, :],
                                              v_base + rows[:, None] * stride_vn + offs_d[None, :], kv_mask,
                                              p_mask[None, :], scale_log2, m_i, l_i, acc, IEEE_DOT, HOIST_V)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    num_splits = NLOC + P
    row = (b * HKV * G + heads).to(tl.int64) * num_splits + split
    tl.store(MidO + row[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + row, lse, mask=g_mask)
