"""CPU sparse GEMVs: native C + OpenMP loops (`cpu_native.py`, built at first use) where a C compiler exists,
else vectorised, multithreaded torch ops (same results):

- Input-sparse (down, q, o): y = sum_k x_k W_t[k, :] over the nonzero k is exactly an `embedding_bag`
  with `per_sample_weights` (fused gather + weighted sum, vectorised; parallel over bags). One bag per
  (batch row, K-split) lets both cores work: the nonzero indices are cut into `splits` contiguous groups,
  each bag sums its group's rows, and the partials are added. Only the needed rows of W_t are read, once.
- Output-sparse (up): the needed rows of W_up are gathered (`index_select`, parallel memcpy of contiguous
  rows) into a cache-sized buffer chunk by chunk and multiplied by x, so the gathered copy stays in cache
  and DRAM traffic is about the needed rows only. (The copy costs about as much as a dense GEMV on a CPU, so
  this fallback barely beats dense; the native `rows_dot` reads the surviving rows in place.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmsqueeze.methods.chess import cpu_native
from lmsqueeze.methods.chess.reference import threshold_input

CHUNK_BYTES = 4 << 20  # gathered up-rows per chunk (stays in the last-level cache)
BAGS_PER_THREAD = 4


def union_rows(keep: torch.Tensor) -> torch.Tensor:
    """Indices (int64, ascending) of the columns of keep: [B, C] that are True in some row."""
    return keep.any(0).nonzero().squeeze(1)


def rows_weighted_sum_cpu(w_t: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, splits: int | None = None
                          ) -> torch.Tensor:
    """y[b] = sum_j coef[b, j] * w_t[idx[j], :]. w_t: [K, N] contiguous rows; idx: [n]; coef: [B, n] -> [B, N]."""
    B, n = coef.shape
    N = w_t.shape[1]
    if n == 0:
        return torch.zeros(B, N, dtype=w_t.dtype)
    if cpu_native.supports(w_t, B):
        return cpu_native.rows_axpy(w_t, idx, coef).to(w_t.dtype)
    if splits is None:
        splits = BAGS_PER_THREAD * torch.get_num_threads()
    P = max(1, min(splits, n))
    starts = torch.arange(P) * n // P  # P contiguous groups of indices per batch row
    offsets = (torch.arange(B)[:, None] * n + starts[None, :]).reshape(-1)
    indices = idx.repeat(B) if B > 1 else idx
    out = F.embedding_bag(indices, w_t, offsets, mode="sum", per_sample_weights=coef.to(w_t.dtype).reshape(-1))
    return out.view(B, P, N).sum(1) if P > 1 else out


def rows_matvec_cpu(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = x @ w[idx]^T without reading the other rows. w: [R, C] contiguous rows; idx: [n]; x: [B, C] -> [B, n]."""
    n, C = idx.numel(), w.shape[1]
    out = torch.empty(x.shape[0], n, dtype=w.dtype)
    if n == 0:
        return out
    if cpu_native.supports(w, x.shape[0]):
        return cpu_native.rows_dot(w, idx, x).to(w.dtype)
    chunk = max(16, CHUNK_BYTES // (C * w.element_size()))
    buf = torch.empty(min(chunk, n), C, dtype=w.dtype)
    xw = x.to(w.dtype)
    for s in range(0, n, chunk):
        rows = idx[s:s + chunk]
        b = buf[: rows.numel()]
        torch.index_select(w, 0, rows, out=b)
        torch.mm(xw, b.t(), out=out[:, s:s + rows.numel()])
    return out


def input_sparse_matvec_cpu(x: torch.Tensor, w_t: torch.Tensor, threshold: float = 0.0,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = threshold(x) @ w_t (+ bias), reading only the rows of w_t of surviving inputs. x: [B, K] -> [B, N]."""
    x = threshold_input(x, threshold)
    idx = union_rows(x != 0)
    y = rows_weighted_sum_cpu(w_t, idx, x[:, idx])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def gate_up_compact_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, thresholds: torch.Tensor,
                        act=F.silu) -> tuple[torch.Tensor, torch.Tensor]:
    """The surviving FFN channels and their h = act(gate) * up. x: [B, H]; w_gate, w_up: [I, H]; t: [I].

    Returns idx: [n] (channels alive in some row) and h: [B, n] (zero where a row's channel is dropped).
    The gate is computed densely (it decides the mask); only the rows idx of w_up are read.
    """
    a = act(F.linear(x, w_gate))
    keep = a.abs() > thresholds
    idx = union_rows(keep)
    u = rows_matvec_cpu(w_up, idx, x)
    a_idx = a[:, idx]
    h = torch.where(keep[:, idx], a_idx * u.to(a.dtype), torch.zeros((), dtype=a.dtype))
    return idx, h


def gate_up_sparse_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, thresholds: torch.Tensor
                       ) -> torch.Tensor:
    """Dense-shaped h: [B, I] of `gate_up_compact_cpu` (for tests and the generic dispatch)."""
    idx, h_c = gate_up_compact_cpu(x, w_gate, w_up, thresholds)
    h = torch.zeros(x.shape[0], w_gate.shape[0], dtype=h_c.dtype)
    h[:, idx] = h_c
    return h.to(x.dtype)


def sparse_mlp_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                   thresholds: torch.Tensor, act=F.silu, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """CHESS/CATS FFN on the CPU: y = W_down (act(gate) * up) with dropped channels never read.

    x: [B, H]; w_gate, w_up: [I, H]; w_down_t: [I, H_out] (transposed down weight); thresholds: [I] -> [B, H_out].
    """
    idx, h = gate_up_compact_cpu(x, w_gate, w_up, thresholds, act)
    y = rows_weighted_sum_cpu(w_down_t, idx, h)
    if down_bias is not None:
        y = y + down_bias
    return y.to(x.dtype)
