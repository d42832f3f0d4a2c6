"""Triton kernels of split-K decode attention (flash-decoding). Imported lazily: this module needs triton.

Kernel 1 (`_decode_split_kernel`), grid (B * Hkv, num_splits): one program holds all G query heads of one
KV group, splits the valid slot range [lo, hi) of its sequence into num_splits equal chunks (chunk bounds
computed on the device from `lengths` / `starts`, so the grid is static while the work follows the real
length), runs an online softmax over its chunk in BLOCK_N tiles and writes a partial (out, lse).
Kernel 2 (`_merge_splits_kernel`), grid (B * Hq, D blocks; one here): merges the num_splits partials by log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _group_query(Q, b, hkv, stride_qb, stride_qh, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """The G query heads of KV head hkv, sequence b, and a fresh online-softmax state: (offs_g, heads [BLOCK_G],
    g_mask, offs_d [BLOCK_D], d_mask, q [BLOCK_G, BLOCK_D], m_i = -inf, l_i = 0 [BLOCK_G], acc = 0 [BLOCK_G,
    BLOCK_D] float32). Q: [B, Hq, D] with a contiguous last dim."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = hkv * G + offs_g  # query heads of this KV group
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    return offs_g, heads, g_mask, offs_d, d_mask, q, m_i, l_i, acc


@triton.jit
def _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, split, num_splits, g_mask, d_mask, offs_d,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Split `split` of num_splits: the normalised output and log-sum-exp (natural log; -inf where no key was seen)
    of query heads `heads` of sequence b from the online-softmax state (m_i, l_i in log2 units, acc) into MidO
    [B, Hq, num_splits, D] float32 contiguous / MidLse [B, Hq, num_splits]."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (b * HKV * G + heads).to(tl.int64) * num_splits + split
    tl.store(MidO + row[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + row, lse, mask=g_mask)


@triton.jit
def _decode_split_kernel(
    Q, K, V, Lengths, Starts, MidO, MidLse,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    scale_log2, window, s_max, num_splits,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_STARTS: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV

    # Valid slots of this sequence: [lo, hi); this program's share: [c_lo, c_hi).
    hi = tl.minimum(tl.load(Lengths + b), s_max)
    lo = hi * 0
    if HAS_STARTS:
        lo = tl.load(Starts + b)
    if HAS_WINDOW:
        lo = tl.maximum(lo, hi - window)
    lo = tl.maximum(lo, 0)
    n = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    c_lo = lo + split * chunk
    c_hi = tl.minimum(c_lo + chunk, hi)

    offs_n = tl.arange(0, BLOCK_N)
    _offs_g, heads, g_mask, offs_d, d_mask, q, m_i, l_i, acc = _group_query(Q, b, hkv, stride_qb, stride_qh, G, D,
                                                                             BLOCK_G, BLOCK_D)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    for start_n in range(c_lo, c_hi, BLOCK_N):
        slots = start_n + offs_n
        n_mask = slots < c_hi
        if BLOCK_D == D:  # no head-dim mask: keeps the loads 16-byte vectorised
            kv_mask = n_mask[:, None]
        else:
            kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))  # [BLOCK_G, BLOCK_N], log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every visited tile has a valid slot
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    _store_partial(MidO, MidLse, m_i, l_i, acc, b, heads, split, num_splits, g_mask, d_mask, offs_d, HKV, G, D)


@triton.jit
def _pdl_prologue(PDL: tl.constexpr):
    """Programmatic dependent launch (kernels launched with launch_pdl=True, Hopper+): wait until the previous
    grid has completed and its writes are visible, then let the next grid's programs be scheduled early (they
    wait the same way), so the launch gap between small kernels is hidden. No-op when PDL is False."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _merge_splits_kernel(
    MidO, MidLse, Out, Lse, stride_ob, stride_oh, num_splits,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Grid (B * Hq, cdiv(D, BLOCK_D)): each program merges BLOCK_D dims of one head (the split weights are
    recomputed by every program: num_splits floats); the first writes the merged log-sum-exp."""
    _pdl_prologue(PDL)
    pid = tl.program_id(0)  # = b * HQ + h
    dblk = tl.program_id(1)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < D
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(MidLse + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # 0 for empty splits
    total = tl.sum(w, 0)
    o = tl.load(MidO + (base + offs_s)[:, None] * D + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :] & (w > 0)[:, None], other=0.0)  # empty splits: not read
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=d_mask)
    if WRITE_LSE:
        if dblk == 0:
            tl.store(Lse + pid, tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


def decode_attention_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            lengths: torch.Tensor, scaling: float, starts: torch.Tensor | None,
                            window: int | None, num_splits: int, return_lse: bool, block_n: int,
                            num_warps: int, num_stages: int):
    """Launch both kernels; inputs already validated by `decode_attention_triton`. No host sync."""
    B, Hq, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    mid_o = torch.empty((B, Hq, num_splits, D), device=q.device, dtype=torch.float32)
    mid_lse = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(D)
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, lengths, starts if starts is not None else lengths, mid_o, mid_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        float(scaling) * _LOG2E, int(window or 0), s_max, num_splits,
        HKV=Hkv, G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_STARTS=starts is not None, HAS_WINDOW=window is not None, IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq), device=q.device, dtype=torch.float32) if return_lse else mid_lse
    _merge_splits_kernel[(B * Hq,)](
        mid_o, mid_lse, out, lse, out.stride(0), out.stride(1), num_splits,
        HQ=Hq, D=D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        WRITE_LSE=return_lse, num_warps=4 if num_splits * block_d <= 8192 else 8,
    )
    return (out, lse) if return_lse else out
