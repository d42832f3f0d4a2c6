"""Triton: batch-1 input-sparse GEMV with each step's tile split in two halves (imported lazily).

`_input_sparse_b1_halves_kernel`: the function, grid, x prefetch and last-program reduction of
`_input_sparse_b1_fused_kernel` (XNEXT), but the [BLOCK_K, BLOCK_N] step is loaded as two [BLOCK_K / 2, BLOCK_N]
tiles that are multiplied and added into one [BLOCK_K / 2, BLOCK_N] accumulator: 95 registers instead of 127 at
64 x 64, 2 warps (ptxas, sm_90a), so 10 programs fit per SM instead of 8, at the price of more shared-memory
exchanges per step. A GPU-sweep candidate (bench_chess_gpu.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.methods.chess._triton_sparse import _sum_partials


@triton.jit
def _w_half(W, offs_k, keep, offs_n, n_ok, stride_wk, EVICT: tl.constexpr):
    """W_t[offs_k, offs_n] for the kept rows only (masked rows issue no memory traffic)."""
    w_ptr = W + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
    if EVICT:
        w = tl.load(w_ptr, mask=keep[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptr, mask=keep[:, None] & n_ok[None, :], other=0.0)
    return w


@triton.jit
def _input_sparse_b1_halves_kernel(
    X, W, Part, Ticket, Bias, Y, K, N, k_per_split, num_splits, threshold, stride_wk, stride_ps,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, RED_SPLITS: tl.constexpr = 0,
    EVICT: tl.constexpr = False,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc2 = tl.zeros([HALF, BLOCK_N], dtype=tl.float32)
    offs_a = k_lo + tl.arange(0, HALF)
    xa_next = tl.load(X + offs_a, mask=offs_a < k_hi, other=0.0)
    xb_next = tl.load(X + offs_a + HALF, mask=offs_a + HALF < k_hi, other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_a = k0 + tl.arange(0, HALF)
        offs_b = offs_a + HALF
        xa = xa_next.to(tl.float32)
        xb = xb_next.to(tl.float32)
        xa_next = tl.load(X + offs_a + BLOCK_K, mask=offs_a + BLOCK_K < k_hi, other=0.0)
        xb_next = tl.load(X + offs_b + BLOCK_K, mask=offs_b + BLOCK_K < k_hi, other=0.0)
        keep_a = tl.abs(xa) > threshold
        keep_b = tl.abs(xb) > threshold
        wa = _w_half(W, offs_a, keep_a, offs_n, n_ok, stride_wk, EVICT)
        wb = _w_half(W, offs_b, keep_b, offs_n, n_ok, stride_wk, EVICT)
        acc2 += (tl.where(keep_a, xa, 0.0)[:, None] * wa.to(tl.float32)
                 + tl.where(keep_b, xb, 0.0)[:, None] * wb.to(tl.float32))
    acc = tl.sum(acc2, axis=0)
    tl.store(Part + pid_s * stride_ps + offs_n, acc, mask=n_ok)
    tl.debug_barrier()  # every thread's partial is written before the ticket is taken
    ticket = tl.atomic_add(Ticket + pid_n, 1, sem="acq_rel")
    if ticket == num_splits - 1:
        tot = _sum_partials(Part, offs_n, n_ok, num_splits, stride_ps, RED_SPLITS, BLOCK_N)
        if HAS_BIAS:
            tot += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, tot.to(Y.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(Ticket + pid_n, 0)
