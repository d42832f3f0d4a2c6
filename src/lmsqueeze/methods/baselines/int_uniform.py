"""Uniform intN KV cache quantized per token (the usual "int4 / int3" baseline), in lmsqueeze's cache framework.

Post-RoPE keys and values are quantized per (token, head) with an asymmetric min/max range (fp16 scale and
zero) into packed 2/3/4/8-bit codes (`kvquant.pack`). No calibration. Attention dequantizes the stored
tokens in PyTorch (the chunk being prefilled attends to itself in full precision, like KVQuant); it measures
quality, not speed.

`DequantState` here is also the base of the KIVI baseline: a state that stores whatever its quantizer packs
and attends over `dequantize(end)` with the padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Method, register_method
from lmsqueeze.methods.cache import LayerState, Step, tensor_bytes
from lmsqueeze.methods.kvquant.pack import pack_codes, unpack_codes, words_per_row
from lmsqueeze.methods.slot_attention import slot_attention
from lmsqueeze.models.rope import apply_rope

GROW = 256


def quantize_uniform(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over the last dim. x: [..., n] -> (codes int64, scale [...] fp16, zero fp16)."""
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(2.0**-14).to(torch.float16)
    zero = lo.to(torch.float16)
    codes = ((x - zero.float()[..., None]) / scale.float()[..., None]).round().clamp_(0, levels).long()
    return codes, scale, zero


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[..., None] + zero.float()[..., None]


class DequantState(LayerState):
    """A quantized cache attended by dequantizing in PyTorch. Subclasses implement `_store` / `dequantize`.

    Slots are cache positions (padding included, marked in `valid`); keys are stored post-RoPE.
    """

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__()
        self.max_length = max_length
        self.valid: torch.Tensor | None = None  # [B, capacity] bool

    def _store(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Quantize and write k (rotated), v: [B, H, T, D] at slots [start, start + T)."""
        raise NotImplementedError

    def dequantize(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, end) -> keys, values [B, H, end, D] float32."""
        raise NotImplementedError

    def _grow(self, needed: int) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        q = apply_rope(q, step.cos, step.sin)
        k = apply_rope(k, step.cos, step.sin)
        B, _, T, _ = k.shape
        if step.slot is not None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise LmsqueezeError(f"the {type(self).__name__} baseline has no graph-capturable decode; "
                                 "generate with use_graph=False")
        start = self.length  # static decode outside a graph: the host length is current
        self._grow(start + T)
        valid = step.valid if step.valid is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
        self.valid[:, start:start + T] = valid
        end = start + T
        if T == 1:  # decode: append, then attend over the quantized cache (the new token included)
            self._store(k, v, start)
            keys, vals = self.dequantize(end)
            out = slot_attention(q, keys.to(q.dtype), vals.to(q.dtype), start, self._mask(end), step.window,
                                 step.scaling)
        else:  # prefill: the chunk in full precision over itself and the dequantized past
            past_k, past_v = self.dequantize(start)
            keys = torch.cat([past_k.to(k.dtype), k], 2)
            vals = torch.cat([past_v.to(v.dtype), v], 2)
            out = slot_attention(q, keys, vals, start, self._mask(end), step.window, step.scaling)
            self._store(k, v, start)
        if step.slot is None:
            self.length = end
        return out

    def _mask(self, end: int) -> torch.Tensor | None:
        m = self.valid[:, :end]
        return None if bool(m.all()) else m

    def memory_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in vars(self).values())

    def bits_per_element(self) -> float:
        """Allocated bits per K/V element at the allocated capacity (codes and metadata)."""
        n = self._elements()
        return 8 * self.memory_bytes() / n if n else 0.0

    def _elements(self) -> int:
        raise NotImplementedError


class IntUniformState(DequantState):
    """Per-token uniform codes: words [B, H, cap, W] int32 and fp16 scale / zero [B, H, cap] for K and V."""

    def __init__(self, bits: int, max_length: int | None = None) -> None:
        super().__init__(max_length)
        self.bits = bits
        self.kw = self.vw = self.ks = self.kz = self.vs = self.vz = None

    def _grow(self, needed: int) -> None:
        cap = self.kw.shape[2]
        if needed <= cap:
            return
        new_cap = -(-max(needed, 2 * cap) // GROW) * GROW
        n = self.length
        for name in ("kw", "vw", "ks", "kz", "vs", "vz"):
            t = getattr(self, name)
            new = t.new_zeros((*t.shape[:2], new_cap, *t.shape[3:]))
            new[:, :, :n] = t[:, :, :n]
            setattr(self, name, new)
        valid = torch.zeros(self.valid.shape[0], new_cap, dtype=torch.bool, device=self.valid.device)
        valid[:, :n] = self.valid[:, :n]
        self.valid = valid

    def attend(self, q, k, v, step):
        if self.kw is None:
            B, H, T, D = k.shape
            cap = -(-max(T, self.max_length or 0, 1) // GROW) * GROW
            W = words_per_row(D, self.bits)
            self.kw = torch.zeros(B, H, cap, W, dtype=torch.int32, device=k.device)
            self.vw = torch.zeros_like(self.kw)
            self.ks, self.kz, self.vs, self.vz = (torch.zeros(B, H, cap, dtype=torch.float16, device=k.device)
                                                  for _ in range(4))
            self.valid = torch.zeros(B, cap, dtype=torch.bool, device=k.device)
            self.head_dim = D
        return super().attend(q, k, v, step)

    def _store(self, k, v, start):
        T = k.shape[2]
        for x, w, s, z in ((k, self.kw, self.ks, self.kz), (v, self.vw, self.vs, self.vz)):
            codes, scale, zero = quantize_uniform(x, self.bits)
            w[:, :, start:start + T] = pack_codes(codes, self.bits)
            s[:, :, start:start + T] = scale
            z[:, :, start:start + T] = zero

    def dequantize(self, end):
        D = self.head_dim
        k = dequantize_uniform(unpack_codes(self.kw[:, :, :end], self.bits, D), self.ks[:, :, :end], self.kz[:, :, :end])
        v = dequantize_uniform(unpack_codes(self.vw[:, :, :end], self.bits, D), self.vs[:, :, :end], self.vz[:, :, :end])
        return k, v

    def _elements(self):
        return 0 if self.kw is None else 2 * self.kw.shape[0] * self.kw.shape[1] * self.kw.shape[2] * self.head_dim

    def reset(self):
        super().reset()
        if self.valid is not None:
            self.valid.zero_()


@register_method
@dataclass(slots=True)
class IntUniform(Method):
    """Per-token uniform intN keys (post-RoPE) and values, min/max per (token, head), no calibration."""

    name: ClassVar[str] = "int-uniform"
    needs_calibration: ClassVar[bool] = False

    bits: int = 4

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise LmsqueezeError(f"int-uniform bits must be 2, 3, 4 or 8, got {self.bits}")

    def new_layer_state(self, layer_idx: int, artifact, max_length: int | None = None) -> LayerState:
        return IntUniformState(self.bits, max_length)
