"""Exact attention of new tokens over cache slots, with padding and sliding-window masks (plain PyTorch).

Slots are cache positions 0..S-1; the T new queries sit at slots q_start..q_start+T-1. Slot j is visible to
query slot i iff j <= i, key_valid[j] (not padding), and i - j < window when a window is set. A query that
sees no slot (a padding query at the left edge) attends to itself, so nothing becomes NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def slot_mask(batch: int, T: int, S: int, q_start: int, key_valid: torch.Tensor | None,
              window: int | None, device: torch.device) -> torch.Tensor | None:
    """Bool mask [B or 1, 1, T, S] (True = attend), or None when plain causal attention is exact."""
    if key_valid is None and window is None and (T == 1 or q_start == 0) and q_start + T == S:
        return None
    q_slot = torch.arange(q_start, q_start + T, device=device)[:, None]
    k_slot = torch.arange(S, device=device)[None, :]
    mask = k_slot <= q_slot
    if window is not None:
        mask = mask & (q_slot - k_slot < window)
    mask = mask[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :S]
        mask = mask | (k_slot == q_slot)[None, None]
    return mask


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             is_causal: bool, scaling: float) -> torch.Tensor:
    """SDPA with grouped-query heads. q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] -> [B, Hq, T, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling)


def slot_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_start: int,
                   key_valid: torch.Tensor | None, window: int | None, scaling: float) -> torch.Tensor:
    """Attention of q: [B, Hq, T, D] (RoPE applied) over keys/values: [B, Hkv, S, D] -> [B, Hq, T, D]."""
    B, _, T, _ = q.shape
    S = keys.shape[2]
    mask = slot_mask(B, T, S, q_start, key_valid, window, q.device)
    is_causal = mask is None and T > 1
    return sdpa_gqa(q, keys, values, mask, is_causal, scaling)
