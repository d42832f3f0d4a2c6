"""Bit packing of 2/3/4/8-bit codes into int32 words, one row of words per (token, head).

Codes are packed along the channel (head) dimension, so one token's D codes are a row of
`words_per_row(D, bits)` int32 words, and any token can be read or written on its own. The bit layouts are
chosen so the decode kernel can turn a word into byte-permute selectors with one or two masks:

- 4 bits, 8 codes a word: channel 8w + j sits in bits [4j, 4j+4) of word w.
- 2 bits, 16 codes a word: channel 16w + i (i < 8) sits in bits [4i, 4i+2), channel 16w + 8 + i in bits
  [4i+2, 4i+4) (so `w & 0x33333333` gives eight nibble-aligned codes, `(w >> 2) & 0x33333333` the other eight).
- 3 bits, 32 codes in 3 words (exactly 3 bits a code): the low two bits of every code in the 2-bit layout
  (D/16 words), followed by the high bits (D/32 words): channel 32u + 8m + i has its high bit at bit 4i + m of
  high word u. For the 16 channels of low word w, `m = 2 * (w % 2) + k` (k = 0 for its first eight).
- 8 bits, 4 codes a word: channel 4w + j in bits [8j, 8j+8) (reference path only).

Bytes per element are exactly bits / 8: nothing is padded (D must be a multiple of 32, and of 64 for the
decode kernel, which unpacks each half of the head separately for RoPE).
"""

from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError

PACKED_BITS = (2, 3, 4, 8)


def check_packable(head_dim: int, bits: int) -> None:
    """Raise LmsqueezeError unless `bits` codes of a `head_dim` row pack into whole words."""
    if bits not in PACKED_BITS:
        raise LmsqueezeError(f"cannot pack {bits}-bit codes; packed widths are {PACKED_BITS}")
    if head_dim % 32 != 0:
        raise LmsqueezeError(f"packed KV codes need a head dim that is a multiple of 32, got {head_dim}")


def words_per_row(head_dim: int, bits: int) -> int:
    """int32 words holding one token's `head_dim` codes."""
    check_packable(head_dim, bits)
    return head_dim * bits // 32


def _bit_offsets(head_dim: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(word index, bit offset) of each channel's code (3-bit: of its low two bits) and the field width."""
    c = torch.arange(head_dim, device=device)
    if bits in (4, 8):
        per = 32 // bits
        return c // per, (c % per) * bits, bits
    # 2-bit layout (also the low bits of 3-bit codes)
    s = c % 16
    return c // 16, torch.where(s < 8, 4 * s, 4 * (s - 8) + 2), 2


def _high_bit_offsets(head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """3-bit codes: (word index after the low words, bit offset) of each channel's high bit."""
    c = torch.arange(head_dim, device=device)
    r = c % 32
    return head_dim // 16 + c // 32, 4 * (r % 8) + r // 8


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [..., D] integers in [0, 2^bits) -> words: [..., words_per_row(D, bits)] int32."""
    D = codes.shape[-1]
    W = words_per_row(D, bits)
    codes = codes.to(torch.int64)
    out = torch.zeros(*codes.shape[:-1], W, dtype=torch.int64, device=codes.device)
    word, off, width = _bit_offsets(D, bits, codes.device)
    low = codes & ((1 << width) - 1)
    out.index_add_(-1, word, low << off)
    if bits == 3:
        hword, hoff = _high_bit_offsets(D, codes.device)
        out.index_add_(-1, hword, ((codes >> 2) & 1) << hoff)
    return _to_int32(out)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """words: [..., W] int32 -> codes: [..., head_dim] int64 (inverse of `pack_codes`)."""
    if words.shape[-1] != words_per_row(head_dim, bits):
        raise LmsqueezeError(f"{words.shape[-1]} words do not hold {head_dim} {bits}-bit codes")
    w = words.to(torch.int64) & 0xFFFFFFFF
    word, off, width = _bit_offsets(head_dim, bits, words.device)
    codes = (w[..., word] >> off) & ((1 << width) - 1)
    if bits == 3:
        hword, hoff = _high_bit_offsets(head_dim, words.device)
        codes = codes | (((w[..., hword] >> hoff) & 1) << 2)
    return codes


def pack_outliers(index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One int32 per sparse outlier: channel index in the high 16 bits, the fp16 value's bits in the low 16.

    index: [...] integer in [0, 65536); value: [...] float (stored as fp16). Returns [...] int32.
    """
    v16 = value.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    return _to_int32((index.to(torch.int64) << 16) | v16)


def unpack_outliers(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_outliers`: (index int64, value float16)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    low = (w & 0xFFFF).to(torch.int32)
    low = torch.where(low >= 2**15, low - 2**16, low).to(torch.int16)
    return w >> 16, low.view(torch.float16)
