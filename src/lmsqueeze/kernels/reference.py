"""Plain-PyTorch references of the shared decode-attention kernels (float32 math; CPU or GPU).

These define what the Triton kernels compute; `decode_attention` dispatches here for CPU tensors.
"""

from __future__ import annotations

import torch


def decode_valid_mask(lengths: torch.Tensor, s_max: int, starts: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Bool [B, s_max]: slot j is attended iff max(start, length - window) <= j < length.

    lengths, starts: [B] int (device tensors); window: None = unlimited.
    """
    slots = torch.arange(s_max, device=lengths.device)[None, :]
    hi = lengths.long()[:, None]
    mask = slots < hi
    if starts is not None:
        mask = mask & (slots >= starts.long()[:, None])
    if window is not None:
        mask = mask & (slots >= hi - window)
    return mask


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, scaling: float, starts: torch.Tensor | None = None,
                               window: int | None = None, num_splits: int | None = None,
                               return_lse: bool = False):
    """One decode query per sequence over a slot cache, exact float32 math.

    q: [B, Hq, D] (RoPE applied); k_cache, v_cache: [B, Hkv, S_max, D]; lengths: [B] int = filled slots;
    starts: [B] int or None = first valid slot; window: attend only slots >= lengths - window.
    Hq = G * Hkv; query head h uses KV head h // G. num_splits is ignored (same signature as the kernel).
    Returns out: [B, Hq, D] in q's dtype, and lse: [B, Hq] float32 natural-log (-inf, with out = 0,
    where a sequence has no valid slot) when return_lse.
    """
    del num_splits
    B, Hq, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    mask = decode_valid_mask(lengths, s_max, starts, window)  # [B, S]
    qf = q.float().reshape(B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qf, k_cache.float()) * scaling
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]; -inf where no slot is valid
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - lse_safe[..., None])
    out = torch.einsum("bhgs,bhsd->bhgd", p, v_cache.float()).reshape(B, Hq, D).to(q.dtype)
    if return_lse:
        return out, lse.reshape(B, Hq)
    return out
