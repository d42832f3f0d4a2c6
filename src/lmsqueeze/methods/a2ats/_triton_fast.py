"""Faster A²ATS selection kernels (imported lazily: this module needs triton).

`_radix_threshold_kernel`, grid (B * Hkv, G): one query head's kth-largest candidate score by a 16-way
search (4 bits of the order-preserving integer key per pass: 4 passes for a 16-bit lookup table, 8 for
float32) instead of a 32-step bisection. Each pass streams the head's scores and the candidate histogram in
chunks, counting for 16 thresholds at once, so a head costs 4 block reductions, not 32 x G.

`_radix_union_kernel`, grid (B * Hkv, cdiv(C, BLOCK)): sel = OR over the G heads of key >= threshold.

`_bisect_head_kernel`, grid (B * Hkv, G): the bisection of `_triton_a2ats._select_threshold_kernel` on
16-bit keys for a 16-bit table (16 halvings instead of 32), and optionally marking sel directly (after a
memset) instead of a union launch that re-reads the table.

`_band_query_kernel`, grid (B * Hq,): the band-rotated queries in the lookup table's bmm layout and dtype.

`_bisect_value_kernel`, grid (B * Hkv, G): the marking bisection over the data's own key range, splitting
the value interval first and stopping at one key (fewer passes on clustered scores; exact on any data).

`_assign_partial_kernel`, grid (Hkv, cdiv(C, 64)): the new keys' assignment scores (float32, IEEE dot) for a
block of codewords, reduced in registers to the block's max and argmax (no [Hkv, B, C] score array).

`_code_append_head_kernel`, grid (B, Hkv): `_code_append_kernel` with one program per KV head (the argmax
of one head, the histogram rewind and band crossings as vector loads / relaxed atomics). It reads `counted`
and never writes it (other heads of the sequence still read it); the launcher then sets counted = lengths,
which is what the one-program kernel leaves (max(min(counted, L), L) = L).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmsqueeze.methods.a2ats.retrieval import MAX_REWIND

RADIX_BITS = 4  # thresholds per pass = 2 ** RADIX_BITS
RADIX_BLOCK = 1024  # scores per chunk of the threshold kernel (the [16, BLOCK] counters live in registers)
RADIX_WARPS = 8
BISECT_WARPS: int | None = None  # warps of `_bisect_head_kernel` (None: C / 1024 clamped to 4..8; H100,
# 16384 virtual codes: 8 warps 0.0590 ms, 16 warps 0.0615, 32 warps 0.0630, a2ats_serving_h100_v3b.json)


@triton.jit
def _order_key(vals, KEY16: tl.constexpr):
    """int32 key with the float order of `vals` (16-bit floats: 16-bit keys); -0.0 and +0.0 share key 0."""
    if KEY16:
        bits = vals.to(tl.int16, bitcast=True).to(tl.int32)
        bits = tl.where(bits == -32768, 0, bits)
        key = bits ^ ((bits >> 15) & 0x7FFF)
    else:
        bits = vals.to(tl.float32).to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key


@triton.jit
def _radix_threshold_kernel(Lut, Counts, Lengths, Starts, Ratio, Thr,
                            stride_lb, stride_lh, stride_lg, stride_cb, stride_ch, C,
                            HKV: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, KEY16: tl.constexpr,
                            RADIX: tl.constexpr, ITERS: tl.constexpr, KEY_MIN: tl.constexpr,
                            SPAN: tl.constexpr, SENTINEL: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    NT: tl.constexpr = 1 << RADIX
    lut = Lut + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + g * stride_lg
    cnt_row = Counts + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    n = (tl.load(Lengths + b) - tl.load(Starts + b)).to(tl.float64)
    want = (n * tl.load(Ratio)).to(tl.int32)  # floor(ratio x n) in float64, as the reference
    kth = want
    offs_t = tl.arange(0, NT)
    offs = tl.arange(0, BLOCK)
    lo = tl.full([1], KEY_MIN, tl.int64)  # invariant: count(keys >= lo) >= kth
    step = tl.full([1], SPAN, tl.int64)
    for it in tl.static_range(ITERS):
        step = step // NT
        t = (lo + offs_t.to(tl.int64) * step).to(tl.int32)  # [NT] thresholds, t[0] = lo
        acc = tl.zeros([NT, BLOCK], tl.int32)
        for c0 in range(0, C, BLOCK):
            idx = c0 + offs
            m = idx < C
            key = _order_key(tl.load(lut + idx, mask=m, other=0.0), KEY16)
            cn = tl.load(cnt_row + idx, mask=m, other=0)
            acc += tl.where(key[None, :] >= t[:, None], cn[None, :], 0)
        cnt_t = tl.sum(acc, 1)  # [NT] non-increasing
        if it == 0:
            kth = tl.minimum(want, tl.sum(tl.where(offs_t == 0, cnt_t, 0), 0))  # clipped to the candidates
        jsel = tl.sum((cnt_t >= kth).to(tl.int32), 0) - 1  # the last threshold still keeping >= kth
        lo = lo + jsel.to(tl.int64) * step
    lo = tl.where(kth > 0, lo, SENTINEL)
    tl.store(Thr + pid.to(tl.int64) * G + g + tl.arange(0, 1), lo)


@triton.jit
def _radix_union_kernel(Lut, Thr, Sel, stride_lb, stride_lh, stride_lg, stride_sb, stride_sh, C,
                        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
                        KEY16: tl.constexpr, SENTINEL: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = blk * BLOCK + tl.arange(0, BLOCK)
    gm = offs_g < G
    cm = offs_c < C
    thr = tl.load(Thr + pid.to(tl.int64) * G + offs_g, mask=gm, other=SENTINEL)
    lut = Lut + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    vals = tl.load(lut + offs_g[:, None] * stride_lg + offs_c[None, :], mask=gm[:, None] & cm[None, :], other=0.0)
    key = _order_key(vals, KEY16).to(tl.int64)
    take = (key >= thr[:, None]) & gm[:, None]
    sel = tl.max(take.to(tl.int32), 0)
    tl.store(Sel + b.to(tl.int64) * stride_sb + h * stride_sh + offs_c, sel.to(tl.int8), mask=cm)


def radix_select_launch(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                        ratio: torch.Tensor, sel: torch.Tensor, block: int | None = None,
                        num_warps: int | None = None) -> None:
    """lut: [B, Hkv, G, C] (code dim contiguous; 16-bit floats use 16-bit keys), counts: [B, Hkv, C] int32,
    lengths/starts: [B] int32, ratio: [1] float64 -> sel: [B, Hkv, C] int8 (two launches)."""
    B, Hkv, G, C = lut.shape
    key16 = lut.element_size() == 2
    bits = 16 if key16 else 32
    block = min(block or RADIX_BLOCK, max(16, triton.next_power_of_2(C)))
    num_warps = num_warps or RADIX_WARPS
    thr = torch.empty(B * Hkv * G, dtype=torch.int64, device=lut.device)
    sentinel = 1 << (bits - 1)  # above every key: keeps nothing
    _radix_threshold_kernel[(B * Hkv, G)](
        lut, counts, lengths, starts, ratio, thr,
        lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1), C,
        HKV=Hkv, G=G, BLOCK=block, KEY16=key16, RADIX=RADIX_BITS, ITERS=bits // RADIX_BITS,
        KEY_MIN=-(1 << (bits - 1)), SPAN=1 << bits, SENTINEL=sentinel, num_warps=num_warps,
    )
    ublock = min(1024, max(16, triton.next_power_of_2(C)))
    _radix_union_kernel[(B * Hkv, triton.cdiv(C, ublock))](
        lut, thr, sel, lut.stride(0), lut.stride(1), lut.stride(2), sel.stride(0), sel.stride(1), C,
        HKV=Hkv, G=G, BLOCK_G=triton.next_power_of_2(G), BLOCK=ublock, KEY16=key16, SENTINEL=sentinel,
        num_warps=4,
    )


@triton.jit
def _head_keys(Lut, Counts, Lengths, Starts, Ratio, stride_lb, stride_lh, stride_lg, stride_cb, stride_ch, C,
               HKV: tl.constexpr, BLOCK_C: tl.constexpr, KEY16: tl.constexpr):
    """Prologue of the per-query-head select kernels, grid (B * Hkv, G): the head's order keys of its table row,
    the code counts and kth = min(ratio x tokens, total count). Returns (pid, g, b, h, offs, cm, key, cnt, kth)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    offs = tl.arange(0, BLOCK_C)
    cm = offs < C
    lut = Lut + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + g * stride_lg
    cnt = tl.load(Counts + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + offs, mask=cm, other=0)
    key = _order_key(tl.load(lut + offs, mask=cm, other=0.0), KEY16)
    n = (tl.load(Lengths + b) - tl.load(Starts + b)).to(tl.float64)
    kth = tl.minimum((n * tl.load(Ratio)).to(tl.int32), tl.sum(cnt, 0))
    return pid, g, b, h, offs, cm, key, cnt, kth


@triton.jit
def _bisect_head_kernel(Lut, Counts, Lengths, Starts, Ratio, Thr, Sel,
                        stride_lb, stride_lh, stride_lg, stride_cb, stride_ch, stride_sb, stride_sh, C,
                        HKV: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr, KEY16: tl.constexpr,
                        ITERS: tl.constexpr, KEY_MIN: tl.constexpr, KEY_MAX: tl.constexpr,
                        SENTINEL: tl.constexpr, MARK: tl.constexpr):
    """grid (B * Hkv, G): one query head's kth-largest candidate key by bisection over the key range (16
    halvings for a 16-bit table, 32 for float32), scores and histogram held in registers. MARK: write 1 into
    sel (zeroed before the launch) wherever key >= threshold (the heads of a group write the same byte value:
    their union, no union launch); else write the threshold to Thr for `_radix_union_kernel`."""
    pid, g, b, h, offs, cm, key, cnt, kth = _head_keys(Lut, Counts, Lengths, Starts, Ratio, stride_lb, stride_lh,
                                                      stride_lg, stride_cb, stride_ch, C, HKV, BLOCK_C, KEY16)
    lo = tl.full([1], KEY_MIN, tl.int64)  # invariant: count(keys >= lo) >= kth
    hi = tl.full([1], KEY_MAX, tl.int64)
    for _ in range(ITERS):
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum(tl.where(key[None, :] >= mid.to(tl.int32)[:, None], cnt[None, :], 0), 1)
        ok = c >= kth
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    lo = tl.where(kth > 0, lo, SENTINEL)
    if MARK:
        take = (key.to(tl.int64)[None, :] >= lo[:, None]) & cm[None, :]
        one = tl.full([1, BLOCK_C], 1, tl.int8)
        tl.store(Sel + b.to(tl.int64) * stride_sb + h * stride_sh + offs[None, :], one, mask=take)
    else:
        tl.store(Thr + pid.to(tl.int64) * G + g + tl.arange(0, 1), lo)


@triton.jit
def _key_value(key, LUT_DTYPE: tl.constexpr, KEY16: tl.constexpr):
    """The float32 value of an order key (inverse of `_order_key`; the map is its own inverse on the bits)."""
    if KEY16:
        bits = key ^ ((key >> 15) & 0x7FFF)
        return bits.to(tl.int16).to(LUT_DTYPE, bitcast=True).to(tl.float32)
    else:
        bits = key ^ ((key >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bisect_value_kernel(Lut, Counts, Lengths, Starts, Ratio, Sel,
                         stride_lb, stride_lh, stride_lg, stride_cb, stride_ch, stride_sb, stride_sh, C,
                         HKV: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr, KEY16: tl.constexpr,
                         VALUE_PASSES: tl.constexpr, SENTINEL: tl.constexpr):
    """`_bisect_head_kernel` (MARK) with a data-bounded search: the key range starts at [min, max] of the
    head's scores, the first VALUE_PASSES splits halve the *value* interval (scores cluster in a few
    binades, where key-space halving spends passes on the exponent), the rest halve the key interval, and the
    loop stops as soon as one key is left. Any split point in (lo, hi] keeps the invariant, so the result is
    the exact kth-largest key whatever the data (at most VALUE_PASSES + 16 passes for a 16-bit table)."""
    pid, g, b, h, offs, cm, key, cnt, kth = _head_keys(Lut, Counts, Lengths, Starts, Ratio, stride_lb, stride_lh,
                                                      stride_lg, stride_cb, stride_ch, C, HKV, BLOCK_C, KEY16)
    lo = tl.min(tl.where(cm, key, 2147483647), 0).to(tl.int64)  # count(keys >= lo) = total >= kth
    hi = tl.max(tl.where(cm, key, -2147483648), 0).to(tl.int64)  # count(keys > hi) = 0 < kth (kth >= 1)
    it = tl.program_id(0) * 0  # a loop-carried int32 scalar
    while lo < hi:
        v = _key_value(lo.to(tl.int32), Lut.dtype.element_ty, KEY16) * 0.5 + \
            _key_value(hi.to(tl.int32), Lut.dtype.element_ty, KEY16) * 0.5
        v_mid = _order_key(v.to(Lut.dtype.element_ty), KEY16).to(tl.int64)
        k_mid = lo + (hi - lo + 1) // 2
        mid = tl.where(it < VALUE_PASSES, v_mid, k_mid)
        mid = tl.minimum(tl.maximum(mid, lo + 1), hi)  # a split point in (lo, hi]: progress, invariant kept
        c = tl.sum(tl.where(key >= mid.to(tl.int32), cnt, 0), 0)
        ok = c >= kth
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
        it += 1
    lo = tl.where(kth > 0, lo, SENTINEL)
    take = (key.to(tl.int64) >= lo) & cm
    tl.store(Sel + b.to(tl.int64) * stride_sb + h * stride_sh + offs, tl.full([BLOCK_C], 1, tl.int8), mask=take)


VALUE_PASSES = 10  # value-midpoint splits of `_bisect_value_kernel` before key-midpoint ones


def bisect_value_select_launch(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor,
                               starts: torch.Tensor, ratio: torch.Tensor, sel: torch.Tensor) -> None:
    """Same contract as `radix_select_launch`: a memset of sel, then `_bisect_value_kernel` (one launch)."""
    B, Hkv, G, C = lut.shape
    key16 = lut.element_size() == 2
    block_c = triton.next_power_of_2(C)
    sel.zero_()
    _bisect_value_kernel[(B * Hkv, G)](
        lut, counts, lengths, starts, ratio, sel,
        lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1), sel.stride(0),
        sel.stride(1), C, HKV=Hkv, G=G, BLOCK_C=block_c, KEY16=key16, VALUE_PASSES=VALUE_PASSES,
        SENTINEL=1 << (15 if key16 else 31), num_warps=BISECT_WARPS or max(4, min(8, block_c // 1024)),
    )


def bisect_select_launch(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                         ratio: torch.Tensor, sel: torch.Tensor, mark: bool = True) -> None:
    """Same contract as `radix_select_launch`: bisection per query head on 16-bit keys for 16-bit tables;
    mark: zero sel then let every head mark its codes (a memset + one launch), else thresholds + union."""
    B, Hkv, G, C = lut.shape
    key16 = lut.element_size() == 2
    bits = 16 if key16 else 32
    sentinel = 1 << (bits - 1)
    block_c = triton.next_power_of_2(C)
    if mark:
        sel.zero_()
        thr = sel  # unused
    else:
        thr = torch.empty(B * Hkv * G, dtype=torch.int64, device=lut.device)
    _bisect_head_kernel[(B * Hkv, G)](
        lut, counts, lengths, starts, ratio, thr, sel,
        lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1), sel.stride(0),
        sel.stride(1), C, HKV=Hkv, G=G, BLOCK_C=block_c, KEY16=key16, ITERS=bits, KEY_MIN=-(1 << (bits - 1)),
        KEY_MAX=(1 << (bits - 1)) - 1, SENTINEL=sentinel, MARK=mark,
        num_warps=BISECT_WARPS or max(4, min(8, block_c // 1024)),
    )
    if not mark:
        ublock = min(1024, max(16, block_c))
        _radix_union_kernel[(B * Hkv, triton.cdiv(C, ublock))](
            lut, thr, sel, lut.stride(0), lut.stride(1), lut.stride(2), sel.stride(0), sel.stride(1), C,
            HKV=Hkv, G=G, BLOCK_G=triton.next_power_of_2(G), BLOCK=ublock, KEY16=key16, SENTINEL=sentinel,
            num_warps=4,
        )


@triton.jit
def _band_query_kernel(Q, Cos, Sin, Out, stride_qb, stride_qh, NB, HQ: tl.constexpr, G: tl.constexpr,
                       D: tl.constexpr, BLOCK_NB: tl.constexpr):
    """grid (B * Hq,): the pre-RoPE query rotated to every band distance (float32 math, as
    `windowed_rope.band_queries`), written in Out's dtype at the row `lookup_table` multiplies:
    Out[hkv, (b * G + g) * NB + band, :]."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    hkv = hq // G
    g = hq % G
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_NB)
    nm = offs_n < NB
    half: tl.constexpr = D // 2
    q_row = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    q = tl.load(q_row + offs_d).to(tl.float32)
    q_rot = tl.load(q_row + (offs_d + half) % D).to(tl.float32)
    q_rot = tl.where(offs_d < half, -q_rot, q_rot)  # rotate_half(q) = cat(-q[D/2:], q[:D/2])
    cos = tl.load(Cos + offs_n[:, None] * D + offs_d[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
    sin = tl.load(Sin + offs_n[:, None] * D + offs_d[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
    x = q[None, :] * cos + q_rot[None, :] * sin
    B = tl.num_programs(0) // HQ
    row = hkv.to(tl.int64) * (B * G * NB) + (b * G + g) * NB + offs_n
    tl.store(Out + row[:, None] * D + offs_d[None, :], x.to(Out.dtype.element_ty), mask=nm[:, None])


def band_query_launch(q_pre: torch.Tensor, cos_nb: torch.Tensor, sin_nb: torch.Tensor, hkv: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """q_pre: [B, Hq, D] (last dim contiguous); cos_nb, sin_nb: [NB, D] float32 contiguous -> [Hkv, B * G * NB,
    D] in dtype: the band queries laid out for `lookup_table`'s bmm (one launch instead of the float32
    rotation, cast and permute copies)."""
    B, Hq, D = q_pre.shape
    NB = cos_nb.shape[0]
    G = Hq // hkv
    out = torch.empty(hkv, B * G * NB, D, dtype=dtype, device=q_pre.device)
    _band_query_kernel[(B * Hq,)](q_pre, cos_nb, sin_nb, out, q_pre.stride(0), q_pre.stride(1), NB, HQ=Hq, G=G,
                                  D=D, BLOCK_NB=max(2, triton.next_power_of_2(NB)), num_warps=1)
    return out


@triton.jit
def _assign_partial_kernel(K, Cb, HalfNorms, PVal, PIdx, Counted, Lengths, Prev,
                           stride_kb, stride_kh, stride_ch, stride_cc, stride_nh,
                           B, C, NBLK, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """grid (Hkv, cdiv(C, BLOCK_C)): k·a_c − ‖c‖²/2 of every sequence's new key for one block of codewords
    (float32, IEEE dot), reduced to the block's max and its first argmax -> PVal, PIdx [Hkv, B, NBLK].
    Program (0, 0) also hands `counted` over: Prev = Counted, Counted = Lengths (the append that follows
    reads Prev; every head of a sequence needs the old value, and this kernel finishes before it starts)."""
    h = tl.program_id(0)
    blk = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    if (h == 0) & (blk == 0):
        old = tl.load(Counted + offs_b, mask=offs_b < B, other=0)
        tl.store(Prev + offs_b, old, mask=offs_b < B)
        tl.store(Counted + offs_b, tl.load(Lengths + offs_b, mask=offs_b < B, other=0).to(tl.int64),
                 mask=offs_b < B)
    offs_c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    bm = offs_b < B
    cm = offs_c < C
    x = tl.load(K + offs_b[:, None].to(tl.int64) * stride_kb + h * stride_kh + offs_d[None, :], mask=bm[:, None],
                other=0.0).to(tl.float32)
    cb = tl.load(Cb + h.to(tl.int64) * stride_ch + offs_c[:, None].to(tl.int64) * stride_cc + offs_d[None, :],
                 mask=cm[:, None], other=0.0)
    s = tl.dot(x, tl.trans(cb), input_precision="ieee")  # [BLOCK_B, BLOCK_C]
    s = s - tl.load(HalfNorms + h * stride_nh + offs_c, mask=cm, other=0.0)[None, :]
    s = tl.where(cm[None, :], s, float("-inf"))
    best = tl.max(s, 1)
    idx = tl.argmax(s, 1) + blk * BLOCK_C
    row = (h * B + offs_b).to(tl.int64) * NBLK + blk
    tl.store(PVal + row, best, mask=bm)
    tl.store(PIdx + row, idx.to(tl.int32), mask=bm)


def assign_partial_launch(k: torch.Tensor, assign_cb: torch.Tensor, half_norms: torch.Tensor,
                          counted: torch.Tensor, lengths: torch.Tensor,
                          block_c: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k: [B, Hkv, 1, D] (any float dtype, last dim contiguous); assign_cb: [Hkv, C, D] float32; half_norms:
    [Hkv, C] float32 -> (best [Hkv, B, NBLK] float32, idx [Hkv, B, NBLK] int32): per block of codewords,
    the max assignment score and its first argmax (the code = idx at the first max over blocks); and prev
    [B] int64, the old `counted` (counted: [B] int64 is set to lengths: [B] int32)."""
    B, Hkv, _T, D = k.shape
    C = assign_cb.shape[1]
    nblk = triton.cdiv(C, block_c)
    best = torch.empty(Hkv, B, nblk, dtype=torch.float32, device=k.device)
    idx = torch.empty(Hkv, B, nblk, dtype=torch.int32, device=k.device)
    prev = torch.empty_like(counted)
    _assign_partial_kernel[(Hkv, nblk)](
        k, assign_cb, half_norms, best, idx, counted, lengths, prev, k.stride(0), k.stride(1), assign_cb.stride(0), assign_cb.stride(1),
        half_norms.stride(0), B, C, nblk, D=D, BLOCK_B=max(16, triton.next_power_of_2(B)), BLOCK_C=block_c,
        num_warps=4,
    )
    return best, idx, prev


@triton.jit
def _code_append_head_kernel(Scores, ScoreIdx, Codes, Counts, Counted, Slot, Lengths, Starts, Edges,
                             stride_sh, stride_sb, stride_cb, stride_ch, stride_nb, stride_nh,
                             NS, C, sinks, s_max, BLOCK_S: tl.constexpr, MAX_REWIND: tl.constexpr,
                             NB: tl.constexpr, BLOCK_NB: tl.constexpr, PARTIAL: tl.constexpr):
    """Scores: [Hkv, B, NS]: the C assignment scores (PARTIAL False), or per-block maxima with their
    codes in ScoreIdx (PARTIAL True, `_assign_partial_kernel`)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    code_row = Codes + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    count_row = Counts + b.to(tl.int64) * stride_nb + h.to(tl.int64) * stride_nh
    length = tl.load(Lengths + b)
    lo = tl.load(Starts + b) + sinks
    counted = tl.load(Counted + b)
    offs_i = tl.arange(0, BLOCK_NB)
    im = offs_i < NB
    edge = tl.load(Edges + offs_i, mask=im, other=0)
    # undo the steps counted beyond `length` (query L' -> L' - 1: the token at distance e_i leaves band i
    # for band i - 1; band 0: leaves the candidates), before this step's code is written
    offs_r = tl.arange(0, MAX_REWIND)
    lp = length + 1 + offs_r[:, None]  # [R, 1]
    s = lp - 1 - edge[None, :]  # [R, NB]
    out = (lp.to(tl.int64) <= counted) & (s >= lo) & im[None, :]
    c = tl.load(code_row + tl.minimum(tl.maximum(s, 0), s_max - 1), mask=out, other=0).to(tl.int32)
    band = offs_i[None, :] * C
    tl.atomic_add(count_row + band + c, tl.full(c.shape, -1, tl.int32), mask=out, sem="relaxed")
    tl.atomic_add(count_row + band - C + c, tl.full(c.shape, 1, tl.int32), mask=out & (offs_i[None, :] > 0),
                  sem="relaxed")
    counted = tl.minimum(counted, length.to(tl.int64))
    tl.debug_barrier()
    offs = tl.arange(0, BLOCK_S)
    row = h.to(tl.int64) * stride_sh + b.to(tl.int64) * stride_sb
    sc = tl.load(Scores + row + offs, mask=offs < NS, other=float("-inf"))
    j = tl.argmax(sc, 0)
    if PARTIAL:
        code = tl.load(ScoreIdx + row + j)
    else:
        code = j
    tl.store(code_row + tl.load(Slot), code.to(tl.int16))
    # one step forward, once: the token at distance e_i moves from band i - 1 (none for i = 0) to band i
    s1 = length - 1 - edge
    fwd = (counted < length.to(tl.int64)).to(tl.int32)
    add = (s1 >= lo) & im & ((s1 * 0 + fwd) != 0)  # a vector mask (the interpreter wants no broadcast)
    c1 = tl.load(code_row + tl.minimum(tl.maximum(s1, 0), s_max - 1), mask=add, other=0).to(tl.int32)
    tl.atomic_add(count_row + offs_i * C + c1, tl.full(c1.shape, 1, tl.int32), mask=add, sem="relaxed")
    tl.atomic_add(count_row + offs_i * C - C + c1, tl.full(c1.shape, -1, tl.int32), mask=add & (offs_i > 0),
                  sem="relaxed")


def code_append_head_launch(scores, codes, counts, counted, slot, lengths, starts, sinks: int,
                            edges: torch.Tensor, score_idx: torch.Tensor | None = None,
                            num_codes: int | None = None, prev: torch.Tensor | None = None) -> None:
    """Same contract as `_triton_a2ats.code_append_launch`, one program per (sequence, KV head), then
    counted = lengths (a second, tiny launch). With score_idx, scores/score_idx are the per-block maxima and
    codes of `assign_partial_launch` and num_codes is the codebook size; with prev (the old counted, handed
    over by `assign_partial_launch`, which already set counted = lengths) no second launch."""
    Hkv, B, NS = scores.shape
    C = NS if score_idx is None else int(num_codes)
    NB = edges.shape[0]
    block_s = triton.next_power_of_2(NS)
    _code_append_head_kernel[(B, Hkv)](
        scores, scores if score_idx is None else score_idx, codes, counts, counted if prev is None else prev, slot,
        lengths, starts, edges,
        scores.stride(0), scores.stride(1), codes.stride(0), codes.stride(1), counts.stride(0), counts.stride(1),
        NS, C, int(sinks), codes.shape[2], BLOCK_S=block_s, MAX_REWIND=MAX_REWIND, NB=NB,
        BLOCK_NB=max(2, triton.next_power_of_2(NB)), PARTIAL=score_idx is not None,
        num_warps=4 if block_s <= 4096 else 8,
    )
    if prev is None:
        counted.copy_(lengths)
