"""Triton kernels of Squeezed Attention (imported lazily: this module needs triton). References: reference.py.

Decode (one query per sequence), all without host synchronisation (CUDA-graph capturable):
  `_centroid_scores_kernel`  grid (B*Hkv, ceil(C/BLOCK_C)): scores of the G query heads of one KV head
                             against a chunk of centroids, and that chunk's logsumexp(score + log size).
  `_fine_scores_kernel`      hierarchical second level, same grid over fine centroids: recomputes the coarse
                             decision of each fine centroid's parent and loads/multiplies only the rows of
                             surviving parents (masked loads read no memory; a chunk with none skips the dot).
  `_squeezed_decode_kernel`  grid (B*Hkv, NSPP*NSUB + NLOC): programs s < NSPP*NSUB own the blocks of clusters
                             [j*BLOCK_C, (j+1)*BLOCK_C), j = s // NSUB + k * NSPP for k < BPP (BPP = 1: one block,
                             NSPP = NSP blocks), each taking every NSUB-th tile of their kept rows
                             (NSUB > 1 splits a block that keeps many clusters over several programs)
                             (their rows are one contiguous range, keys being sorted by cluster): it combines the
                             chunk logsumexps into log Z, keeps clusters whose score beats the threshold, and
                             runs flash-decoding over the kept rows only, in full BLOCK_N tiles: the row of the
                             p-th kept key is base + p + (unkept keys of the clusters whose kept prefix ends at
                             or before p), computed in registers (no index buffer, no compaction pass).
                             Programs s >= NSP attend the local (user + generated) slots [starts, lengths).
                             Partials (out, lse) go to the shared split-merge kernel of kernels/_triton_decode,
                             or (FUSE_MERGE) the last program of each (sequence, KV head) to finish, found by an
                             atomic ticket it resets to 0, merges them itself (`_merge_group`): no merge launch.
Prefill (a chunk of T queries):
  `_prefill_scores_kernel`   grid (ceil(T/BLOCK_M), B*Hq): per query row log Z over all centroids (online), then
                             the per-cluster sum over rows of exp(score - log Z).
  `_indexed_attention_kernel` grid (ceil(T*G/BLOCK_M), B*Hkv): flash attention of the G*T query rows of one
                             KV head (GQA packed: each K/V tile read once per group) over the listed fixed rows
                             (gathered inside the kernel) and the causal local slots, one online softmax.
                             TOKEN_MASK: one row list per block of queries (the union of its tokens' clusters)
                             and a per-token cluster mask, so each query sees only its own token's keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.kernels._triton_decode import _group_query, _pdl_prologue, _store_partial

LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _add_pv(acc, alpha, pr, v, IEEE_DOT: tl.constexpr):
    """acc rescaled by alpha [BLOCK_M] plus the tile's probabilities pr [BLOCK_M, BLOCK_N] times its values v."""
    if IEEE_DOT:
        pv = tl.dot(pr, v, input_precision="ieee")
    else:
        pv = tl.dot(pr.to(v.dtype), v)
    return acc * alpha[:, None] + pv


@triton.jit
def _softmax_tile(q, k_ptrs, v_ptrs, kv_mask, vis, scale_log2, m_i, l_i, acc, IEEE_DOT: tl.constexpr,
                  HOIST_V: tl.constexpr = False):
    """One online-softmax step (log2 domain) over a tile of keys and values.

    q: [BLOCK_M, BLOCK_D]; k_ptrs, v_ptrs, kv_mask: [BLOCK_N, BLOCK_D]; vis: which (query, key) pairs count,
    [BLOCK_M or 1, BLOCK_N]; m_i, l_i: [BLOCK_M]; acc: [BLOCK_M, BLOCK_D] fp32. Returns (m_i, l_i, acc);
    a row with no visible key so far keeps m_i = -inf, l_i = 0, acc = 0. HOIST_V: the V tile is requested with
    the K tile (both in flight at once) instead of after the scores.
    """
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if HOIST_V:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    qk = _dot(q, tl.trans(k), IEEE_DOT)
    qk = tl.where(vis, qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    pr = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    if not HOIST_V:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    return m_new, l_i, _add_pv(acc, alpha, pr, v, IEEE_DOT)


@triton.jit
def _softmax_tile_full(q, k_ptrs, v_ptrs, scale_log2, m_i, l_i, acc, IEEE_DOT: tl.constexpr):
    """`_softmax_tile` for a tile whose every key exists and is visible to every query row: no masks, the scale
    applied to the row max and inside one FMA per score (exp2(qk * scale - m)). m_i must become finite here."""
    k = tl.load(k_ptrs)
    qk = _dot(q, tl.trans(k), IEEE_DOT)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    v = tl.load(v_ptrs)
    return m_new, l_i, _add_pv(acc, alpha, pr, v, IEEE_DOT)


@triton.jit
def _softmax_rows(q, k_base, v_base, rows, r_mask, stride_kn, stride_vn, offs_d, d_mask, scale_log2, m_i, l_i, acc,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr, HOIST_V: tl.constexpr = False):
    """`_softmax_tile` over the key / value rows `rows` [BLOCK_N] (r_mask: which exist) of k_base / v_base, every
    existing row visible to every query row; no head-dim mask when BLOCK_D == D (keeps the loads 16-byte
    vectorised)."""
    if BLOCK_D == D:
        kv_mask = r_mask[:, None]
    else:
        kv_mask = r_mask[:, None] & d_mask[None, :]
    return _softmax_tile(q, k_base + rows[:, None] * stride_kn + offs_d[None, :],
                         v_base + rows[:, None] * stride_vn + offs_d[None, :], kv_mask, r_mask[None, :],
                         scale_log2, m_i, l_i, acc, IEEE_DOT, HOIST_V)


@triton.jit
def _kept_rows(base, p, ends, us):
    """Rows of the kept positions p of a block: base + p + (unkept keys of the clusters whose kept prefix ends at
    or before p). ends: inclusive cumsum of the kept sizes, us: unkept sizes, both [BLOCK_C]."""
    return base + p + tl.sum(tl.where(ends[None, :] <= p[:, None], us[None, :], 0), 1)


@triton.jit
def _attend_local(q, LK, LV, Lengths, Starts, b, hkv, loc, NLOC, l_max, offs_n, offs_d, d_mask,
                  stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs, scale_log2, m_i, l_i, acc,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_STARTS: tl.constexpr,
                  IEEE_DOT: tl.constexpr, HOIST_V: tl.constexpr = False):
    """Split `loc` of NLOC over the dense local slots [start, length) of sequence b, KV head hkv (the user and
    generated tokens): online softmax into (m_i, l_i, acc), returned."""
    loc_hi = tl.minimum(tl.load(Lengths + b), l_max)
    loc_lo = loc_hi * 0
    if HAS_STARTS:
        loc_lo = tl.load(Starts + b)
    loc_lo = tl.maximum(loc_lo, 0)
    loc_n = tl.maximum(loc_hi - loc_lo, 0)
    loc_chunk = tl.cdiv(tl.cdiv(loc_n, NLOC), BLOCK_N) * BLOCK_N
    c_lo = loc_lo + loc * loc_chunk
    c_hi = tl.minimum(c_lo + loc_chunk, loc_hi)
    lk_base = LK + b.to(tl.int64) * stride_lkb + hkv.to(tl.int64) * stride_lkh
    lv_base = LV + b.to(tl.int64) * stride_lvb + hkv.to(tl.int64) * stride_lvh
    for start_n in range(c_lo, c_hi, BLOCK_N):
        slots = start_n + offs_n
        m_i, l_i, acc = _softmax_rows(q, lk_base, lv_base, slots, slots < c_hi, stride_lks, stride_lvs, offs_d,
                                      d_mask, scale_log2, m_i, l_i, acc, D, BLOCK_D, IEEE_DOT, HOIST_V)
    return m_i, l_i, acc


@triton.jit
def _lse_rows(x):
    """Row-wise logsumexp of a 2D block, -inf for all -inf rows."""
    m = tl.max(x, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(x - m_safe[:, None]), 1)
    return tl.where(s > 0, m_safe + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))


@triton.jit
def _log_z(ChunkLse, row_off, offs_g, g_mask, nch, BLOCK_CH: tl.constexpr):
    """log Z per query head from the chunk logsumexps: [BLOCK_G]; 0 where nothing was counted."""
    offs = tl.arange(0, BLOCK_CH)
    e = tl.load(ChunkLse + row_off[:, None] + offs[None, :], mask=g_mask[:, None] & (offs[None, :] < nch),
                other=float("-inf"))
    z = _lse_rows(e)
    return tl.where(z == float("-inf"), 0.0, z)


@triton.jit
def _kv_heads(HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr):
    """The (sequence, KV head) of a program with program_id(0) = b * HKV + hkv, and its query heads:
    (b, hkv, offs_g [BLOCK_G], g_mask (offs_g < G), heads = hkv * G + offs_g)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    return b, hkv, offs_g, offs_g < G, hkv * G + offs_g


@triton.jit
def _centroid_scores_kernel(
    Q, Cent, LSz, Scores, ChunkLse,
    stride_qb, stride_qh, stride_ch, stride_cc, stride_lh,
    stride_sb, stride_sh, stride_eb, stride_eh,
    C, scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE_DOT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_prologue(PDL)
    chunk = tl.program_id(1)
    b, hkv, _offs_g, g_mask, heads = _kv_heads(HKV, G, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d_mask = offs_d < D
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    cids = chunk * BLOCK_C + offs_c
    c_mask = cids < C
    cent = tl.load(Cent + hkv.to(tl.int64) * stride_ch + cids[:, None] * stride_cc + offs_d[None, :],
                   mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    s = _dot(q, tl.trans(cent), IEEE_DOT) * scale                      # [BLOCK_G, BLOCK_C] natural-log units
    tl.store(Scores + b * stride_sb + heads[:, None] * stride_sh + cids[None, :], s,
             mask=g_mask[:, None] & c_mask[None, :])
    ls = tl.load(LSz + hkv * stride_lh + cids, mask=c_mask, other=float("-inf"))
    lse = _lse_rows(s + ls[None, :])
    tl.store(ChunkLse + b * stride_eb + heads * stride_eh + chunk, lse, mask=g_mask)


@triton.jit
def _fine_scores_kernel(
    Q, Cent, LSz, Parent, S1, Lse1, Tau1, S2, Lse2, Scored,
    stride_qb, stride_qh, stride_ch, stride_cc, stride_lh, stride_ph,
    stride_s1b, stride_s1h, stride_e1b, stride_e1h, stride_s2b, stride_s2h, stride_e2b, stride_e2h,
    C2, NCH1, NCH2, scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CH1: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    chunk = tl.program_id(1)
    b, hkv, offs_g, g_mask, heads = _kv_heads(HKV, G, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d_mask = offs_d < D
    z1 = _log_z(Lse1, b * stride_e1b + heads * stride_e1h, offs_g, g_mask, NCH1, BLOCK_CH1)
    fids = chunk * BLOCK_C + offs_c
    f_mask = fids < C2
    par = tl.load(Parent + hkv * stride_ph + fids, mask=f_mask, other=0)
    s1 = tl.load(S1 + b * stride_s1b + heads[:, None] * stride_s1h + par[None, :],
                 mask=g_mask[:, None] & f_mask[None, :], other=float("-inf"))
    a1 = tl.max(s1 - z1[:, None], 0)
    alive = (a1 > tl.load(Tau1 + hkv)) & f_mask
    n_alive = tl.sum(alive.to(tl.int32), 0)
    s = tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float32)
    if n_alive > 0:
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        cent = tl.load(Cent + hkv.to(tl.int64) * stride_ch + fids[:, None] * stride_cc + offs_d[None, :],
                       mask=alive[:, None] & d_mask[None, :], other=0.0)  # rows of pruned parents: not read
        s = tl.where(alive[None, :], _dot(q, tl.trans(cent), IEEE_DOT) * scale, float("-inf"))
    tl.store(S2 + b * stride_s2b + heads[:, None] * stride_s2h + fids[None, :], s,
             mask=g_mask[:, None] & f_mask[None, :])
    ls = tl.load(LSz + hkv * stride_lh + fids, mask=f_mask, other=float("-inf"))
    lse = _lse_rows(tl.where(alive[None, :], s + ls[None, :], float("-inf")))
    tl.store(Lse2 + b * stride_e2b + heads * stride_e2h + chunk, lse, mask=g_mask)
    tl.store(Scored + tl.program_id(0) * NCH2 + chunk, n_alive)


@triton.jit
def _squeezed_decode_kernel(
    Q, K, V, Offsets, Scores, ChunkLse, LogTau, LK, LV, Lengths, Starts, MidO, MidLse, Kept,
    stride_qb, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh,
    stride_sb, stride_sh, stride_eb, stride_eh,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    C, NCH, NSP, NLOC, l_max, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CH: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE_DOT: tl.constexpr, NSUB: tl.constexpr = 1,
    Ticket=None, Out=None, OutLse=None, stride_outb=0, stride_outh=0,
    FUSE_MERGE: tl.constexpr = False, BLOCK_GM: tl.constexpr = 2, BLOCK_S: tl.constexpr = 8,
    NSPP=0, BPP: tl.constexpr = 1, PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
    LOCAL_FIRST: tl.constexpr = False, HOIST_V: tl.constexpr = False, Trace=None, TRACE: tl.constexpr = False,
):
    # EARLY (with PDL): everything that does not read the scores kernel's output (q, offsets, log tau, and the
    # whole local-slot attention) runs before the grid-dependency wait, i.e. while the scores kernel finishes.
    # LOCAL_FIRST: the local-slot programs are splits [0, NLOC) (scheduled first) instead of the last NLOC.
    # TRACE: Trace [splits * B * Hkv, 4] int64 gets (start, after the wait, end in ns of %globaltimer, kept rows)
    # per program (profiling only; CUDA).
    if TRACE:
        t_start = _globaltimer(NCH)
    if not EARLY:
        _pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_n = tl.arange(0, BLOCK_N)
    offs_g, heads, g_mask, offs_d, d_mask, q, m_i, l_i, acc = _group_query(Q, b, hkv, stride_qb, stride_qh, G, D,
                                                                            BLOCK_G, BLOCK_D)
    if LOCAL_FIRST:
        bsplit = split - NLOC                                            # block split, < 0: local program
        is_block = bsplit >= 0
        loc = split
    else:
        bsplit = split
        is_block = split < NSPP * NSUB
        loc = split - NSPP * NSUB
    total = 0
    if is_block:
        sub = bsplit % NSUB                                              # this program's tiles: sub, sub+NSUB, ..
        log_tau = tl.load(LogTau + hkv)
        offs_c = tl.arange(0, BLOCK_C)
        o_base = Offsets + hkv * stride_oh
        k_base = K + hkv.to(tl.int64) * stride_kh
        v_base = V + hkv.to(tl.int64) * stride_vh
        for kb in tl.static_range(BPP):                                  # cluster blocks bsplit//NSUB + kb*NSPP
            cb = bsplit // NSUB + kb * NSPP
            cids = cb * BLOCK_C + offs_c
            real = cids < C
            inr = cids < C + 1                      # cluster C: the observation window; false for all if cb >= NSP
            lo = tl.load(o_base + cids, mask=inr, other=0)
            hi = tl.load(o_base + cids + 1, mask=inr, other=0)
            base = tl.load(o_base + tl.minimum(cb, NSP - 1) * BLOCK_C)      # (unused when cb >= NSP)
            if kb == 0:
                if EARLY:
                    _pdl_prologue(PDL)
                if TRACE:
                    t_wait = _globaltimer(NCH)
                z = _log_z(ChunkLse, b * stride_eb + heads * stride_eh, offs_g, g_mask, NCH, BLOCK_CH)
            if cb < NSP:
                # which of this block's clusters to read
                s = tl.load(Scores + b * stride_sb + heads[:, None] * stride_sh + cids[None, :],
                            mask=g_mask[:, None] & real[None, :], other=float("-inf"))
                a = tl.max(s - z[:, None], 0)
                keep = ((a > log_tau) | (cids == C)) & inr
                size = hi - lo
                ks = tl.where(keep, size, 0)
                us = size - ks
                ends = tl.cumsum(ks, 0)                                  # kept keys up to and including j
                total = tl.sum(ks, 0)
                for t0 in range(sub * BLOCK_N, total, NSUB * BLOCK_N):
                    p = t0 + offs_n
                    p_mask = p < total
                    rows = _kept_rows(base, p, ends, us)                 # int32: N * D < 2**31
                    m_i, l_i, acc = _softmax_rows(q, k_base, v_base, rows, p_mask, stride_kn, stride_vn, offs_d,
                                                  d_mask, scale_log2, m_i, l_i, acc, D, BLOCK_D, IEEE_DOT, HOIST_V)
                if sub == 0:
                    tl.store(Kept + pid_bh * NSP + cb, total)
    else:
        m_i, l_i, acc = _attend_local(q, LK, LV, Lengths, Starts, b, hkv, loc, NLOC, l_max, offs_n, offs_d,
                                      d_mask, stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
                                      scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, HAS_STARTS, IEEE_DOT, HOIST_V)
        if EARLY:
            _pdl_prologue(PDL)
        if TRACE:
            t_wait = _globaltimer(NCH)
    num_splits = NSPP * NSUB + NLOC
    _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, split, num_splits, g_mask, d_mask, offs_d, HKV, G, D)
    if TRACE:
        t_end = _globaltimer(NCH)
        tp = Trace + (split * tl.num_programs(0) + pid_bh).to(tl.int64) * 4
        tl.store(tp, t_start)
        tl.store(tp + 1, t_wait)
        tl.store(tp + 2, t_end)
        tl.store(tp + 3, total.to(tl.int64))
    if FUSE_MERGE:
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(Ticket + pid_bh, 1, sem="acq_rel")
        if ticket == num_splits - 1:  # the last program of this (sequence, KV head) merges its G heads
            _merge_group(MidO, MidLse, Out, OutLse, b, hkv, num_splits, stride_outb, stride_outh, HKV, G, D,
                         BLOCK_GM, BLOCK_S, BLOCK_D)
            tl.atomic_xchg(Ticket + pid_bh, 0)


@triton.jit
def _globaltimer(x):
    """%globaltimer in ns (CUDA only; profiling). x: any int32 scalar (inline asm needs an operand)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _merge_group(MidO, MidLse, Out, OutLse, b, hkv, num_splits, stride_outb, stride_outh,
                 HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_GM: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Log-sum-exp merge of the num_splits partials of the G query heads of KV head hkv, sequence b:
    MidO [B, Hq, S, D] float32 (each split normalised), MidLse [B, Hq, S] -> Out [B, Hq, D], OutLse [B, Hq].
    Two passes over the (L2-resident) partials: the max and sum of the weights, then the weighted outputs."""
    offs_g = tl.arange(0, BLOCK_GM)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = hkv * G + offs_g
    rbase = (b * HKV * G + heads).to(tl.int64) * num_splits                   # [BLOCK_GM]
    m = tl.full([BLOCK_GM], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_GM], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + offs_s
        msk = g_mask[:, None] & (sp < num_splits)[None, :]
        e = tl.load(MidLse + rbase[:, None] + sp[None, :], mask=msk, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(e, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(e - m_safe[:, None]), 1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_GM, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + offs_s
        msk = g_mask[:, None] & (sp < num_splits)[None, :]
        e = tl.load(MidLse + rbase[:, None] + sp[None, :], mask=msk, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp(e - m_safe[:, None])                                          # [BLOCK_GM, BLOCK_S]
        o = tl.load(MidO + (rbase[:, None, None] + sp[None, :, None]) * D + offs_d[None, None, :],
                    mask=msk[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(o * w[:, :, None], 1)
    has = den > 0
    out = acc / tl.where(has, den, 1.0)[:, None]
    tl.store(Out + b.to(tl.int64) * stride_outb + heads[:, None] * stride_outh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    tl.store(OutLse + b * HKV * G + heads, tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf")),
             mask=g_mask)


@triton.jit
def _prefill_scores_kernel(
    Q, Cent, LSz, Psum,
    stride_qb, stride_qh, stride_qt, stride_ch, stride_cc, stride_lb, stride_lh,
    T, C, NMB, scale,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
    EXP2: tl.constexpr = False, PASS2_T: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // G
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    t = pid_m * BLOCK_M + offs_m
    t_mask = t < T
    d_mask = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    c_base = Cent + hkv.to(tl.int64) * stride_ch
    l_base = LSz + b * stride_lb + hkv * stride_lh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # EXP2: both passes in base 2 with the scale (and log2 e) inside one FMA per score; pass 2's exclusions as
    # -inf biases (rows past T: +inf log Z; excluded clusters: -inf) instead of a select per score
    sc = scale * 1.4426950408889634 if EXP2 else scale
    for c0 in range(0, C, BLOCK_C):                                     # pass 1: log Z per query row
        cids = c0 + offs_c
        c_mask = cids < C
        cent = tl.load(c_base + cids[:, None] * stride_cc + offs_d[None, :], mask=c_mask[:, None] & d_mask[None, :],
                       other=0.0)
        ls = tl.load(l_base + cids, mask=c_mask, other=float("-inf"))
        if EXP2:
            x = _dot(q, tl.trans(cent), IEEE_DOT) * sc + (ls * 1.4426950408889634)[None, :]
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
        else:
            x = _dot(q, tl.trans(cent), IEEE_DOT) * sc + ls[None, :]
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    if EXP2:
        log_z = tl.where(l_i > 0, m_safe + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)
        rz = tl.where(t_mask, log_z, float("inf"))
    else:
        log_z = tl.where(l_i > 0, m_safe + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    out_base = Psum + (pid_bh.to(tl.int64) * NMB + pid_m) * C
    for c0 in range(0, C, BLOCK_C):                                     # pass 2: sum_t exp(s - log Z)
        cids = c0 + offs_c
        c_mask = cids < C
        cent = tl.load(c_base + cids[:, None] * stride_cc + offs_d[None, :], mask=c_mask[:, None] & d_mask[None, :],
                       other=0.0)
        ls = tl.load(l_base + cids, mask=c_mask, other=float("-inf"))
        if EXP2 and not PASS2_T:        # (the untransposed form, for comparison)
            cb = tl.where(ls > float("-inf"), 0.0, float("-inf"))
            col = tl.sum(tl.exp2(_dot(q, tl.trans(cent), IEEE_DOT) * sc + cb[None, :] - rz[:, None]), 0)
        elif EXP2:
            # the tile transposed, [BLOCK_C, BLOCK_M]: the sums over query rows stay within quads of threads
            # instead of crossing warps through shared memory; one FMA per score (-log Z inside it), excluded
            # clusters zeroed after the sum. Loop body 378 SASS instructions vs 712 untransposed (offline sm_90,
            # benchmarks/results/squeezed_sass_sm90.json; 442 with the transposition alone, commit 79d550b)
            col = tl.sum(tl.exp2(_dot(cent, tl.trans(q), IEEE_DOT) * sc - rz[None, :]), 1)
            col = tl.where(ls > float("-inf"), col, 0.0)
        else:
            s = _dot(q, tl.trans(cent), IEEE_DOT) * sc
            ok = t_mask[:, None] & (ls[None, :] > float("-inf"))
            col = tl.sum(tl.where(ok, tl.exp(s - log_z[:, None]), 0.0), 0)
        tl.store(out_base + cids, col, mask=c_mask)


@triton.jit
def _indexed_attention_kernel(
    Q, K, V, Idx, Counts, LK, LV, Lengths, Starts, Out, Lse, Keep, RowCluster,
    stride_qb, stride_qh, stride_qt, stride_kh, stride_kn, stride_vh, stride_vn,
    stride_ib, stride_ih, stride_iblk, stride_cb, stride_ch, stride_cblk,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    stride_ob, stride_oh, stride_ot, stride_pb, stride_ph, stride_pt, stride_rh,
    T, l_max, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_STARTS: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE_DOT: tl.constexpr, TOKEN_MASK: tl.constexpr = False,
    STEADY: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r = pid_m * BLOCK_M + offs_m                                         # packed row = t * G + g
    r_mask = r < T * G
    t = r // G
    h = hkv * G + r % G
    d_mask = offs_d < D
    q_ptrs = b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # 1) the listed fixed-context rows, gathered
    # (TOKEN_MASK: the rows listed for this block of queries are the union of its tokens' selections; query
    # row r sees row n only where its token keeps n's cluster: Keep[b, hkv, t, RowCluster[hkv, n]])
    cnt = tl.load(Counts + b * stride_cb + hkv * stride_ch + pid_m * stride_cblk)
    i_base = Idx + b.to(tl.int64) * stride_ib + hkv * stride_ih + pid_m.to(tl.int64) * stride_iblk
    k_base = K + hkv.to(tl.int64) * stride_kh
    v_base = V + hkv.to(tl.int64) * stride_vh
    p_base = Keep + b.to(tl.int64) * stride_pb + hkv.to(tl.int64) * stride_ph + t.to(tl.int64) * stride_pt
    n0_masked = 0
    if STEADY and not TOKEN_MASK and BLOCK_D == D:  # whole tiles without masks, then the rest as below
        n0_masked = (cnt // BLOCK_N) * BLOCK_N
        for n0 in range(0, n0_masked, BLOCK_N):
            rows = tl.load(i_base + n0 + offs_n)
            m_i, l_i, acc = _softmax_tile_full(q, k_base + rows[:, None] * stride_kn + offs_d[None, :],
                                               v_base + rows[:, None] * stride_vn + offs_d[None, :], scale_log2,
                                               m_i, l_i, acc, IEEE_DOT)
    for n0 in range(n0_masked, cnt, BLOCK_N):
        n_mask = n0 + offs_n < cnt
        rows = tl.load(i_base + n0 + offs_n, mask=n_mask, other=0)
        if TOKEN_MASK:
            rc = tl.load(RowCluster + hkv * stride_rh + rows, mask=n_mask, other=0)
            kp = tl.load(p_base[:, None] + rc[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
            vis = (kp != 0) & n_mask[None, :]
        else:
            vis = n_mask[None, :]
        m_i, l_i, acc = _softmax_tile(q, k_base + rows[:, None] * stride_kn + offs_d[None, :],
                                      v_base + rows[:, None] * stride_vn + offs_d[None, :],
                                      n_mask[:, None] & d_mask[None, :], vis, scale_log2, m_i, l_i,
                                      acc, IEEE_DOT)
    # 2) the local slots, causal: query t sits at slot L - T + t
    L = tl.minimum(tl.load(Lengths + b), l_max)
    qs = L - T + t
    lo = L * 0
    if HAS_STARTS:
        lo = tl.load(Starts + b)
    lo = tl.maximum(lo, 0)
    last_t = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, T * G) - 1) // G
    hi = tl.minimum(L, L - T + last_t + 1)
    lk_base = LK + b.to(tl.int64) * stride_lkb + hkv.to(tl.int64) * stride_lkh
    lv_base = LV + b.to(tl.int64) * stride_lvb + hkv.to(tl.int64) * stride_lvh
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + offs_n
        j_mask = j < hi
        vis = j_mask[None, :] & (j[None, :] <= qs[:, None])
        m_i, l_i, acc = _softmax_tile(q, lk_base + j[:, None] * stride_lks + offs_d[None, :],
                                      lv_base + j[:, None] * stride_lvs + offs_d[None, :],
                                      j_mask[:, None] & d_mask[None, :], vis, scale_log2, m_i, l_i, acc, IEEE_DOT)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_ptrs = b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :]
    tl.store(Out + o_ptrs, out.to(Out.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + (b * HKV * G + h).to(tl.int64) * T + t, lse, mask=r_mask)


@triton.jit
def _gather_rows_kernel(
    K, V, Idx, KG, VG,
    stride_kh, stride_kn, stride_vh, stride_vn, stride_ib, stride_ih,
    stride_gb, stride_gh, stride_gn, stride_wb, stride_wh, stride_wn,
    W,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """KG[b, h, r] = K[h, Idx[b, h, r]] and VG likewise, r < W: grid (ceil(W / BLOCK_R), B * HKV)."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    m = (r < W)[:, None] & (d < D)[None, :]
    rows = tl.load(Idx + b.to(tl.int64) * stride_ib + h * stride_ih + r, mask=r < W, other=0).to(tl.int64)
    k = tl.load(K + h.to(tl.int64) * stride_kh + rows[:, None] * stride_kn + d[None, :], mask=m)
    v = tl.load(V + h.to(tl.int64) * stride_vh + rows[:, None] * stride_vn + d[None, :], mask=m)
    tl.store(KG + b.to(tl.int64) * stride_gb + h * stride_gh + r[:, None].to(tl.int64) * stride_gn + d[None, :], k,
             mask=m)
    tl.store(VG + b.to(tl.int64) * stride_wb + h * stride_wh + r[:, None].to(tl.int64) * stride_wn + d[None, :], v,
             mask=m)
