"""Per-channel key and per-token value quantizers with dense-and-sparse outliers (plain PyTorch).

Keys (pre-RoPE) are normalised per channel with ranges fixed offline: x = (k - z_c) / s_c. Values are
normalised per (token, head) with ranges computed online after setting aside that vector's outliers.
Codes index the layer's codebook. Every (token, head) vector keeps `n_out` sparse outliers: the residual
`x - dequant(code)` (fp16 with the lowest mantissa bits dropped) plus its channel index in 16 bits, two to an
int32 word (see `pack.pack_outliers`); empty entries hold index 0 and value 0. Keys' outliers are the largest
excursions outside the calibrated range (at most `n_out` per vector; others are clamped), values' are the
elements farthest from the vector's median.

Dequantisation, exactly as the kernel computes it (up to one fp16 rounding):
    key   = level[code] * r[token, h] * s16[h, d] + zeff[h, d]   (s16 = fp16(s * grid), zeff from an fp16
            offset; r = 1 unless token_scale, then one byte per (token, head): `token_scale_codes`)
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


TSCALE_STEPS = 16      # key token scales: r = 2^(code / 16 - 8), code uint8 (1/16-octave steps, 2^-8 .. 2^7.9)
TSCALE_OFFSET = 8.0


def token_scale_codes(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Per-vector key scale codes (uint8 [...]) for keys normalised per channel, x: [..., D]: the smallest
    r = 2^(code / 16 - 8) with |x| <= r on every channel except the n_out largest (the outlier candidates)."""
    a = x.abs()
    if n_out > 0:
        a = a.scatter(-1, a.topk(n_out, dim=-1).indices, 0.0)
    need = a.amax(-1).clamp_min(2.0**-TSCALE_OFFSET)
    code = torch.ceil((torch.log2(need) + TSCALE_OFFSET) * TSCALE_STEPS - 1e-4)
    return code.clamp(0, 255).to(torch.uint8)


def token_scales(codes: torch.Tensor) -> torch.Tensor:
    """uint8 scale codes [...] -> r [...] float32."""
    return torch.exp2(codes.float() / TSCALE_STEPS - TSCALE_OFFSET)


@dataclass
class KeyQuantizer:
    """One layer's key quantizer. lower/upper: [Hkv, D] calibrated per-channel range (outliers outside).

    token_scale: each (token, head) vector also gets a scale r (one byte, `token_scale_codes`) that divides its
    per-channel-normalised values before the codebook lookup, so a vector with small values uses the levels'
    resolution and one with values beyond the ranges is not clipped: key = level * r * s + z.
    """

    codebook: Codebook
    lower: torch.Tensor
    upper: torch.Tensor
    n_out: int
    token_scale: bool = False

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
        return KeyQuantizer(cb, self.lower.to(device), self.upper.to(device), self.n_out, self.token_scale)

    def dequantize(self, codes: torch.Tensor, tscale: torch.Tensor | None = None) -> torch.Tensor:
        """codes: [B, H, T, D], tscale: [B, H, T] uint8 or None -> keys [B, H, T, D] float32 (no outliers)."""
        lv = self.levels.to(codes.device)[codes]
        if tscale is not None:
            lv = lv * token_scales(tscale)[..., None]
        return lv * self.s16.float()[:, None, :] + self.zeff[:, None, :]

    def quantize(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k: [B, H, T, D] pre-RoPE -> (packed codes [B, H, T, W] int32, outliers [B, H, T, n_out / 2] int32,
        token scale codes [B, H, T] uint8 or None)."""
        k = k.float()
        s16, zeff = self.s16.float()[:, None, :], self.zeff[:, None, :]
        x = (k - zeff) / s16 * self.codebook.grid  # normalised: inliers in [-1, 1]
        tscale = token_scale_codes(x, self.n_out) if self.token_scale else None
        y = x if tscale is None else x / token_scales(tscale)[..., None]
        codes = self.codebook.nearest(y)
        packed = pack_codes(codes, self.codebook.bits)
        if self.n_out == 0:
            return packed, k.new_zeros(*k.shape[:-1], 0, dtype=torch.int32), tscale
        D = k.shape[-1]
        mag, idx = y.abs().topk(self.n_out, dim=-1)
        resid = (k - self.dequantize(codes, tscale)).gather(-1, idx)
        keep = mag > 1.0
        out = pack_outliers(torch.where(keep, idx, 0), torch.where(keep, resid, 0.0), D)
        return packed, out, tscale


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


def dequantize_keys(kq: KeyQuantizer, words: torch.Tensor, outliers: torch.Tensor, head_dim: int,
                    tscale: torch.Tensor | None = None) -> torch.Tensor:
    """Packed keys [B, H, S, W] + outliers (+ token scale codes [B, H, S]) -> pre-RoPE keys [B, H, S, D] float32."""
    codes = unpack_codes(words, kq.codebook.bits, head_dim)
    return add_outliers(kq.dequantize(codes, tscale), outliers)


def dequantize_values(vq: ValueQuantizer, words: torch.Tensor, outliers: torch.Tensor, s16: torch.Tensor,
                      z16: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Packed values [B, H, S, W] + outliers + per-token scale/zero [B, H, S] -> values [B, H, S, D] float32."""
    codes = unpack_codes(words, vq.codebook.bits, head_dim)
    return add_outliers(vq.dequantize(codes, s16, z16), outliers)
