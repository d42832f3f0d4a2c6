"""Merge two partial attentions over disjoint key sets by their log-sum-exp (plain PyTorch, any device)."""

from __future__ import annotations

import torch


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
