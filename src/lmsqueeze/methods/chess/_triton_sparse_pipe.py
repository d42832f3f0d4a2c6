"""Triton: batch-1 input-sparse GEMV with the weight loads of later steps in flight (imported lazily).

`_input_sparse_b1_pipe_kernel`, grid (cdiv(N, BLOCK_N), num_splits): y = threshold(x) @ W_t for x: [1, K],
W_t: [K, N], the same tiles and the same last-program ticket reduction as `_input_sparse_b1_fused_kernel`.
The difference is the order of requests. In the fused kernel every step is a chain x load -> keep mask -> W
load -> multiply-add, so each program has at most one W tile in flight and waits a full x latency
before each one. Here the loop is software-pipelined by hand: the x tile of step i + DEPTH + 1 and the W
tile of step i + DEPTH (its mask comes from an x tile that already arrived) are requested before the
multiply-adds of step i, so DEPTH + 1 W tiles per program are in flight and the x latency is hidden.
Tiles past the program's K range are fully masked (no memory traffic), which drains the pipeline.

Measured (benchmarks/results/chess_gpu_h100_v4.json, H100, down_proj 14336 -> 4096 bf16, 50%): correct, but
every tile config tried was slower than the fused kernel in the same run (best 30.4 us, BLOCK 64 x 32, DEPTH
2, vs 27.9 us), so it is not among the runtime autotuner's candidates; kept for later sweeps.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmsqueeze.methods.chess._triton_sparse import _sum_partials


@triton.jit
def _x_b1(X, k0, k_hi, threshold, BLOCK_K: tl.constexpr):
    """x[k0:k0+BLOCK_K] as float32 with dropped / out-of-range entries 0, and the keep mask."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(X + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
    keep = tl.abs(x) > threshold
    return tl.where(keep, x, 0.0), keep


@triton.jit
def _w_b1(W, k0, keep, offs_n, n_ok, stride_wk, BLOCK_K: tl.constexpr):
    """W_t[k0:k0+BLOCK_K, offs_n] for the kept rows only (masked rows issue no memory traffic)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(W + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                   mask=keep[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _input_sparse_b1_pipe_kernel(
    X, W, Part, Ticket, Bias, Y, K, N, k_per_split, num_splits, threshold, stride_wk, stride_ps,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr, HAS_BIAS: tl.constexpr,
    RED_SPLITS: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    if DEPTH == 1:
        x_a, keep_a = _x_b1(X, k_lo, k_hi, threshold, BLOCK_K)
        w_a = _w_b1(W, k_lo, keep_a, offs_n, n_ok, stride_wk, BLOCK_K)
        x_b, keep_b = _x_b1(X, k_lo + BLOCK_K, k_hi, threshold, BLOCK_K)
        for k0 in range(k_lo + BLOCK_K, k_hi + BLOCK_K, BLOCK_K):  # trip i consumes step i, issues i + 1
            w_b = _w_b1(W, k0, keep_b, offs_n, n_ok, stride_wk, BLOCK_K)
            x_c, keep_c = _x_b1(X, k0 + BLOCK_K, k_hi, threshold, BLOCK_K)
            acc2 += x_a[:, None] * w_a.to(tl.float32)
            x_a = x_b
            w_a = w_b
            x_b = x_c
            keep_b = keep_c
    else:  # DEPTH == 2
        x_a, keep_a = _x_b1(X, k_lo, k_hi, threshold, BLOCK_K)
        w_a = _w_b1(W, k_lo, keep_a, offs_n, n_ok, stride_wk, BLOCK_K)
        x_b, keep_b = _x_b1(X, k_lo + BLOCK_K, k_hi, threshold, BLOCK_K)
        w_b = _w_b1(W, k_lo + BLOCK_K, keep_b, offs_n, n_ok, stride_wk, BLOCK_K)
        x_c, keep_c = _x_b1(X, k_lo + 2 * BLOCK_K, k_hi, threshold, BLOCK_K)
        for k0 in range(k_lo + 2 * BLOCK_K, k_hi + 2 * BLOCK_K, BLOCK_K):  # consumes step i, issues i + 2
            w_c = _w_b1(W, k0, keep_c, offs_n, n_ok, stride_wk, BLOCK_K)
            x_d, keep_d = _x_b1(X, k0 + BLOCK_K, k_hi, threshold, BLOCK_K)
            acc2 += x_a[:, None] * w_a.to(tl.float32)
            x_a = x_b
            w_a = w_b
            x_b = x_c
            w_b = w_c
            x_c = x_d
            keep_c = keep_d
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
