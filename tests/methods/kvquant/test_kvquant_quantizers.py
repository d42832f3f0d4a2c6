"""Datatypes, quantizers (dense-and-sparse), and the cache's storage accounting."""

import pytest
import torch

from lmsqueeze.methods.kvquant import layout
from lmsqueeze.methods.kvquant.codebooks import (
    Histogram,
    fit_codebook,
    normalfloat_codebook,
    uniform_codebook,
    weighted_kmeans,
)
from lmsqueeze.methods.kvquant.quantizers import (
    KeyQuantizer,
    ValueQuantizer,
    dequantize_keys,
    dequantize_values,
    outlier_slots,
    token_scales,
)


def test_codebooks():
    for bits in (2, 3, 4):
        for cb in (uniform_codebook(bits), normalfloat_codebook(bits)):
            v = cb.values
            assert v.numel() == 2**bits and torch.all(v[1:] >= v[:-1]) and v.abs().max() <= 1.0001
            assert torch.equal(cb.levels, cb.levels.round()) and cb.levels.abs().max() <= 127
    assert (normalfloat_codebook(4).values == 0).any()
    assert torch.equal(uniform_codebook(3).nearest(torch.tensor([-1.0, 0.99, 0.05])), torch.tensor([0, 7, 4]))


def test_weighted_kmeans_follows_the_weights():
    x = torch.rand(20000) * 2 - 1
    h_plain, h_heavy = Histogram(), Histogram()
    h_plain.add(x, torch.ones_like(x))
    h_heavy.add(x, torch.where(x > 0.5, 100.0, 1.0))   # sensitive values near the top of the range
    plain, heavy = weighted_kmeans(h_plain, 8), weighted_kmeans(h_heavy, 8)
    assert (heavy > 0.5).sum() > (plain > 0.5).sum()
    assert torch.allclose(plain, torch.linspace(-0.875, 0.875, 8), atol=0.03)  # uniform data: uniform centroids


def test_qnorm_matches_mean_and_std():
    x = torch.randn(50000).clamp(-1, 1) * 0.6
    h = Histogram()
    h.add(x, torch.ones_like(x))
    cb = fit_codebook("nuq", 2, h, use_qnorm=True)
    r = cb.values[cb.nearest(x)]
    assert abs(float(r.mean() - x.mean())) < 0.02 and abs(float(r.std() - x.std())) < 0.03


def test_key_outliers_kept_exactly():
    g = torch.Generator().manual_seed(0)
    kq = KeyQuantizer(uniform_codebook(3), -torch.ones(2, 64), torch.ones(2, 64), n_out=1)
    k = torch.rand(1, 2, 5, 64, generator=g) * 2 - 1
    k[0, 0, 3, 17] = 9.0                      # far outside the calibrated range
    words, out, _ = kq.quantize(k)
    rec = dequantize_keys(kq, words, out, 64)
    assert abs(float(rec[0, 0, 3, 17]) - 9.0) <= 9.0 * 2**-5  # the residual keeps 4 mantissa bits at D = 64
    inl = torch.ones_like(k, dtype=torch.bool)
    inl[0, 0, 3, 17] = False
    assert (rec - k)[inl].abs().max() <= 1 / 7 + 1e-2  # half a step of uniform 3-bit over [-1, 1]


def test_value_outliers_and_token_ranges():
    g = torch.Generator().manual_seed(1)
    vq = ValueQuantizer(uniform_codebook(4), n_out=2)
    v = torch.randn(2, 3, 7, 64, generator=g)
    v[1, 2, 4, 5] = -30.0
    words, out, s16, z16 = vq.quantize(v)
    rec = dequantize_values(vq, words, out, s16, z16, 64)
    assert abs(float(rec[1, 2, 4, 5]) + 30.0) <= 31.0 * 2**-5
    step = (2 * s16.float() * 127 / 15)[..., None]  # one uniform 4-bit step of each token's range
    assert ((rec - v).abs() <= step / 2 + 1e-2).all()


def test_outlier_slots():
    assert outlier_slots(0.0, 128) == 0 and outlier_slots(0.01, 128) == 2 and outlier_slots(0.05, 128) == 6
    assert outlier_slots(0.01, 64) == 2 and outlier_slots(0.03, 64) == 2 and outlier_slots(0.05, 64) == 4


@pytest.mark.parametrize("token_scale", [False, True])
@pytest.mark.parametrize("bits, limit", [(4, 4.45), (3, 3.45), (2, 2.45)])
def test_bits_per_element_equals_allocation(bits, limit, token_scale):
    """Llama-3-8B shape (8 KV heads, D=128), 1% outliers, one fp16 sink: measured bits include everything
    (with key token scales too: one byte per token and head)."""
    kq = KeyQuantizer(uniform_codebook(bits), -torch.ones(8, 128), torch.ones(8, 128), outlier_slots(0.01, 128),
                      token_scale)
    vq = ValueQuantizer(uniform_codebook(bits), kq.n_out)
    kv = layout.allocate(kq, vq, 1, 8, 128, 32768, 1, 0, torch.float16, torch.device("cpu"))
    held = [t for t in vars(kv).values() if isinstance(t, torch.Tensor)]
    held += [t for q in (kv.kq, kv.vq) for t in vars(q).values() if isinstance(t, torch.Tensor)]
    held += [kv.kq.codebook.levels, kv.vq.codebook.levels]
    nbytes = sum({id(t): t.numel() * t.element_size() for t in held}.values())
    assert layout.allocated_bytes(kv) == nbytes
    bpe = layout.bits_per_element(kv)
    assert bpe == 8 * nbytes / (2 * 8 * 32768 * 128)
    assert bits < bpe <= limit


def test_key_token_scales():
    """Token scales: the smallest r on the 1/16-octave grid that covers every non-outlier channel; keys whose
    magnitude varies by token are reconstructed better, and nothing outside the ranges is clipped."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 40, 64, generator=g) * torch.logspace(-1.5, 0.7, 40)[None, None, :, None]
    kq0 = KeyQuantizer(uniform_codebook(3), -torch.ones(2, 64), torch.ones(2, 64), n_out=2)
    kq1 = KeyQuantizer(uniform_codebook(3), -torch.ones(2, 64), torch.ones(2, 64), n_out=2, token_scale=True)
    w0, o0, ts0 = kq0.quantize(k)
    w1, o1, ts1 = kq1.quantize(k)
    assert ts0 is None and ts1.dtype == torch.uint8 and ts1.shape == (1, 2, 40)
    x = (k - kq1.zeff[:, None, :]) / kq1.s16.float()[:, None, :] * kq1.codebook.grid
    a = x.abs().scatter(-1, x.abs().topk(2, dim=-1).indices, 0.0).amax(-1)
    r = token_scales(ts1)
    assert (r >= a * (1 - 1e-5)).all() and (r <= torch.maximum(a, torch.tensor(2.0**-8)) * 2 ** (1 / 16) + 1e-6).all()
    e0 = (dequantize_keys(kq0, w0, o0, 64) - k).pow(2).mean()
    e1 = (dequantize_keys(kq1, w1, o1, 64, ts1) - k).pow(2).mean()
    assert e1 < 0.25 * e0
