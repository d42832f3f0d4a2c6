"""RoPE as the decode kernel applies it to stored pre-RoPE keys: inverse frequencies and one output scale.

This is the same rotation as transformers' rotary embeddings for the rope types whose frequencies do not
depend on the sequence length (default, linear, llama3, yarn): cos/sin of `position * inv_freq` (fp32), times
`attention_scaling`, over the two halves of the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError

LENGTH_DEPENDENT = ("dynamic", "longrope")


@dataclass
class KernelRope:
    """inv_freq: [D/2] float32; scale: the rotary module's attention_scaling."""

    inv_freq: torch.Tensor
    scale: float = 1.0

    @classmethod
    def from_rotary(cls, rotary, device=None) -> KernelRope:
        """Read a transformers rotary embedding module (refuses rope types whose frequencies change)."""
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in LENGTH_DEPENDENT:
            raise LmsqueezeError(f"kvquant re-applies RoPE from fixed frequencies; rope type {rope_type!r} "
                                 "changes them with the length: use a model with default/linear/llama3/yarn RoPE")
        inv = rotary.inv_freq.detach().float()
        return cls(inv.to(device) if device is not None else inv, float(getattr(rotary, "attention_scaling", 1.0)))

    def tables(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] -> cos, sin: [B, T, D] (both halves), like `rope_tables`."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
