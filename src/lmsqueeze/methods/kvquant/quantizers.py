"""Per-channel key and per-token value quantizers with dense-and-sparse outliers (plain PyTorch).

Keys (pre-RoPE) are normalised per channel with ranges fixed offline: x = (k - z_c) / s_c. Values are
normalised per (token, head) with ranges computed online after setting aside that vector's outliers.
Codes index the layer's codebook. Every (token, head) vector keeps `n_out` sparse outliers: the residual
`x - dequant(code)` (fp16 with the lowest mantissa bits dropped) plus its channel index in 16 bits, two to an
int32 word (see `pack.pack_outliers`); empty entries hold index 0 and value 0. Keys' outliers are the largest
excursions outside the calibrated range (at most `n_out` per vector; others are clamped), values' are the
elements farthest from the vector's median.

Dequantisation, exactly as the kernel computes it (up to one fp16 rounding):
    key   = level[code] * s16[h, d] + zeff[h, d]       (s16 = fp16(s * grid), zeff from an fp16 offset)
    value = level[code] * vs16[token, h] + vz16[token, h]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.methods.kvquant.codebooks import Codebook
from lmsqueeze.methods.kvquant.pack import (
    OUTLIERS_PER_WORD,
    outlier_words,
    pack_codes,
    pack_outliers,
    unpack_codes,
    unpack_outliers,
)

MAGIC = 1152.0  # the kernel's fp16 byte trick yields 1024 + (level + 128) = level + 1152
FP16_TINY = 2.0**-14  # smallest normal fp16: scales never go below it


def outlier_slots(fraction: float, head_dim: int) -> int:
    """Sparse outlier entries per (token, head) vector: round(fraction * head_dim), at least 1 if fraction > 0,
    rounded up to fill whole words (two entries a word: the second entry of a word costs nothing)."""
    if fraction <= 0:
        return 0
    return OUTLIERS_PER_WORD * outlier_words(max(1, round(fraction * head_dim)))


@dataclass
class KeyQuantizer:
    """One layer's key quantizer. lower/upper: [Hkv, D] calibrated per-channel range (outliers outside)."""

    codebook: Codebook
    lower: torch.Tensor
    upper: torch.Tensor
    n_out: int

    def __post_init__(self) -> None:
        lower, upper = self.lower.float(), self.upper.float()
        s = ((upper - lower) / 2).clamp_min(1e-8)
        z = (upper + lower) / 2
        self.s16 = (s * self.codebook.grid).clamp_min(FP16_TINY).to(torch.float16)
        self.z16 = (z - MAGIC * self.s16.float()).to(torch.float16)  # the kernel's fp16 offset
        self.zeff = self.z16.float() + MAGIC * self.s16.float()
        self.levels = self.codebook.levels.float()

    def to(self, device) -> KeyQuantizer:
        cb = Codebook(self.codebook.levels.to(device), self.codebook.grid)
        return KeyQuantizer(cb, self.lower.to(device), self.upper.to(device), self.n_out)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, H, T, D] -> keys [B, H, T, D] float32 (no outliers)."""
        lv = self.levels.to(codes.device)[codes]
        return lv * self.s16.float()[:, None, :] + self.zeff[:, None, :]

    def quantize(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k: [B, H, T, D] pre-RoPE -> (packed codes [B, H, T, W] int32, outliers [B, H, T, n_out / 2] int32)."""
        k = k.float()
        s16, zeff = self.s16.float()[:, None, :], self.zeff[:, None, :]
        x = (k - zeff) / s16 * self.codebook.grid  # normalised: inliers in [-1, 1]
        codes = self.codebook.nearest(x)
        packed = pack_codes(codes, self.codebook.bits)
        if self.n_out == 0:
            return packed, k.new_zeros(*k.shape[:-1], 0, dtype=torch.int32)
        D = k.shape[-1]
        mag, idx = x.abs().topk(self.n_out, dim=-1)
        resid = (k - self.dequantize(codes)).gather(-1, idx)
        keep = mag > 1.0
        out = pack_outliers(torch.where(keep, idx, 0), torch.where(keep, resid, 0.0), D)
        return packed, out


@dataclass
class ValueQuantizer:
    """One layer's value quantizer: per-(token, head) ranges online, `n_out` outliers per vector."""

    codebook: Codebook
    n_out: int

    def __post_init__(self) -> None:
        self.levels = self.codebook.levels.float()

    def to(self, device) -> ValueQuantizer:
        return ValueQuantizer(Codebook(self.codebook.levels.to(device), self.codebook.grid), self.n_out)

    def quantize(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """v: [B, H, T, D] -> (packed codes [B,H,T,W] int32, outliers [B,H,T,n_out / 2] int32,
        scale [B, H, T] fp16, zero [B, H, T] fp16)."""
        v = v.float()
        if self.n_out > 0:
            med = v.median(dim=-1, keepdim=True).values
            idx = (v - med).abs().topk(self.n_out, dim=-1).indices
            inlier = torch.ones_like(v, dtype=torch.bool).scatter_(-1, idx, False)
        else:
            idx, inlier = None, None
        hi = v if inlier is None else torch.where(inlier, v, -torch.inf)
        lo = v if inlier is None else torch.where(inlier, v, torch.inf)
        u, l = hi.amax(-1), lo.amin(-1)
        s16 = ((u - l) / 2 * self.codebook.grid).clamp_min(FP16_TINY).to(torch.float16)
        z16 = ((u + l) / 2).to(torch.float16)
        x = (v - z16.float()[..., None]) / s16.float()[..., None] * self.codebook.grid
        codes = self.codebook.nearest(x)
        packed = pack_codes(codes, self.codebook.bits)
        if idx is None:
            return packed, v.new_zeros(*v.shape[:-1], 0, dtype=torch.int32), s16, z16
        deq = self.dequantize(codes, s16, z16)
        resid = (v - deq).gather(-1, idx)
        return packed, pack_outliers(idx, resid, v.shape[-1]), s16, z16

    def dequantize(self, codes: torch.Tensor, s16: torch.Tensor, z16: torch.Tensor) -> torch.Tensor:
        """codes: [B, H, T, D]; s16, z16: [B, H, T] -> values [B, H, T, D] float32 (no outliers)."""
        lv = self.levels.to(codes.device)[codes]
        return lv * s16.float()[..., None] + z16.float()[..., None]


def add_outliers(x: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """x: [..., D] dequantised; outliers: [..., n_out / 2] packed int32 -> x with the residuals added."""
    if outliers.shape[-1] == 0:
        return x
    idx, val = unpack_outliers(outliers, x.shape[-1])
    return x.scatter_add(-1, idx, val.float())


def dequantize_keys(kq: KeyQuantizer, words: torch.Tensor, outliers: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Packed keys [B, H, S, W] + outliers -> pre-RoPE keys [B, H, S, D] float32."""
    codes = unpack_codes(words, kq.codebook.bits, head_dim)
    return add_outliers(kq.dequantize(codes), outliers)


def dequantize_values(vq: ValueQuantizer, words: torch.Tensor, outliers: torch.Tensor, s16: torch.Tensor,
                      z16: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Packed values [B, H, S, W] + outliers + per-token scale/zero [B, H, S] -> values [B, H, S, D] float32."""
    codes = unpack_codes(words, vq.codebook.bits, head_dim)
    return add_outliers(vq.dequantize(codes, s16, z16), outliers)
