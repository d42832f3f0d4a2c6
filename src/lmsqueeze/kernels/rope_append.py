"""Fused decode prologue: rotate q and k by RoPE and write k, v into a static cache slot, in one launch.

Replaces about fourteen small kernels per layer (rotate_half, multiplies, adds, two index_copy) in the
captured decode step, where launch gaps, not bytes, dominated. Triton on CUDA, the reference elsewhere.
"""

from __future__ import annotations

import torch

from lmsqueeze.models.rope import apply_rope


def rope_append_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot: torch.Tensor) -> torch.Tensor:
    """q: [B, Hq, 1, D], k, v: [B, Hkv, 1, D] (pre-RoPE); cos, sin: [B, 1, D]; caches [B, Hkv, S, D];
    slot: [1] int64. Writes RoPE(k) and v at `slot`; returns RoPE(q): [B, Hq, D]."""
    k_cache.index_copy_(2, slot, apply_rope(k, cos, sin))
    v_cache.index_copy_(2, slot, v)
    return apply_rope(q, cos, sin)[:, :, 0]


def rope_append(q, k, v, cos, sin, k_cache, v_cache, slot) -> torch.Tensor:
    """Same contract as `rope_append_reference`; Triton on CUDA (math in fp32, rounded like the reference)."""
    if not q.is_cuda:
        return rope_append_reference(q, k, v, cos, sin, k_cache, v_cache, slot)
    return rope_append_triton(q, k, v, cos, sin, k_cache, v_cache, slot)


def rope_append_triton(q, k, v, cos, sin, k_cache, v_cache, slot) -> torch.Tensor:
    from lmsqueeze.kernels._triton_small import rope_append_kernel

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    assert T == 1 and D % 2 == 0 and k.shape == v.shape == (B, Hkv, 1, D), (q.shape, k.shape, v.shape)
    assert cos.shape == sin.shape == (B, 1, D) and k_cache.shape[:2] == (B, Hkv) and k_cache.shape[3] == D
    for t in (q, k, v, cos, sin, k_cache, v_cache):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    q_out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    half = D // 2
    rope_append_kernel[(B, Hq + Hkv)](
        q, k, v, cos, sin, k_cache, v_cache, slot, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ=Hq, HALF=half, BLOCK=triton_next_pow2(half),
    )
    return q_out


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
