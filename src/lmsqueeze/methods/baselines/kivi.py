"""KIVI-style 2/4-bit KV cache (Liu et al., 2024) in lmsqueeze's cache framework.

Keys are quantized per channel over groups of `group` consecutive tokens, values per token over groups of
`group` channels (asymmetric min/max, fp16 scale and zero per group), both post-RoPE as in the paper, with
no calibration. The most recent tokens stay in full precision: once `residual` tokens have accumulated they
are quantized together (residual must be a multiple of group) and the full-precision buffer starts over, so
between 0 and residual tokens are exact at any time. Attention dequantizes in PyTorch (quality baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Method, register_method
from lmsqueeze.methods.baselines.int_uniform import GROW, DequantState, dequantize_uniform, quantize_uniform
from lmsqueeze.methods.cache import LayerState
from lmsqueeze.methods.kvquant.pack import pack_codes, unpack_codes, words_per_row


class KIVIState(DequantState):
    """Quantized slots [0, qlen) (qlen a multiple of residual) plus a full-precision tail [qlen, length)."""

    def __init__(self, bits: int, group: int, residual: int, max_length: int | None = None) -> None:
        super().__init__(max_length)
        self.bits, self.group, self.residual = bits, group, residual
        self.qlen = 0
        self.kw = self.vw = None

    def _alloc(self, k: torch.Tensor, cap: int) -> None:
        B, H, _, D = k.shape
        if D % self.group != 0:
            raise LmsqueezeError(f"kivi groups of {self.group} channels need head_dim % {self.group} == 0, got {D}")
        z = {"device": k.device}
        self.head_dim = D
        self.kw = torch.zeros(B, H, cap, words_per_row(D, self.bits), dtype=torch.int32, **z)
        self.vw = torch.zeros_like(self.kw)
        self.ks = torch.zeros(B, H, cap // self.group, D, dtype=torch.float16, **z)    # per channel, per group
        self.kz = torch.zeros_like(self.ks)
        self.vs = torch.zeros(B, H, cap, D // self.group, dtype=torch.float16, **z)    # per token, per group
        self.vz = torch.zeros_like(self.vs)
        self.tail_k = torch.zeros(B, H, self.residual, D, dtype=k.dtype, **z)
        self.tail_v = torch.zeros_like(self.tail_k)
        self.valid = torch.zeros(B, cap, dtype=torch.bool, **z)

    def attend(self, q, k, v, step):
        if self.kw is None:
            cap = -(-max(k.shape[2], self.max_length or 0, 1) // GROW) * GROW
            self._alloc(k, cap)
        return super().attend(q, k, v, step)

    def _grow(self, needed: int) -> None:
        cap = self.kw.shape[2]
        if needed <= cap:
            return
        new_cap = -(-max(needed, 2 * cap) // GROW) * GROW
        old = {n: getattr(self, n) for n in ("kw", "vw", "ks", "kz", "vs", "vz", "tail_k", "tail_v", "valid")}
        self._alloc(old["tail_k"].new_zeros(*old["kw"].shape[:2], 1, self.head_dim), new_cap)
        for n, t in old.items():
            if n in ("tail_k", "tail_v"):
                getattr(self, n).copy_(t)
            elif n == "valid":
                self.valid[:, :t.shape[1]] = t
            else:
                getattr(self, n)[:, :, :t.shape[2]] = t

    def _store(self, k, v, start):
        """Append k, v: [B, H, T, D] to the tail; quantize every complete block of `residual` tokens."""
        T = k.shape[2]
        t = 0
        while t < T:
            pos = start + t - self.qlen                     # position inside the tail
            n = min(T - t, self.residual - pos)
            self.tail_k[:, :, pos:pos + n] = k[:, :, t:t + n]
            self.tail_v[:, :, pos:pos + n] = v[:, :, t:t + n]
            t += n
            if pos + n == self.residual:
                self._flush()

    def _flush(self) -> None:
        B, H, R, D = self.tail_k.shape
        G, s = self.group, self.qlen
        kg = self.tail_k.float().reshape(B, H, R // G, G, D).transpose(-1, -2)       # [B, H, R/G, D, G]
        codes, scale, zero = quantize_uniform(kg, self.bits)                      # per channel per group
        self.kw[:, :, s:s + R] = pack_codes(codes.transpose(-1, -2).reshape(B, H, R, D), self.bits)
        self.ks[:, :, s // G:(s + R) // G] = scale
        self.kz[:, :, s // G:(s + R) // G] = zero
        vg = self.tail_v.float().reshape(B, H, R, D // G, G)
        codes, scale, zero = quantize_uniform(vg, self.bits)                      # per token per channel group
        self.vw[:, :, s:s + R] = pack_codes(codes.reshape(B, H, R, D), self.bits)
        self.vs[:, :, s:s + R] = scale
        self.vz[:, :, s:s + R] = zero
        self.qlen += R

    def dequantize(self, end):
        B, H, _, D = self.tail_k.shape
        G, q = self.group, min(self.qlen, end)
        codes = unpack_codes(self.kw[:, :, :q], self.bits, D).reshape(B, H, q // G, G, D).transpose(-1, -2)
        k = dequantize_uniform(codes, self.ks[:, :, :q // G], self.kz[:, :, :q // G]).transpose(-1, -2)
        codes = unpack_codes(self.vw[:, :, :q], self.bits, D).reshape(B, H, q, D // G, G)
        v = dequantize_uniform(codes, self.vs[:, :, :q], self.vz[:, :, :q])
        k, v = k.reshape(B, H, q, D), v.reshape(B, H, q, D)
        tail = end - q
        if tail > 0:
            k = torch.cat([k, self.tail_k[:, :, :tail].float()], 2)
            v = torch.cat([v, self.tail_v[:, :, :tail].float()], 2)
        return k, v

    def _elements(self):
        return 0 if self.kw is None else 2 * self.kw.shape[0] * self.kw.shape[1] * self.kw.shape[2] * self.head_dim

    def crop(self, max_length: int) -> None:
        new_len = self.length + max_length if max_length < 0 else min(max_length, self.length)
        if new_len < self.qlen:
            raise LmsqueezeError(f"kivi can roll back only into its full-precision tail ({self.length - self.qlen} "
                                 "tokens)")
        super().crop(max_length)

    def reset(self):
        super().reset()
        self.qlen = 0
        if self.valid is not None:
            self.valid.zero_()


@register_method
@dataclass(slots=True)
class KIVI(Method):
    """KIVI: per-channel keys / per-token values in groups of `group`, `residual` recent tokens in full precision."""

    name: ClassVar[str] = "kivi"
    needs_calibration: ClassVar[bool] = False

    bits: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise LmsqueezeError(f"kivi bits must be 2, 3, 4 or 8 (the paper uses 2 and 4), got {self.bits}")
        if self.group < 1 or self.residual < self.group or self.residual % self.group != 0:
            raise LmsqueezeError(f"kivi needs residual a positive multiple of group; got group={self.group}, "
                                 f"residual={self.residual}")

    def new_layer_state(self, layer_idx: int, artifact, max_length: int | None = None) -> LayerState:
        return KIVIState(self.bits, self.group, self.residual, max_length)
