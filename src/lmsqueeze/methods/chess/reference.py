"""Plain PyTorch references of the sparse kernels (float32 accumulation, like the kernels).

The kernels in `kernels.py` (Triton, GPU) and `cpu.py` (torch ops, CPU) compute these same functions while
reading only the weight rows that the nonzero activations need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def threshold_input(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with entries |x| <= threshold set to zero (compared in float32, like the kernels). x: any shape."""
    return torch.where(x.float().abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def input_sparse_matvec_reference(x: torch.Tensor, w_t: torch.Tensor, threshold: float = 0.0,
                                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = threshold(x) @ w_t (+ bias).

    x: [B, K]; w_t: [K, N] (the transposed weight of an nn.Linear(K, N)); bias: [N] or None -> y: [B, N]
    in x's dtype. Row k of w_t is read only if some x[b, k] survives the threshold.
    """
    y = threshold_input(x, threshold).float() @ w_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gate_up_sparse_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                             thresholds: torch.Tensor) -> torch.Tensor:
    """h = a * (x @ w_up^T) where a = silu(x @ w_gate^T), zeroed where |a| <= thresholds (per channel).

    x: [B, H]; w_gate, w_up: [I, H]; thresholds: [I] (or a scalar) -> h: [B, I] in x's dtype.
    Row i of w_up is read only if some a[b, i] survives its threshold.
    """
    g = x.float() @ w_gate.float().t()
    a = F.silu(g)
    keep = a.abs() > thresholds.float()
    u = x.float() @ w_up.float().t()
    return torch.where(keep, a * u, torch.zeros((), device=x.device)).to(x.dtype)
