"""Triton kernels of the 'chunk' prefill selection (imported lazily). Reference: lookup.budget_keep followed by
lookup.rows_from_clusters (kernels.chunk_rows_triton documents the contract).

  `_budget_keep_kernel`  grid (B*Hkv,): the clusters of one (sequence, KV head), all in registers: each
                         cluster's weight is the max over the KV head's query heads of psum; eligible clusters
                         (non-empty) are kept in order of weight (ties: lower index first) until their keys reach
                         the budget, the crossing cluster included. No sort: the crossing weight theta is found bit by
                         bit, most significant first, over the weights' bit patterns (non-negative floats order
                         like their int32 bits): theta = max t with (keys of clusters of weight >= t) >= budget,
                         31 masked sums in int32 (as an int64 bisection: 69.8 us, now 32.7 us, H100,
                         squeezed_prefill_profile_h100_v2/_v3.json); clusters
                         above theta are kept, those at theta in index order while the keys before them stay
                         under the budget. Writes the kept keys of each cluster (EXACT: the crossing one only
                         those that fill the budget), the kept keys before it (index order, observation window C
                         last and always kept) and the count.
  `_rows_from_keep_kernel` grid (ceil(N/BLOCK), B*Hkv): row r of cluster c (keys sorted by cluster) goes to
                         position before[c] + r - offsets[c] of the row list when r - offsets[c] < kept[c].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _budget_keep_kernel(
    Psum, Offsets, KSz, Before, Counts,
    stride_pb, stride_ph, stride_oh, stride_kb, stride_kh,
    C, budget,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr, EXACT: tl.constexpr = False,
):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    c = tl.arange(0, BLOCK_C)
    cm = c < C                                                         # clusters (the window C excluded)
    w = tl.zeros([BLOCK_C], tl.float32)
    for g in tl.static_range(G):
        p = tl.load(Psum + b.to(tl.int64) * stride_pb + (h * G + g) * stride_ph + c, mask=cm, other=0.0)
        w = tl.maximum(w, p)
    o_lo = tl.load(Offsets + h * stride_oh + c, mask=c <= C, other=0)
    o_hi = tl.load(Offsets + h * stride_oh + c + 1, mask=c <= C, other=0)
    sz = o_hi - o_lo                                                   # keys per cluster (window at C)
    elig = cm & (sz > 0)
    key = tl.where(elig, w.to(tl.int32, bitcast=True), -1)             # w >= 0: bits order like the floats
    szm = tl.where(elig, sz, 0)
    total = tl.sum(szm, 0)
    theta = tl.zeros([], tl.int32)                                     # A(0) = total; A(t) falls with t
    for i in tl.static_range(31):                                      # max t with A(t) >= budget, MSB first
        cand = theta | (1 << (30 - i))
        a = tl.sum(tl.where(key >= cand, szm, 0), 0)
        theta = tl.where(a >= budget, cand, theta)
    theta = tl.where(total >= budget, theta, -1)
    gt = elig & (key > theta)
    s_gt = tl.sum(tl.where(gt, sz, 0), 0)
    tsz = tl.where(elig & (key == theta), sz, 0)
    tie_before = tl.cumsum(tsz, 0) - tsz
    tie_keep = (tsz > 0) & (s_gt + tie_before < budget)
    keep = gt | tie_keep | (c == C)
    ks = tl.where(keep, sz, 0)
    if EXACT:   # the crossing cluster gives only the keys that fill the budget
        ks = tl.where(tie_keep, tl.minimum(sz, budget - s_gt - tie_before), ks)
    before = tl.cumsum(ks, 0) - ks
    base = b.to(tl.int64) * stride_kb + h * stride_kh
    tl.store(KSz + base + c, ks, mask=c <= C)
    tl.store(Before + base + c, before, mask=c <= C)
    tl.store(Counts + pid, tl.sum(ks, 0))


@triton.jit
def _rows_from_keep_kernel(
    KSz, Before, Offsets, RowCluster, Idx,
    stride_kb, stride_kh, stride_oh, stride_rh, stride_ib, stride_ih,
    N,
    HKV: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    r = pid_r * BLOCK + tl.arange(0, BLOCK)
    rm = r < N
    rc = tl.load(RowCluster + h.to(tl.int64) * stride_rh + r, mask=rm, other=0)
    base = b.to(tl.int64) * stride_kb + h * stride_kh
    rank = r - tl.load(Offsets + h * stride_oh + rc, mask=rm, other=0)         # row within its cluster
    pos = tl.load(Before + base + rc, mask=rm, other=0) + rank
    tl.store(Idx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + pos, r,
             mask=rm & (rank < tl.load(KSz + base + rc, mask=rm, other=0)))
