"""Dense: the exact baseline. Stores RoPE-rotated keys and values in preallocated buffers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.methods.base import Method, register_method
from lmsqueeze.methods.cache import LayerState, Step
from lmsqueeze.methods.slot_attention import slot_attention
from lmsqueeze.models.rope import apply_rope

GROW_BLOCK = 256


class DenseState(LayerState):
    """Full-precision K/V in buffers k, v: [B, Hkv, capacity, D]; valid: [B, capacity] marks non-padding."""

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__()
        self.max_length = max_length
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.has_padding = False

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, k: torch.Tensor, needed: int) -> None:
        """Grow the buffers (outside any graph) so they hold `needed` slots. k: [B, Hkv, T, D] sets the layout."""
        if needed <= self.capacity:
            return
        B, H, _, D = k.shape
        cap = max(needed, self.max_length or 0, 2 * self.capacity)
        cap = -(-cap // GROW_BLOCK) * GROW_BLOCK
        new_k = k.new_zeros(B, H, cap, D)
        new_v = k.new_zeros(B, H, cap, D)
        new_valid = torch.ones(B, cap, dtype=torch.bool, device=k.device)
        if self.k is not None:
            n = self.length
            new_k[:, :, :n] = self.k[:, :, :n]
            new_v[:, :, :n] = self.v[:, :, :n]
            new_valid[:, :n] = self.valid[:, :n]
        self.k, self.v, self.valid = new_k, new_v, new_valid
        self.is_initialized = True

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> int:
        """Write k, v: [B, Hkv, T, D] (RoPE applied) after the current length; return the start slot."""
        start, T = self.length, k.shape[2]
        self.reserve(k, start + T)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        if valid is not None:
            self.valid[:, start:start + T] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        else:
            self.valid[:, start:start + T] = True
        self.length = start + T
        return start

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        if step.slot is not None and q.is_cuda:
            return self.attend_static_cuda(q, k, v, step)
        q = apply_rope(q, step.cos, step.sin)
        k = apply_rope(k, step.cos, step.sin)
        if step.slot is not None:
            return self.attend_static(q, k, v, step)
        start = self.append(k, v, step.valid)
        end = self.length
        valid = self.valid[:, :end] if self.has_padding else None
        return slot_attention(q, self.k[:, :, :end], self.v[:, :, :end], start, valid, step.window, step.scaling)

    def attend_static_cuda(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """One token per sequence, lengths on the device: graph-capturable. q: [B, Hq, 1, D] pre-RoPE.

        One fused launch rotates q/k and writes k/v at `step.slot`; the Triton decode kernel then reads the
        filled slots [starts, lengths). The Python-side length is advanced by the caller
        (`SqueezeCache.advance_host`), not here.
        """
        from lmsqueeze.kernels.decode_attention import decode_attention
        from lmsqueeze.kernels.rope_append import rope_append

        q_rot = rope_append(q, k, v, step.cos, step.sin, self.k, self.v, step.slot)
        out = decode_attention(q_rot, self.k, self.v, step.lengths, step.scaling, starts=step.starts,
                               window=step.window)
        return out[:, :, None]

    def attend_static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """The CPU form of the static step (no graphs): q, k rotated; SDPA over the slots filled so far."""
        self.k.index_copy_(2, step.slot, k)
        self.v.index_copy_(2, step.slot, v)
        n = self.length + 1
        valid = self.valid[:, :n] if self.has_padding else None
        return slot_attention(q, self.k[:, :, :n], self.v[:, :, :n], n - 1, valid, step.window, step.scaling)

    def reset(self) -> None:
        super().reset()
        self.has_padding = False


@register_method
@dataclass(slots=True)
class Dense(Method):
    """The exact baseline: reproduces unpatched transformers' logits."""

    name: ClassVar[str] = "dense"
    needs_calibration: ClassVar[bool] = False

    def new_layer_state(self, layer_idx: int, artifact, max_length: int | None = None) -> LayerState:
        return DenseState(max_length)
