"""Triton kernels of the listed Squeezed decode (imported lazily: this module needs triton). Reference:
reference.squeezed_decode_reference; wrapper and contract: listed.squeezed_decode_listed_triton.

The block decode (`_triton_kernels._squeezed_decode_kernel`) gives each program a fixed range of clusters, so a
program's work is the kept rows of its range: binomial, and the step waits for the few ranges that keep many.
Here the kept clusters are first listed, then dealt out in turn, so every program gets the same number of them:

  `_select_list_kernel`   grid (B*Hkv, NS): chunk j of clusters [j*BLOCK_S, (j+1)*BLOCK_S) of one (sequence, KV
                          head) (cluster C is the observation window, always kept): log Z from the chunk
                          logsumexps, the keep decision of every cluster, and the kept non-empty ones written in
                          order as (first row, size) to Start / Size [B*Hkv, NS, BLOCK_S]; Count [B*Hkv, NS] =
                          kept clusters of the chunk, KeptRows [B*Hkv, NS] = their rows.
  `_listed_decode_kernel` grid (B*Hkv, NLOC + P): programs s < NLOC attend the local (user + generated) slots
                          (before the dependency wait, as they need nothing from the selection); program NLOC + s
                          takes the kept clusters of global index i = s, s + P, s + 2P, .. (the chunk of each from
                          the counts' prefix sums) and runs flash-decoding over their rows packed in full BLOCK_N
                          tiles: position p of the concatenated clusters is row start_e + p - excl_e for the entry
                          e with excl_e <= p < excl_e + size_e (computed in registers).
Partials (normalised out, lse) are merged by the shared split-merge kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.kernels._triton_decode import _group_query, _pdl_prologue, _store_partial
from lmsqueeze.methods.squeezed._triton_kernels import (
    _attend_local,
    _globaltimer,
    _kv_heads,
    _log_z,
    _softmax_rows,
)


@triton.jit
def _select_list_kernel(
    Scores, ChunkLse, LogTau, Offsets, Start, Size, Count, KeptRows,
    stride_sb, stride_sh, stride_eb, stride_eh, stride_oh,
    C, NCH,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CH: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    j = tl.program_id(1)
    b, hkv, offs_g, g_mask, heads = _kv_heads(HKV, G, BLOCK_G)
    cids = j * BLOCK_S + tl.arange(0, BLOCK_S)
    real = cids < C
    inr = cids < C + 1
    lo = tl.load(Offsets + hkv * stride_oh + cids, mask=inr, other=0)
    hi = tl.load(Offsets + hkv * stride_oh + cids + 1, mask=inr, other=0)
    z = _log_z(ChunkLse, b * stride_eb + heads * stride_eh, offs_g, g_mask, NCH, BLOCK_CH)
    s = tl.load(Scores + b * stride_sb + heads[:, None] * stride_sh + cids[None, :],
                mask=g_mask[:, None] & real[None, :], other=float("-inf"))
    a = tl.max(s - z[:, None], 0)
    keep = ((a > tl.load(LogTau + hkv)) | (cids == C)) & inr & (hi > lo)
    ki = keep.to(tl.int32)
    dst = (pid_bh * tl.num_programs(1) + j).to(tl.int64) * BLOCK_S + tl.cumsum(ki, 0) - 1
    tl.store(Start + dst, lo, mask=keep)
    tl.store(Size + dst, hi - lo, mask=keep)
    tl.store(Count + pid_bh * tl.num_programs(1) + j, tl.sum(ki, 0))
    tl.store(KeptRows + pid_bh * tl.num_programs(1) + j, tl.sum(tl.where(keep, hi - lo, 0), 0))


@triton.jit
def _listed_decode_kernel(
    Q, K, V, Start, Size, Count, LK, LV, Lengths, Starts, MidO, MidLse,
    stride_qb, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    NS, P, NLOC, l_max, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_NS: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE_DOT: tl.constexpr, PDL: tl.constexpr = False,
    HOIST_V: tl.constexpr = False, Trace=None, TRACE: tl.constexpr = False,
):
    # TRACE: Trace [splits * B * Hkv, 6] int64 gets per program (start, after the dependency wait, counts read,
    # first entries read, end: %globaltimer ns; rows attended), program (split, pid_bh) at row split * B*Hkv + pid_bh
    # (profiling only; CUDA).
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    tp = Trace
    if TRACE:
        tp = Trace + (split * tl.num_programs(0) + pid_bh).to(tl.int64) * 6
        tl.store(tp, _globaltimer(split))
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_n = tl.arange(0, BLOCK_N)
    _offs_g, heads, g_mask, offs_d, d_mask, q, m_i, l_i, acc = _group_query(Q, b, hkv, stride_qb, stride_qh, G, D,
                                                                             BLOCK_G, BLOCK_D)
    if split < NLOC:
        m_i, l_i, acc = _attend_local(q, LK, LV, Lengths, Starts, b, hkv, split, NLOC, l_max, offs_n, offs_d,
                                      d_mask, stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
                                      scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, HAS_STARTS, IEEE_DOT, HOIST_V)
        _pdl_prologue(PDL)
        if TRACE:
            tl.store(tp + 1, _globaltimer(split))
    else:
        _pdl_prologue(PDL)
        if TRACE:
            tl.store(tp + 1, _globaltimer(split))
        m_i, l_i, acc = _attend_listed(q, K + hkv.to(tl.int64) * stride_kh, V + hkv.to(tl.int64) * stride_vh, Start,
                                       Size, Count, pid_bh * NS, split - NLOC, NS, P, offs_n, offs_d, d_mask,
                                       stride_kn, stride_vn, scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, BLOCK_E,
                                       BLOCK_S, BLOCK_NS, IEEE_DOT, HOIST_V, tp, TRACE)
    _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, split, NLOC + P, g_mask, d_mask, offs_d, HKV, G, D)
    if TRACE:
        tl.store(tp + 4, _globaltimer(split))


@triton.jit
def _attend_listed(q, k_base, v_base, Start, Size, Count, cnt_base, sp, NS, P, offs_n, offs_d, d_mask, stride_kn,
                   stride_vn, scale_log2, m_i, l_i, acc, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_NS: tl.constexpr,
                   IEEE_DOT: tl.constexpr, HOIST_V: tl.constexpr, tp=None, TRACE: tl.constexpr = False):
    """Program sp of P over the listed kept clusters of one (sequence, KV head): NS lists, list j's Count[cnt_base
    + j] entries at Start / Size [(cnt_base + j) * BLOCK_S + i]; the program takes the kept clusters of global
    index sp, sp + P, .. and runs the online softmax (m_i, l_i, acc) over their rows in full BLOCK_N tiles.
    k_base / v_base: this KV head's keys / values. TRACE: %globaltimer after the counts and after the first entries
    are read, and the rows attended, to tp[2], tp[3], tp[5] (profiling)."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_j = tl.arange(0, BLOCK_NS)
    n_j = tl.load(Count + cnt_base + offs_j, mask=offs_j < NS, other=0)
    incl = tl.cumsum(n_j, 0)
    n = tl.sum(n_j, 0)
    used = tl.where(n > sp, (n - sp + P - 1) // P, 0)               # clusters dealt to this program
    if TRACE:
        tl.store(tp + 2, _globaltimer(n))
        tl.store(tp + 3, _globaltimer(n))
        tl.store(tp + 5, 0)
    for e0 in range(0, used, BLOCK_E):
        i = sp + (e0 + offs_e) * P                                    # their global kept indices
        past = incl[None, :] <= i[:, None]                           # [BLOCK_E, BLOCK_NS]: lists before i's
        jj = tl.sum(past.to(tl.int32), 1)
        local = i - tl.sum(tl.where(past, n_j[None, :], 0), 1)
        slot = (cnt_base + jj).to(tl.int64) * BLOCK_S + local
        e_mask = e0 + offs_e < used
        st = tl.load(Start + slot, mask=e_mask, other=0)
        sz = tl.load(Size + slot, mask=e_mask, other=0)
        ends = tl.cumsum(sz, 0)
        excl = ends - sz
        delta = st - excl
        total = tl.sum(sz, 0)
        if TRACE:
            if e0 == 0:
                tl.store(tp + 3, _globaltimer(total))
            tl.atomic_add(tp + 5, total.to(tl.int64), sem="relaxed")
        for t0 in range(0, total, BLOCK_N):
            p = t0 + offs_n
            p_mask = p < total
            hit = (excl[None, :] <= p[:, None]) & (p[:, None] < ends[None, :])
            rows = p + tl.sum(tl.where(hit, delta[None, :], 0), 1)   # int32: N * D < 2**31
            m_i, l_i, acc = _softmax_rows(q, k_base, v_base, rows, p_mask, stride_kn, stride_vn, offs_d, d_mask,
                                          scale_log2, m_i, l_i, acc, D, BLOCK_D, IEEE_DOT, HOIST_V)
    return m_i, l_i, acc
