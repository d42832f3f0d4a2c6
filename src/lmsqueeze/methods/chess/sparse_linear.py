"""Modules that `install` swaps in: an input-sparse nn.Linear and CHESS's sparse SwiGLU MLP.

Both keep the original modules (and so the very same weight tensors) inside them. The input-sparse paths
need the weights of one input channel contiguous: `install` re-lays the weights of down_proj / q_proj /
o_proj (and every linear for TEAL) *in place* as the transpose (`w.data = w.data.t().contiguous().t()`:
same values, same parameter object, column-major storage), so no second copy of any weight is kept; the
dense matmul of prefill reads the column-major weight as fast as the row-major one. Undo restores the
row-major layout.

Dispatch per call, on the number of rows R = batch x tokens:
  R <= max_kernel_rows, no autograd: the sparse kernels (Triton on CUDA, torch ops on CPU);
  otherwise (prefill, training): the same function as masked dense math (`reference`), which reads all
  weights: sparsity only saves bytes when few rows share the weight read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmsqueeze.methods.chess.kernels import MAX_KERNEL_BATCH, gate_up_sparse_triton, input_sparse_matvec
from lmsqueeze.methods.chess.reference import threshold_input


def _use_kernels(x2d: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    if x2d.shape[0] > min(max_rows, MAX_KERNEL_BATCH):
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or x2d.requires_grad):
        return False
    return x2d.device.type in ("cuda", "cpu")


def transposed_storage(w: torch.Tensor) -> bool:
    """True if w: [N, K] is stored column-major (w.t() is contiguous), as `install` lays it out."""
    return w.dim() == 2 and w.t().is_contiguous()


class SparseLinear(nn.Module):
    """y = linear(threshold(x)): inputs with |x| <= threshold are zeroed and their weight columns not read.

    Wraps `linear` (kept as a submodule, weights shared). x: [..., K] -> [..., N].
    """

    def __init__(self, linear: nn.Linear, threshold: float, max_kernel_rows: int = MAX_KERNEL_BATCH) -> None:
        super().__init__()
        self.linear = linear
        self.threshold = float(threshold)
        self.max_kernel_rows = max_kernel_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        x2d = x.reshape(-1, x.shape[-1])
        if _use_kernels(x2d, w, self.max_kernel_rows) and transposed_storage(w):
            y = input_sparse_matvec(x2d, w.t(), self.threshold, self.linear.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(threshold_input(x, self.threshold), w, self.linear.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}"


class SparseMLP(nn.Module):
    """CHESS / CATS SwiGLU FFN: y = down(a * up(x)), a = act(gate(x)) zeroed where |a_i| <= t_i.

    Wraps the original MLP's gate_proj / up_proj / down_proj (weights shared). thresholds: [I] float32
    (CATS: one value repeated). x: [..., H] -> [..., H].
    """

    def __init__(self, mlp: nn.Module, thresholds: torch.Tensor, max_kernel_rows: int = MAX_KERNEL_BATCH) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.thresholds = thresholds.float().to(mlp.gate_proj.weight.device)
        self.max_kernel_rows = max_kernel_rows
        self.silu = isinstance(mlp.act_fn, nn.SiLU) or getattr(getattr(mlp, "config", None), "hidden_act", "") in (
            "silu", "swish")

    def _fast_ok(self, x2d: torch.Tensor) -> bool:
        return (self.gate_proj.bias is None and self.up_proj.bias is None
                and _use_kernels(x2d, self.gate_proj.weight, self.max_kernel_rows)
                and transposed_storage(self.down_proj.weight)
                and self.gate_proj.weight.is_contiguous() and self.up_proj.weight.is_contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if self._fast_ok(x2d):
            wd_t = self.down_proj.weight.t()
            if x.is_cuda and self.silu:
                h = gate_up_sparse_triton(x2d, self.gate_proj.weight, self.up_proj.weight, self.thresholds)
                y = input_sparse_matvec(h, wd_t, 0.0, self.down_proj.bias)
                return y.view(*x.shape[:-1], -1)
            if not x.is_cuda:
                from lmsqueeze.methods.chess.cpu import sparse_mlp_cpu

                y = sparse_mlp_cpu(x2d, self.gate_proj.weight, self.up_proj.weight, wd_t, self.thresholds,
                                   self.act_fn, self.down_proj.bias)
                return y.view(*x.shape[:-1], -1)
        a = self.act_fn(self.gate_proj(x))
        a = torch.where(a.abs() > self.thresholds, a, torch.zeros((), dtype=a.dtype, device=a.device))
        return self.down_proj(a * self.up_proj(x))
