"""Triton kernel of the one-launch Squeezed decode (imported lazily: this module needs triton). Reference:
reference.centroid_scores_reference + reference.squeezed_decode_reference; wrapper and contract:
fused.squeezed_decode_fused_triton.

`_fused_decode_kernel`, grid (PG + NLOC, B*Hkv): the PG programs of one (sequence, KV head) share the flat lookup
and the attention over the fixed context; programs PG.. attend the local slots. Program p owns clusters
[p*CP, (p+1)*CP) of C + 1 (cluster C: the observation window, always kept):

  phase 1  its clusters' scores (q·c * scale, one tile per BLOCK_C clusters) to Scores [B, Hq, C] and their
           logsumexp(score + log size) to PartLse [B, Hq, PG];
  phase 2  log Z from the PG partial logsumexps; its kept non-empty clusters listed in order as (first row, size)
           in Start / Size [B*Hkv, PG, NT*BLOCK_C], their count in Count [B*Hkv, PG] (rows: KeptRows);
  phase 3  the kept clusters of global index p, p + PG, .. dealt out as in the listed decode (_attend_listed),
           flash-decoding over their rows; the partial (out, lse) goes to MidO / MidLse (merged by the shared
           split merge).

PHASE 0 runs the three phases in one launch, the PG programs of a group meeting at a barrier between phases
(an arrival count the last arrival resets and a generation it advances, which the others wait on, on separate
128-byte lines of Bar [B*Hkv, 64] int32; nothing to reset between calls or graph replays). That needs the PG programs of a
group resident together: the wrapper keeps PG + NLOC <= the SM count, and the grid's groups are consecutive
block indices, so earlier groups (fully resident) finish and free room for a later group's programs. PHASE 1 / 2
/ 3 run one phase per launch (no barrier): the Triton interpreter, which runs programs one after another, and
any case where residency cannot be guaranteed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.kernels._triton_decode import _group_query, _pdl_prologue, _store_partial
from lmsqueeze.methods.squeezed._triton_kernels import _attend_local, _dot, _log_z, _lse_rows
from lmsqueeze.methods.squeezed._triton_listed import _attend_listed


@triton.jit
def _nanosleep(x):
    """Sleep ~64 ns (a spin-wait backoff); returns x."""
    return tl.inline_asm_elementwise("nanosleep.u32 64;\n mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _group_barrier(Bar, n):
    """Wait until all n programs of this group have called it. Bar: the group's arrival count (left at 0 by the
    last arrival) and, 32 words on (its own 128-byte line), its generation (advanced by the last arrival; the
    others poll it with volatile loads, backing off). Earlier writes of every program are visible after it
    (release / acquire at GPU scope)."""
    tl.debug_barrier()
    gen = tl.atomic_add(Bar + 32, 0, sem="acquire", scope="gpu")
    old = tl.atomic_add(Bar, 1, sem="acq_rel", scope="gpu")
    if old == n - 1:
        tl.atomic_xchg(Bar, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(Bar + 32, 1, sem="release", scope="gpu")
    else:
        cur = gen
        while cur == gen:
            cur = _nanosleep(tl.load(Bar + 32, volatile=True))
        tl.atomic_add(Bar + 32, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _score_tile(q, Cent, LSz, c_base, ls_base, cids, c_mask, offs_d, d_mask, stride_cc, scale, IEEE_DOT: tl.constexpr):
    """Scores [BLOCK_G, BLOCK_C] (natural log units) of the centroids cids and the tile's logsumexp(score + log
    size) per query head."""
    cent = tl.load(Cent + c_base + cids[:, None] * stride_cc + offs_d[None, :],
                   mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    s = _dot(q, tl.trans(cent), IEEE_DOT) * scale
    ls = tl.load(LSz + ls_base + cids, mask=c_mask, other=float("-inf"))
    return s, _lse_rows(s + ls[None, :])


@triton.jit
def _fused_decode_kernel(
    Q, Cent, LSz, Offsets, LogTau, K, V, LK, LV, Lengths, Starts,
    Scores, PartLse, Start, Size, Count, KeptRows, Bar, MidO, MidLse,
    stride_qb, stride_qh, stride_ch, stride_cc, stride_lh, stride_oh, stride_kh, stride_kn, stride_vh, stride_vn,
    stride_sb, stride_sh, stride_eb, stride_eh,
    stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh, stride_lvs,
    C, CP, PG, NLOC, l_max, scale, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, NT: tl.constexpr, BLOCK_PG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_STARTS: tl.constexpr, IEEE_DOT: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr = False,
):
    _pdl_prologue(PDL)
    p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_g, heads, g_mask, offs_d, d_mask, q, m_i, l_i, acc = _group_query(Q, b, hkv, stride_qb, stride_qh, G, D,
                                                                            BLOCK_G, BLOCK_D)
    if p >= PG:
        if PHASE == 0 or PHASE == 3:
            m_i, l_i, acc = _attend_local(q, LK, LV, Lengths, Starts, b, hkv, p - PG, NLOC, l_max, offs_n, offs_d,
                                          d_mask, stride_lkb, stride_lkh, stride_lks, stride_lvb, stride_lvh,
                                          stride_lvs, scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N, HAS_STARTS,
                                          IEEE_DOT)
            _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, p, PG + NLOC, g_mask, d_mask, offs_d, HKV, G, D)
    else:
        c_base = hkv.to(tl.int64) * stride_ch
        s_row = b * stride_sb + heads[:, None] * stride_sh
        e_row = b * stride_eb + heads * stride_eh
        lo_c = p * CP
        hi_c = tl.minimum(lo_c + CP, C + 1)
        s_keep = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
        if PHASE == 0 or PHASE == 1:
            lse = tl.full([BLOCK_G], float("-inf"), tl.float32)
            for t in range(NT):
                cids = lo_c + t * BLOCK_C + offs_c
                c_mask = (cids < hi_c) & (cids < C)
                s, lse_t = _score_tile(q, Cent, LSz, c_base, hkv * stride_lh, cids, c_mask, offs_d, d_mask,
                                       stride_cc, scale, IEEE_DOT)
                s_keep = s
                if NT > 1 or PHASE == 1:
                    tl.store(Scores + s_row + cids[None, :], s, mask=g_mask[:, None] & c_mask[None, :])
                lse = _lse_rows(tl.join(lse, lse_t))
            tl.store(PartLse + e_row + p, lse, mask=g_mask)
        if PHASE == 0:
            _group_barrier(Bar + 64 * pid_bh, PG)
        if PHASE == 0 or PHASE == 2:
            z = _log_z(PartLse, e_row, offs_g, g_mask, PG, BLOCK_PG, True)
            tau = tl.load(LogTau + hkv)
            n_p = tl.full([], 0, tl.int32)
            rows_p = tl.full([], 0, tl.int32)
            list_base = (pid_bh * PG + p).to(tl.int64) * (NT * BLOCK_C)
            for t in range(NT):
                cids = lo_c + t * BLOCK_C + offs_c
                inr = cids < hi_c
                if NT > 1 or PHASE == 2:
                    s = tl.load(Scores + s_row + cids[None, :], mask=g_mask[:, None] & inr[None, :] & (cids < C)[None, :],
                                other=float("-inf"))
                else:
                    s = tl.where(g_mask[:, None] & inr[None, :] & (cids < C)[None, :], s_keep, float("-inf"))
                lo = tl.load(Offsets + hkv * stride_oh + cids, mask=inr, other=0)
                hi = tl.load(Offsets + hkv * stride_oh + cids + 1, mask=inr, other=0)
                a = tl.max(s - z[:, None], 0)
                keep = ((a > tau) | (cids == C)) & inr & (hi > lo)
                ki = keep.to(tl.int32)
                dst = list_base + n_p + tl.cumsum(ki, 0) - 1
                tl.store(Start + dst, lo, mask=keep)
                tl.store(Size + dst, hi - lo, mask=keep)
                n_p += tl.sum(ki, 0)
                rows_p += tl.sum(tl.where(keep, hi - lo, 0), 0)
            tl.store(Count + pid_bh * PG + p, n_p)
            tl.store(KeptRows + pid_bh * PG + p, rows_p)
        if PHASE == 0:
            _group_barrier(Bar + 64 * pid_bh, PG)
        if PHASE == 0 or PHASE == 3:
            m_i, l_i, acc = _attend_listed(q, K + hkv.to(tl.int64) * stride_kh, V + hkv.to(tl.int64) * stride_vh,
                                           Start, Size, Count, pid_bh * PG, p, PG, PG, offs_n, offs_d, d_mask,
                                           stride_kn, stride_vn, scale_log2, m_i, l_i, acc, D, BLOCK_D, BLOCK_N,
                                           BLOCK_E, NT * BLOCK_C, BLOCK_PG, IEEE_DOT, False, True)
            _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, p, PG + NLOC, g_mask, d_mask, offs_d, HKV, G, D)
