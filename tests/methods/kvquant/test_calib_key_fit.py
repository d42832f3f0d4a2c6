"""Per-channel key-range refitting (key_fit="lloyd"): the channel histograms, the Lloyd fit, calibration."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.methods.kvquant import KVQuant, fisher
from lmsqueeze.methods.kvquant.codebooks import (ChannelHistogram, Histogram, channel_error, fit_channel_affine,
                                                 normalfloat_codebook, qnorm, uniform_codebook)
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw


def test_channel_histogram_keeps_means_and_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=g) * torch.tensor([0.3, 0.5, 1.0, 1.5, 2.5, 4.0])
    w = torch.rand(5000, 6, generator=g)
    h = ChannelHistogram(6, bins=256, reach=2.0)
    h.add(x, w)
    assert torch.allclose(h.weight.sum(1), w.double().sum(0))
    assert torch.allclose(h.count.sum(1), torch.full((6,), 5000.0, dtype=torch.float64))
    # weighted means per channel survive the binning, values beyond the reach included
    mean = (h.centers * h.weight).sum(1) / h.weight.sum(1)
    assert torch.allclose(mean, ((w * x).sum(0) / w.sum(0)).double(), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_affine_fit_recovers_a_scaled_grid(bits):
    """Data that lies exactly on a * values + b (plus tiny noise) is fitted back to that a, b."""
    g = torch.Generator().manual_seed(bits)
    v = normalfloat_codebook(bits).values.double()
    C = 5
    a_true = torch.rand(C, generator=g, dtype=torch.float64) * 0.5 + 0.4
    b_true = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 0.3
    codes = torch.randint(0, v.numel(), (4000, C), generator=g)
    x = a_true * v[codes] + b_true + torch.randn(4000, C, generator=g, dtype=torch.float64) * 1e-4
    h = ChannelHistogram(C, bins=4096, reach=2.0)
    h.add(x, torch.ones_like(x))
    a, b = fit_channel_affine(h, v.float())
    assert torch.allclose(a, a_true, atol=2e-3) and torch.allclose(b, b_true, atol=2e-3)


def test_affine_fit_lowers_heavy_tailed_error():
    """Laplace-like channels normalised by their extreme range: the refit never raises the weighted error
    and clearly lowers it, for uniform and non-uniform datatypes."""
    g = torch.Generator().manual_seed(1)
    e = torch.empty(20000, 8).exponential_(generator=g) * torch.where(torch.rand(20000, 8, generator=g) < 0.5, -1, 1)
    x = e / e.abs().amax(0)  # range [-1, 1] set by the extremes, most mass near 0
    w = torch.rand(20000, 8, generator=g) + 0.5
    h = ChannelHistogram(8, bins=2048, reach=2.0)
    h.add(x, w)
    for cb in (uniform_codebook(3), normalfloat_codebook(3)):
        one, zero = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
        before = channel_error(h, cb.values, one, zero)
        a, b = fit_channel_affine(h, cb.values)
        after = channel_error(h, cb.values, a, b)
        assert (after <= before * (1 + 1e-9)).all()
        assert after.sum() < 0.7 * before.sum()
        assert (a < 1).all()  # the range shrinks: tails are clipped


def test_histogram_counts_for_qnorm():
    """Entries standing for several values (count) give the same Q-Norm statistics as repeated values."""
    x = torch.tensor([-0.5, 0.1, 0.7])
    n = torch.tensor([3.0, 1.0, 2.0])
    h1, h2 = Histogram(), Histogram()
    h1.add(x, torch.ones(3), n)
    h2.add(x.repeat_interleave(n.long()), torch.ones(6) / 2)
    v = torch.tensor([-0.6, -0.2, 0.2, 0.6])
    assert torch.allclose(qnorm(v, h1), qnorm(v, h2), atol=1e-6)


def _keys(model, ids, layer):
    with fisher.capture(model, [layer], grad=False) as store, torch.no_grad():
        model(input_ids=ids, use_cache=False)
        return store[layer].k.detach()[:, 1:].transpose(1, 2).float()  # [B, H, T-1, D], sink left out


@pytest.mark.parametrize("bits, family", [(3, "llama"), (2, "qwen3")])
def test_lloyd_calibration_lowers_key_error(bits, family):
    """On the calibration keys, refitted ranges quantize with less error than the quantile ranges; the artifact
    has the usual tensors and the patched model runs."""
    model = tiny_model(family, seed=3, head_dim=64)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 256, (2, 96), generator=g) for _ in range(2)]
    arts = {fit: KVQuant(bits=bits, key_fit=fit, fisher=False, outliers=0.0).calibrate(model, batches)
            for fit in ("quantile", "lloyd")}
    err = {}
    for fit, art in arts.items():
        kq, _ = art.method.quantizers(art, 0)
        k = torch.cat([_keys(model, b, 0) for b in batches], 2)
        codes = kq.codebook.nearest((k - kq.zeff[:, None]) / kq.s16.float()[:, None] * kq.codebook.grid)
        err[fit] = (kq.dequantize(codes) - k).pow(2).sum().item()
        assert torch.isfinite(art.tensors["layer0.k_lower"]).all()
        assert (art.tensors["layer0.k_upper"] > art.tensors["layer0.k_lower"]).all()
    assert err["lloyd"] < err["quantile"]
    with torch.no_grad(), lmsqueeze.apply(model, arts["lloyd"]) as s:
        out = model(batches[0], **cache_kw(model, s.new_cache())).logits
    assert torch.isfinite(out).all()


def test_key_fit_validated():
    with pytest.raises(ValueError, match="key_fit must be one of"):
        KVQuant(key_fit="mse")
