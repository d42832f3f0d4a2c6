"""Triton kernels of A²ATS retrieval (imported lazily: this module needs triton).

`_select_kernel`, grid (B * Hkv,): for the G query heads of one KV group, finds by bisection over the
order-preserving integer image of the float scores the kth-largest candidate score (codes weighted by how
many candidate tokens carry them; k = floor(ratio x length)), and writes which codes reach it for any head.

`_code_append_kernel`, grid (B,): the candidate histogram rewound if the lengths went back, the new
token's code (argmax of its assignment scores) written at the step's slot, and one step of band crossings
counted once (the slot leaving the recent window joins band 0; one token per inner band edge moves up).

`_sparse_split_kernel`, grid (B * Hkv, num_splits): split-K flash decoding over the slots of one sequence,
reading each slot's code (2 bytes), looking its virtual code (distance band x C + code) up in the
selected table, and loading K/V rows only for
attended slots (masked loads: unselected rows cost no memory traffic). The K/V store may be pinned host
memory: the kernel then reads the selected rows over PCIe (zero-copy). `_merge_kernel` merges the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmsqueeze.kernels._triton_decode import _store_partial
from lmsqueeze.methods.a2ats._triton_fast import _radix_union_kernel
from lmsqueeze.methods.a2ats.retrieval import MAX_REWIND

_LOG2E = 1.4426950408889634


@triton.jit
def _select_kernel(Lut, Counts, Lengths, Starts, Ratio, Sel,
                   stride_lb, stride_lh, stride_lg, stride_cb, stride_ch, stride_sb, stride_sh,
                   C, HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, BLOCK_C)
    gm = offs_g < G
    cm = offs_c < C
    lut = Lut + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    vals = tl.load(lut + offs_g[:, None] * stride_lg + offs_c[None, :], mask=gm[:, None] & cm[None, :],
                   other=float("-inf")).to(tl.float32)
    cnt = tl.load(Counts + b.to(tl.int64) * stride_cb + h * stride_ch + offs_c, mask=cm, other=0)
    total = tl.sum(cnt, 0)
    n = (tl.load(Lengths + b) - tl.load(Starts + b)).to(tl.float64)
    kth = tl.minimum((n * tl.load(Ratio)).to(tl.int32), total)  # floor(ratio x n) in float64, as the reference
    vals = tl.where(vals == 0.0, 0.0, vals)  # -0.0 == +0.0 as floats, not as bit patterns
    bits = vals.to(tl.int32, bitcast=True)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32; float order == signed integer order
    lo = tl.full([BLOCK_G], -2147483648, tl.int64)  # invariant: count(keys >= lo) >= kth
    hi = tl.full([BLOCK_G], 2147483647, tl.int64)
    for _ in range(32):  # 32 halvings of the int32 range: lo == hi == the kth-largest key
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum(tl.where(keys >= mid.to(tl.int32)[:, None], cnt[None, :], 0), 1)
        ok = c >= kth
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    take = (keys >= lo.to(tl.int32)[:, None]) & gm[:, None] & (kth > 0)
    sel = tl.max(take.to(tl.int32), 0)
    tl.store(Sel + b.to(tl.int64) * stride_sb + h * stride_sh + offs_c, sel.to(tl.int8), mask=cm)


@triton.jit
def _select_wide_kernel(Lut, Counts, Lengths, Starts, Ratio, Sel,
                        stride_lb, stride_lh, stride_lg, stride_cb, stride_ch, stride_sb, stride_sh,
                        C, HKV: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    """`_select_kernel` for large (virtual) codebooks: the G heads one after another, so only one head's C
    scores, the counts and the running union sit in registers (C up to 32768 at 32 warps)."""
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs_c = tl.arange(0, BLOCK_C)
    cm = offs_c < C
    lut = Lut + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    cnt = tl.load(Counts + b.to(tl.int64) * stride_cb + h * stride_ch + offs_c, mask=cm, other=0)
    total = tl.sum(cnt, 0)
    n = (tl.load(Lengths + b) - tl.load(Starts + b)).to(tl.float64)
    kth = tl.minimum((n * tl.load(Ratio)).to(tl.int32), total)
    sel = tl.zeros([BLOCK_C], tl.int32)
    for g in tl.static_range(G):
        vals = tl.load(lut + g * stride_lg + offs_c, mask=cm, other=float("-inf")).to(tl.float32)
        vals = tl.where(vals == 0.0, 0.0, vals)
        bits = vals.to(tl.int32, bitcast=True)
        keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        lo = tl.full([1], -2147483648, tl.int64)
        hi = tl.full([1], 2147483647, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            c = tl.sum(tl.where(keys[None, :] >= mid.to(tl.int32)[:, None], cnt[None, :], 0), 1)
            ok = c >= kth
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        take = (keys[None, :] >= lo.to(tl.int32)[:, None]) & (kth > 0)
        sel = tl.maximum(sel, tl.max(take.to(tl.int32), 0))
    tl.store(Sel + b.to(tl.int64) * stride_sb + h * stride_sh + offs_c, sel.to(tl.int8), mask=cm)


@triton.jit
def _select_threshold_kernel(Lut, Counts, Lengths, Starts, Ratio, Thr,
                             stride_lb, stride_lh, stride_lg, stride_cb, stride_ch,
                             C, HKV: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split select, phase 1, grid (B * Hkv, G): one query head's kth-largest candidate key (the bisection of
    `_select_kernel`) -> Thr[b, h, g] int64 (2^31, above every key, when nothing is kept)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    offs_c = tl.arange(0, BLOCK_C)
    cm = offs_c < C
    lut = Lut + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + g * stride_lg
    cnt = tl.load(Counts + b.to(tl.int64) * stride_cb + h * stride_ch + offs_c, mask=cm, other=0)
    total = tl.sum(cnt, 0)
    n = (tl.load(Lengths + b) - tl.load(Starts + b)).to(tl.float64)
    kth = tl.minimum((n * tl.load(Ratio)).to(tl.int32), total)
    vals = tl.load(lut + offs_c, mask=cm, other=float("-inf")).to(tl.float32)
    vals = tl.where(vals == 0.0, 0.0, vals)
    bits = vals.to(tl.int32, bitcast=True)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    lo = tl.full([1], -2147483648, tl.int64)
    hi = tl.full([1], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum(tl.where(keys[None, :] >= mid.to(tl.int32)[:, None], cnt[None, :], 0), 1)
        ok = c >= kth
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    lo = tl.where(kth > 0, lo, 2147483648)
    offs1 = tl.arange(0, 1)
    tl.store(Thr + pid.to(tl.int64) * G + g + offs1, lo)


@triton.jit
def _virtual_code(code, dist, Bands, C, NB: tl.constexpr):
    """band(dist) x C + code; Bands: int32 [NB] lower band edges (Bands[0] = window, unused here)."""
    band = tl.zeros_like(code)
    for i in tl.static_range(1, NB):
        band += (dist >= tl.load(Bands + i)).to(tl.int32)
    return band * C + code


@triton.jit
def _sparse_split_kernel(
    Q, K, V, Codes, Sel, Bands, Lengths, Starts, MidO, MidLse,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_sb, stride_sh,
    scale_log2, sinks, window, s_max, num_splits, C,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NEAR: tl.constexpr, IEEE_DOT: tl.constexpr, NB: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV

    length = tl.minimum(tl.load(Lengths + b), s_max)
    start = tl.load(Starts + b)
    near_lo = start + sinks  # slots below are sinks
    near_hi = length - window  # slots from here on are the recent window
    if NEAR:
        lo = start
        hi = length
    else:
        lo = near_lo
        hi = near_hi
    lo = tl.maximum(lo, 0)
    n = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    c_lo = lo + split * chunk
    c_hi = tl.minimum(c_lo + chunk, hi)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = hkv * G + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    c_base = Codes + b.to(tl.int64) * stride_cb + hkv.to(tl.int64) * stride_ch
    s_base = Sel + b.to(tl.int64) * stride_sb + hkv.to(tl.int64) * stride_sh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(c_lo, c_hi, BLOCK_N):
        slots = start_n + offs_n
        in_r = slots < c_hi
        code = tl.load(c_base + slots, mask=in_r, other=0).to(tl.int32)
        take = tl.load(s_base + _virtual_code(code, length - 1 - slots, Bands, C, NB), mask=in_r, other=0) != 0
        if NEAR:
            take = take | (slots < near_lo) | (slots >= near_hi)
        take = take & in_r
        if tl.max(take.to(tl.int32), 0) > 0:
            if BLOCK_D == D:
                kv_mask = take[:, None]
            else:
                kv_mask = take[:, None] & d_mask[None, :]
            k = tl.load(k_base + slots[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + slots[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(take[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE_DOT:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, split, num_splits, g_mask, d_mask, offs_d, HKV, G, D)


@triton.jit
def _sparse_compact_kernel(
    Q, K, V, Codes, Sel, Bands, Lengths, Starts, Scratch, MidO, MidLse,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_sb, stride_sh,
    scale_log2, sinks, window, s_max, num_splits, C, cap,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NEAR: tl.constexpr, IEEE_DOT: tl.constexpr, NB: tl.constexpr,
):
    """Same contract as `_sparse_split_kernel`, in two phases: (1) scan the chunk's codes and write the
    attended slots, compacted, to this program's scratch row; (2) attend over that list, so every K/V load
    is a useful row and no load waits on a code lookup."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    length = tl.minimum(tl.load(Lengths + b), s_max)
    start = tl.load(Starts + b)
    near_lo = start + sinks
    near_hi = length - window
    if NEAR:
        lo = start
        hi = length
    else:
        lo = near_lo
        hi = near_hi
    lo = tl.maximum(lo, 0)
    n = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_S) * BLOCK_S
    c_lo = lo + split * chunk
    c_hi = tl.minimum(c_lo + chunk, hi)
    c_base = Codes + b.to(tl.int64) * stride_cb + hkv.to(tl.int64) * stride_ch
    s_base = Sel + b.to(tl.int64) * stride_sb + hkv.to(tl.int64) * stride_sh
    scratch = Scratch + (pid_bh.to(tl.int64) * num_splits + split) * cap

    offs_s = tl.arange(0, BLOCK_S)
    count = 0
    for start_s in range(c_lo, c_hi, BLOCK_S):  # phase 1: compaction
        slots = start_s + offs_s
        in_r = slots < c_hi
        code = tl.load(c_base + slots, mask=in_r, other=0).to(tl.int32)
        take = tl.load(s_base + _virtual_code(code, length - 1 - slots, Bands, C, NB), mask=in_r, other=0) != 0
        if NEAR:
            take = take | (slots < near_lo) | (slots >= near_hi)
        take = take & in_r
        t = take.to(tl.int32)
        pos = tl.cumsum(t, 0) - t
        tl.store(scratch + count + pos, slots, mask=take)
        count += tl.sum(t, 0)
    tl.debug_barrier()

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = hkv * G + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(0, count, BLOCK_N):  # phase 2: attention over the compacted slots
        live = start_n + offs_n < count
        slots = tl.load(scratch + start_n + offs_n, mask=live, other=0).to(tl.int64)
        if BLOCK_D == D:
            kv_mask = live[:, None]
        else:
            kv_mask = live[:, None] & d_mask[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(live[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every visited tile has a live slot
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, split, num_splits, g_mask, d_mask, offs_d, HKV, G, D)


@triton.jit
def _merge_kernel(MidO, MidLse, Out, Lse, stride_ob, stride_oh, num_splits,
                  HQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # = b * HQ + h
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < D
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(MidLse + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    total = tl.sum(w, 0)
    o = tl.load(MidO + (base + offs_s)[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)
    tl.store(Lse + pid, tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


WIDE_SELECT = 8192  # G x C above this: the head-by-head select kernel (registers)


def select_launch(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                  ratio: torch.Tensor, sel: torch.Tensor, wide: bool | None = None, split: bool = False) -> None:
    """lut: [B, Hkv, G, C] (code dim contiguous), counts: [B, Hkv, C] int32, lengths/starts: [B] int32,
    ratio: [1] float64 -> sel: [B, Hkv, C] int8. wide: head-by-head kernel (default: when G x C > WIDE_SELECT);
    split: two launches instead, one program per query head for the thresholds, then the union (more
    parallel: B x Hkv x G programs)."""
    B, Hkv, G, C = lut.shape
    block_c = triton.next_power_of_2(C)
    if split:
        thr = torch.empty(B * Hkv * G, dtype=torch.int64, device=lut.device)
        _select_threshold_kernel[(B * Hkv, G)](
            lut, counts, lengths, starts, ratio, thr,
            lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1),
            C, HKV=Hkv, G=G, BLOCK_C=block_c, num_warps=max(4, min(16, block_c // 1024)),
        )
        block = min(block_c, 1024)
        # phase 2 (sel = OR over the heads of key >= threshold) is the radix select's union kernel on 32-bit keys
        _radix_union_kernel[(B * Hkv, triton.cdiv(C, block))](
            lut, thr, sel, lut.stride(0), lut.stride(1), lut.stride(2), sel.stride(0), sel.stride(1), C,
            HKV=Hkv, G=G, BLOCK_G=triton.next_power_of_2(G), BLOCK=block, KEY16=False, SENTINEL=2147483648,
            num_warps=4,
        )
        return
    if wide is None:
        wide = triton.next_power_of_2(G) * block_c > WIDE_SELECT
    if wide:
        _select_wide_kernel[(B * Hkv,)](
            lut, counts, lengths, starts, ratio, sel,
            lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1),
            sel.stride(0), sel.stride(1),
            C, HKV=Hkv, G=G, BLOCK_C=block_c, num_warps=max(4, min(32, block_c // 512)),
        )
        return
    _select_kernel[(B * Hkv,)](
        lut, counts, lengths, starts, ratio, sel,
        lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1),
        sel.stride(0), sel.stride(1),
        C, HKV=Hkv, G=G, BLOCK_G=triton.next_power_of_2(G), BLOCK_C=block_c,
        num_warps=4 if block_c * triton.next_power_of_2(G) <= 4096 else 8,
    )


@triton.jit
def _code_append_kernel(Scores, Codes, Counts, Counted, Slot, Lengths, Starts, Edges,
                        stride_sh, stride_sb, stride_cb, stride_ch, stride_nb, stride_nh,
                        C, sinks, s_max, HKV: tl.constexpr, BLOCK_C: tl.constexpr,
                        MAX_REWIND: tl.constexpr, NB: tl.constexpr):
    b = tl.program_id(0)
    code_row = Codes + b.to(tl.int64) * stride_cb
    count_row = Counts + b.to(tl.int64) * stride_nb
    # the histogram follows the candidates of a query at `length` (`retrieval.shift_histogram`): first undo
    # the steps counted beyond it (the lengths went back: graph warm-up), reading codes before this step
    # writes one: from a query at L' to L' - 1 the token at distance e_i moves from band i to band i - 1
    length = tl.load(Lengths + b)
    lo = tl.load(Starts + b) + sinks
    counted = tl.load(Counted + b)
    for r in tl.static_range(MAX_REWIND):
        lp = length + 1 + r
        for i in tl.static_range(NB):
            s = lp - 1 - tl.load(Edges + i)
            out = (lp.to(tl.int64) <= counted) & (s >= lo)
            s_safe = tl.minimum(tl.maximum(s, 0), s_max - 1)
            for h in tl.static_range(HKV):
                c = tl.load(code_row + h * stride_ch + s_safe).to(tl.int32)
                tl.atomic_add(count_row + h * stride_nh + i * C + c, -1, mask=out)
                if i > 0:
                    tl.atomic_add(count_row + h * stride_nh + (i - 1) * C + c, 1, mask=out)
    counted = tl.minimum(counted, length.to(tl.int64))
    tl.debug_barrier()
    # the new token's code: argmax of its assignment scores
    slot = tl.load(Slot)
    offs = tl.arange(0, BLOCK_C)
    cm = offs < C
    for h in tl.static_range(HKV):
        sc = tl.load(Scores + h * stride_sh + b.to(tl.int64) * stride_sb + offs, mask=cm, other=float("-inf"))
        code = tl.argmax(sc, 0)
        tl.store(code_row + h * stride_ch + slot, code.to(tl.int16))
    # one step forward, once: the token at distance e_i moves from band i - 1 (none for i = 0) to band i
    fwd = counted < length.to(tl.int64)
    for i in tl.static_range(NB):
        s = length - 1 - tl.load(Edges + i)
        add = fwd & (s >= lo)
        s_safe = tl.minimum(tl.maximum(s, 0), s_max - 1)
        for h in tl.static_range(HKV):
            c = tl.load(code_row + h * stride_ch + s_safe).to(tl.int32)
            tl.atomic_add(count_row + h * stride_nh + i * C + c, 1, mask=add)
            if i > 0:
                tl.atomic_add(count_row + h * stride_nh + (i - 1) * C + c, -1, mask=add)
    tl.store(Counted + b, tl.maximum(counted, length.to(tl.int64)))


def code_append_launch(scores, codes, counts, counted, slot, lengths, starts, sinks: int, edges: torch.Tensor,
                       ) -> None:
    """scores: [Hkv, B, C] float32; codes: [B, Hkv, S] int16; counts: [B, Hkv, NB * C] int32; counted: [B]
    int64; edges: int32 [NB] lower band edges (window first)."""
    Hkv, B, C = scores.shape
    block_c = triton.next_power_of_2(C)
    _code_append_kernel[(B,)](
        scores, codes, counts, counted, slot, lengths, starts, edges,
        scores.stride(0), scores.stride(1), codes.stride(0), codes.stride(1), counts.stride(0), counts.stride(1),
        C, int(sinks), codes.shape[2], HKV=Hkv, BLOCK_C=block_c, MAX_REWIND=MAX_REWIND, NB=edges.shape[0],
        num_warps=4 if block_c <= 4096 else 8,
    )


def sparse_launch(q, k_store, v_store, codes, sel, starts, lengths, sinks: int, window: int, scaling: float,
                  near: bool, num_splits: int, block_n: int, num_warps: int, num_stages: int,
                  compact: bool = False, block_s: int = 256, edges: torch.Tensor | None = None):
    """Launch the split (or compacting split) and merge kernels; inputs validated by the caller.
    Returns out [B, Hq, D], lse [B, Hq]."""
    B, Hq, D = q.shape
    Hkv, s_max = k_store.shape[1], k_store.shape[2]
    G = Hq // Hkv
    if edges is None:
        edges = torch.full((1,), int(window), dtype=torch.int32, device=q.device)
    NB = edges.shape[0]
    C = sel.shape[2] // NB
    mid_o = torch.empty((B, Hq, num_splits, D), device=q.device, dtype=torch.float32)
    mid_lse = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(D)
    common = (
        q.stride(0), q.stride(1),
        k_store.stride(0), k_store.stride(1), k_store.stride(2),
        v_store.stride(0), v_store.stride(1), v_store.stride(2),
        codes.stride(0), codes.stride(1), sel.stride(0), sel.stride(1),
        float(scaling) * _LOG2E, int(sinks), int(window), s_max, num_splits, C,
    )
    meta = {"HKV": Hkv, "G": G, "D": D, "BLOCK_G": max(16, triton.next_power_of_2(G)), "BLOCK_D": block_d,
            "BLOCK_N": block_n, "NEAR": near, "IEEE_DOT": q.dtype == torch.float32, "num_warps": num_warps,
            "num_stages": num_stages, "NB": NB}
    if compact:
        per_split = -(-s_max // num_splits)
        cap = -(-per_split // block_s) * block_s  # the largest chunk a program can get
        scratch = torch.empty(B * Hkv * num_splits * cap, device=q.device, dtype=torch.int32)
        _sparse_compact_kernel[(B * Hkv, num_splits)](
            q, k_store, v_store, codes, sel, edges, lengths, starts, scratch, mid_o, mid_lse, *common, cap,
            BLOCK_S=block_s, **meta)
    else:
        _sparse_split_kernel[(B * Hkv, num_splits)](
            q, k_store, v_store, codes, sel, edges, lengths, starts, mid_o, mid_lse, *common, **meta)
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq), device=q.device, dtype=torch.float32)
    _merge_kernel[(B * Hq,)](
        mid_o, mid_lse, out, lse, out.stride(0), out.stride(1), num_splits,
        HQ=Hq, D=D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        num_warps=4 if num_splits * block_d <= 8192 else 8,
    )
    return out, lse
