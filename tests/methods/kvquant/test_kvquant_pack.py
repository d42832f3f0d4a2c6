"""Bit packing: round trips, exact sizes, the documented bit layouts, outlier words."""

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.kvquant.pack import (
    pack_codes,
    pack_outliers,
    unpack_codes,
    unpack_outliers,
    words_per_row,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pack_round_trip(bits, head_dim):
    codes = torch.randint(0, 2**bits, (3, 2, 5, head_dim))
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape[-1] == words_per_row(head_dim, bits) == head_dim * bits // 32
    assert words.numel() * 4 * 8 == codes.numel() * bits  # exactly `bits` bits per code, nothing padded
    assert torch.equal(unpack_codes(words, bits, head_dim), codes)


def test_bit_layouts():
    D = 64
    c = torch.zeros(D, dtype=torch.long)
    c[9] = 3  # 2-bit: channel 16*0 + 9 -> nibble 1, bits [6, 8)
    assert int(pack_codes(c, 2)[0]) == 3 << 6
    c = torch.zeros(D, dtype=torch.long)
    c[5] = 0b101  # 3-bit: low bits 0b01 at nibble 5 of word 0; high bit at bit 4*5 + 0 of the high word (4)
    w = pack_codes(c, 3)
    assert int(w[0]) == 1 << 20 and int(w[4]) == 1 << 20 and int(w.abs().sum()) == 2 << 20
    c = torch.zeros(D, dtype=torch.long)
    c[11] = 0xF  # 4-bit: word 1, nibble 3
    assert int(pack_codes(c, 4)[1]) == 0xF << 12


def test_bad_inputs():
    with pytest.raises(LmsqueezeError, match="multiple of 32"):
        words_per_row(48, 3)
    with pytest.raises(LmsqueezeError, match="packed widths"):
        pack_codes(torch.zeros(64, dtype=torch.long), 5)


@pytest.mark.parametrize("head_dim, mant", [(64, 4), (128, 3), (256, 2)])
def test_outlier_words(head_dim, mant):
    """Two entries a word; channels exact, values fp16 rounded to `mant` mantissa bits; odd counts padded."""
    g = torch.Generator().manual_seed(head_dim)
    idx = torch.randint(0, head_dim, (4, 9), generator=g)
    val = torch.randn(4, 9, generator=g) * 50
    words = pack_outliers(idx, val, head_dim)
    assert words.dtype == torch.int32 and words.shape == (4, 5)
    i, v = unpack_outliers(words, head_dim)
    assert torch.equal(i[:, :9], idx) and torch.equal(i[:, 9], torch.zeros(4, dtype=torch.long))
    assert float(v[:, 9].abs().max()) == 0.0
    rel = ((v[:, :9].float() - val) / val).abs()
    assert float(rel.max()) <= 2.0 ** -(mant + 1) + 1e-3  # round to nearest: half a unit in the last place
    assert float(rel.max()) > 2.0 ** -(mant + 4)           # and really shortened (not stored at full fp16)
    # the documented layout: entry 1 of word 0 in its high half, channel in the low bits
    w = pack_outliers(torch.tensor([3, 5]), torch.tensor([0.0, 1.0]), 64)
    assert int(w[0]) == 3 | ((0x3C00 | 5) << 16)
