"""Rotary position embedding helpers (the same rotation as transformers' `apply_rotary_pos_emb`)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (halves, not interleaved)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, T, D] by cos, sin: [B, T, D] (broadcast over heads)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_tables(rotary, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [B, T, D] for positions: [B, T], from a model's rotary embedding (`model.model.rotary_emb`)."""
    dummy = torch.empty(0, dtype=dtype, device=positions.device)
    return rotary(dummy, positions)
