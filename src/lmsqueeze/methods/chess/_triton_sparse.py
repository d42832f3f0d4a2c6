"""Triton kernels of CHESS's sparse GEMVs. Imported lazily (this module needs triton).

`_input_sparse_kernel`, grid (cdiv(N, BLOCK_N), num_splits): y = threshold(x) @ W_t for x: [B, K] and the
transposed weight W_t: [K, N] (row k = the weights of input channel k, contiguous). Each program owns
BLOCK_N outputs and one contiguous K range; a weight row is loaded only if some x[b, k] survives the
threshold (masked loads issue no memory traffic), so bytes read scale with the union density. It writes
float32 partials [num_splits, B, N]; `_reduce_kernel` sums them, adds the bias and casts.

`_gate_up_kernel`, grid (cdiv(I, BLOCK_I),): h = silu(x W_gate^T) * (x W_up^T), zeroed where
|silu(gate)| <= t_i. The gate rows are read densely (they decide the mask); an up row is read only if its
channel survives for some batch row. No partials: each program finishes its BLOCK_I channels.

`_input_sparse_b1_fused_kernel`, same grid, batch 1 only: the same tile loop, then the last program of each
column block to finish (an atomic ticket per block) sums the partials, adds the bias and writes y, and resets
its ticket to 0 for the next call: one launch instead of two, no host synchronisation (graph-safe). With
RED_SPLITS > 0 that last program requests all partials of its block as one tile (one L2 round trip instead
of num_splits dependent ones at the very end of the kernel). EVICT marks the weight loads evict-first. XNEXT: each step
requests the next step's x before its own W tile, so the x load is off the step's critical path.

`_input_sparse_b1_compact_kernel`, same grid, batch 1 only: each program first compacts the indices of the
surviving inputs of its K range (a prefix sum per scan tile, written to a scratch list shared by the programs
of that range, which all write the same values), then walks only that list: every W tile it loads is full
(no masked-off rows, half the loop trips at 50%), and the fused kernel's ticket reduction finishes it.

BLOCK_B == 1 uses broadcast-multiply-and-sum into a 2D accumulator (reduced once at the end), optionally
software-pipelined (PREFETCH); BLOCK_B >= 16 uses tl.dot over the padded batch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _x_tile(X, offs_b, b_ok, offs_k, k_hi, stride_xb, threshold):
    """x[b, k] for the tile (0 outside [.., k_hi) and where |x| <= threshold) and the union row mask."""
    k_ok = offs_k < k_hi
    x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                other=0.0).to(tl.float32)
    keep = tl.abs(x) > threshold
    x = tl.where(keep, x, 0.0)
    need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: union over the batch
    return x, need


@triton.jit
def _input_sparse_kernel(
    X, W, Part, B, K, N, k_per_split, threshold,
    stride_xb, stride_wk, stride_ps, stride_pb,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_DOT: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)  # BLOCK_B == 1: reduce over k once, at the end
    if PREFETCH:
        # Software pipeline (BLOCK_B == 1): the x and W tiles of step i + 1 are requested before step i's
        # multiply-adds, so two W tiles are in flight per program (the x -> mask -> W dependency otherwise
        # leaves the memory system idle between steps). The tile past k_hi is fully masked: no traffic.
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        x_c, need_c = _x_tile(X, offs_b, b_ok, offs_k, k_hi, stride_xb, threshold)
        w_c = tl.load(W + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                      mask=need_c[:, None] & n_ok[None, :], other=0.0)
        for k0 in range(k_lo + BLOCK_K, k_hi + BLOCK_K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_n, need_n = _x_tile(X, offs_b, b_ok, offs_k, k_hi, stride_xb, threshold)
            w_n = tl.load(W + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                          mask=need_n[:, None] & n_ok[None, :], other=0.0)
            acc2 += tl.sum(x_c, axis=0)[:, None] * w_c.to(tl.float32)
            x_c = x_n
            w_c = w_n
        acc += tl.sum(acc2, axis=0)[None, :]
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x, need = _x_tile(X, offs_b, b_ok, offs_k, k_hi, stride_xb, threshold)
            w = tl.load(W + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                        mask=need[:, None] & n_ok[None, :], other=0.0)
            if BLOCK_B == 1:
                acc2 += tl.sum(x, axis=0)[:, None] * w.to(tl.float32)
            else:
                if IEEE_DOT:
                    acc += tl.dot(x, w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(x.to(w.dtype), w)
        if BLOCK_B == 1:
            acc += tl.sum(acc2, axis=0)[None, :]
    tl.store(Part + pid_s * stride_ps + offs_b[:, None] * stride_pb + offs_n[None, :], acc,
             mask=b_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_partials(Part, offs_n, n_ok, num_splits, stride_ps, RED_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over s < num_splits of Part[s, offs_n] (float32). RED_SPLITS == 0: one split per loop trip (each
    trip waits for its load: num_splits L2 round trips); else RED_SPLITS >= num_splits (a power of 2): all
    partials requested as one [RED_SPLITS, BLOCK_N] tile, one round trip."""
    if RED_SPLITS == 0:
        tot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in range(num_splits):
            tot += tl.load(Part + s * stride_ps + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
    else:
        offs_s = tl.arange(0, RED_SPLITS)
        p = tl.load(Part + offs_s[:, None] * stride_ps + offs_n[None, :],
                    mask=(offs_s < num_splits)[:, None] & n_ok[None, :], other=0.0, cache_modifier=".cg")
        tot = tl.sum(p, axis=0)
    return tot


@triton.jit
def _input_sparse_b1_fused_kernel(
    X, W, Part, Ticket, Bias, Y, K, N, k_per_split, num_splits, threshold, stride_wk, stride_ps,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, RED_SPLITS: tl.constexpr = 0,
    EVICT: tl.constexpr = False, XNEXT: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    x_next = tl.load(X + offs_k, mask=offs_k < k_hi, other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if XNEXT:  # this step's x arrived during the last step; request the next step's before this W tile
            x = x_next.to(tl.float32)
            x_next = tl.load(X + offs_k + BLOCK_K, mask=offs_k + BLOCK_K < k_hi, other=0.0)
        else:
            x = tl.load(X + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        keep = tl.abs(x) > threshold
        w_ptr = W + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
        if EVICT:  # each weight byte is read once: keep x and the partials in L2 instead
            w = tl.load(w_ptr, mask=keep[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptr, mask=keep[:, None] & n_ok[None, :], other=0.0)
        acc2 += tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32)
    acc = tl.sum(acc2, axis=0)
    tl.store(Part + pid_s * stride_ps + offs_n, acc, mask=n_ok)
    tl.debug_barrier()  # every thread's partial is written before the ticket is taken
    ticket = tl.atomic_add(Ticket + pid_n, 1, sem="acq_rel")
    if ticket == num_splits - 1:  # the last program of this column block: sum the partials
        tot = _sum_partials(Part, offs_n, n_ok, num_splits, stride_ps, RED_SPLITS, BLOCK_N)
        if HAS_BIAS:
            tot += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, tot.to(Y.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(Ticket + pid_n, 0)


@triton.jit
def _input_sparse_b1_compact_kernel(
    X, W, Part, Ticket, Bias, Y, Idx, K, N, k_per_split, num_splits, threshold, stride_wk, stride_ps,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    base = Idx + k_lo
    count = tl.sum(tl.zeros([SCAN], dtype=tl.int32), axis=0)
    for k0 in range(k_lo, k_hi, SCAN):  # compaction: the surviving k of this range, in order
        offs = k0 + tl.arange(0, SCAN)
        x = tl.load(X + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
        keep = (tl.abs(x) > threshold).to(tl.int32)
        pos = count + tl.cumsum(keep, axis=0) - 1
        tl.store(base + pos, offs, mask=keep > 0)
        count += tl.sum(keep, axis=0)
    tl.debug_barrier()  # this program's index writes are visible to all its threads
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, count, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        j_ok = offs_j < count
        k = tl.load(base + offs_j, mask=j_ok, other=0)
        xv = tl.load(X + k, mask=j_ok, other=0.0).to(tl.float32)
        w = tl.load(W + k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :], mask=j_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc2 += xv[:, None] * w.to(tl.float32)
    acc = tl.sum(acc2, axis=0)
    tl.store(Part + pid_s * stride_ps + offs_n, acc, mask=n_ok)
    tl.debug_barrier()
    ticket = tl.atomic_add(Ticket + pid_n, 1, sem="acq_rel")
    if ticket == num_splits - 1:
        tot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in range(num_splits):
            tot += tl.load(Part + s * stride_ps + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            tot += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, tot.to(Y.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(Ticket + pid_n, 0)


@triton.jit
def _reduce_kernel(Part, Bias, Y, N, num_splits, stride_ps, stride_pb, stride_yb,
                   HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(Part + s * stride_ps + b * stride_pb + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + b * stride_yb + offs, acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gate_up_kernel(
    X, WG, WU, T, Hout, B, H, I,
    stride_xb, stride_wg, stride_wu, stride_hb,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < I
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    rows_g = WG + offs_i.to(tl.int64)[:, None] * stride_wg
    rows_u = WU + offs_i.to(tl.int64)[:, None] * stride_wu

    g = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
    g2 = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)  # BLOCK_B == 1: reduce over h once, at the end
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        x = tl.load(X + offs_b[:, None] * stride_xb + offs_h[None, :], mask=b_ok[:, None] & h_ok[None, :],
                    other=0.0)
        w = tl.load(rows_g + offs_h[None, :], mask=i_ok[:, None] & h_ok[None, :], other=0.0)
        if BLOCK_B == 1:
            g2 += w.to(tl.float32) * x.to(tl.float32)
        else:
            if IEEE_DOT:
                g += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                g += tl.dot(x.to(w.dtype), tl.trans(w))
    if BLOCK_B == 1:
        g += tl.sum(g2, axis=1)[None, :]

    a = g * tl.sigmoid(g)
    t = tl.load(T + offs_i, mask=i_ok, other=float("inf"))
    keep = (tl.abs(a) > t[None, :]) & b_ok[:, None]
    a = tl.where(keep, a, 0.0)
    need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_I]: union over the batch

    u = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
    u2 = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)
    if tl.max(need.to(tl.int32), axis=0) > 0:
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            x = tl.load(X + offs_b[:, None] * stride_xb + offs_h[None, :], mask=b_ok[:, None] & h_ok[None, :],
                        other=0.0)
            w = tl.load(rows_u + offs_h[None, :], mask=need[:, None] & h_ok[None, :], other=0.0)
            if BLOCK_B == 1:
                u2 += w.to(tl.float32) * x.to(tl.float32)
            else:
                if IEEE_DOT:
                    u += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                else:
                    u += tl.dot(x.to(w.dtype), tl.trans(w))
        if BLOCK_B == 1:
            u += tl.sum(u2, axis=1)[None, :]
    h = a * u
    tl.store(Hout + offs_b[:, None] * stride_hb + offs_i[None, :], h.to(Hout.dtype.element_ty),
             mask=b_ok[:, None] & i_ok[None, :])
