"""Merge two partial attentions over disjoint key sets by their log-sum-exp (plain PyTorch, any device; a Triton
kernel for the output alone)."""

from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine softmax attention over key set A with attention over a disjoint key set B.

    out_a, out_b: [..., D] (each normalised over its own keys); lse_a, lse_b: [...] float32 natural-log
    sum of exp(scores) over that set (-inf for an empty set, whose out is ignored).
    Returns (out: [..., D] in out_a's dtype, lse: [...] float32) = attention over A ∪ B; both empty gives
    out = 0, lse = -inf. Elementwise only: no host synchronisation, safe inside a CUDA graph.
    """
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    denom = torch.where(total > 0, total, torch.ones_like(total))
    part_a = torch.where((w_a > 0)[..., None], out_a.float() * (w_a / denom)[..., None], 0.0)
    part_b = torch.where((w_b > 0)[..., None], out_b.float() * (w_b / denom)[..., None], 0.0)
    out = part_a + part_b
    return out.to(out_a.dtype), m + torch.log(total)


def merge_attention_outputs_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                                   lse_b: torch.Tensor, block_r: int = 32) -> torch.Tensor:
    """`merge_attention_states`' output in one Triton kernel (no lse). out_a, out_b: [..., D] contiguous, same
    shape; lse_a, lse_b: [...] float32 (contiguous). Returns [..., D] in out_a's dtype."""
    from lmsqueeze.kernels._triton_merge import _merge_pair_kernel

    D = out_a.shape[-1]
    R = out_a.numel() // D
    if out_b.shape != out_a.shape or lse_a.numel() != R or lse_b.numel() != R:
        raise LmsqueezeError(f"merge: outputs {tuple(out_a.shape)} / {tuple(out_b.shape)} and lse "
                             f"{tuple(lse_a.shape)} / {tuple(lse_b.shape)} do not match")
    out = torch.empty_like(out_a)
    _merge_pair_kernel[(-(-R // block_r),)](
        out_a.contiguous(), lse_a.float().contiguous(), out_b.contiguous(), lse_b.float().contiguous(), out, R,
        D=D, BLOCK_R=block_r, BLOCK_D=1 << (D - 1).bit_length(), num_warps=4,
    )
    return out
