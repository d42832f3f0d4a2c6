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

Sparse outliers: two 16-bit entries (channel in the low bits, a shortened fp16 value above) per int32 word
(`pack_outliers`).

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


OUTLIERS_PER_WORD = 2  # two 16-bit sparse-outlier entries share one int32 word


def outlier_index_bits(head_dim: int) -> int:
    """Bits of an outlier entry that hold its channel (6 for head dim 64, 7 for 128, 8 for 256)."""
    return max(1, (head_dim - 1).bit_length())


def outlier_words(entries: int) -> int:
    """int32 words holding `entries` sparse outliers."""
    return -(-entries // OUTLIERS_PER_WORD)


def pack_outliers(index: torch.Tensor, value: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sparse outliers, two to an int32 word: index [..., n] in [0, head_dim), value [..., n] float ->
    words [..., ceil(n / 2)] int32.

    Entry e (16 bits) sits in bits [16 (e % 2), 16 (e % 2) + 16) of word e // 2: the low I =
    `outlier_index_bits(head_dim)` bits hold the channel, the high 16 - I bits the fp16 value with its I lowest
    mantissa bits dropped (rounded to nearest: 10 - I mantissa bits are left, a relative error of at most
    2^-(11 - I), 1/32 for head dim 64). Reading an entry is two masks and a bitcast: value bits = e & ~(2^I - 1).
    """
    if index.shape != value.shape:
        raise LmsqueezeError(f"outlier index {tuple(index.shape)} and value {tuple(value.shape)} shapes differ")
    ib = outlier_index_bits(head_dim)
    imask = (1 << ib) - 1
    bits = value.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    sign, mag = bits & 0x8000, bits & 0x7FFF
    mag = torch.minimum(mag + (1 << (ib - 1)), torch.full_like(mag, 0x7BFF)) & ~imask  # round, stay finite
    entry = sign | mag | (index.to(torch.int64) & imask)
    n = entry.shape[-1]
    if n % OUTLIERS_PER_WORD:
        entry = torch.cat([entry, entry.new_zeros(*entry.shape[:-1], 1)], -1)
    pairs = entry.reshape(*entry.shape[:-1], -1, OUTLIERS_PER_WORD)
    return _to_int32(pairs[..., 0] | (pairs[..., 1] << 16))


def unpack_outliers(words: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_outliers` (values as stored): words [..., W] -> (index int64, value float16), each
    [..., 2W]; empty entries read as index 0, value 0."""
    ib = outlier_index_bits(head_dim)
    imask = (1 << ib) - 1
    w = words.to(torch.int64) & 0xFFFFFFFF
    entry = torch.stack([w & 0xFFFF, w >> 16], -1).flatten(-2)
    low = (entry & 0xFFFF & ~imask).to(torch.int32)
    low = torch.where(low >= 2**15, low - 2**16, low).to(torch.int16)
    return entry & imask, low.view(torch.float16)
