"""KVQuant as a method: config validation, calibration artifacts, applying it to tiny models of each family."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.generation import generate
from lmsqueeze.methods.base import get_method
from lmsqueeze.methods.kvquant import KVQuant
from lmsqueeze.methods.kvquant.method import uncalibrated_artifact
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw

HEAD_DIM = 64  # kvquant needs head_dim % 64 == 0; the tiny models default to 16


def model_of(family, seed=0):
    return tiny_model(family, seed=seed, head_dim=HEAD_DIM)


def ids_for(batch=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 5}, "bits must be 2, 3 or 4"),
    ({"bits": 8}, "8 only with datatype='int'"),
    ({"datatype": "fp8"}, "datatype must be one of"),
    ({"outliers": 0.7}, "fraction"),
    ({"window": -1}, ">= 0"),
    ({"key_range_fraction": 0.5}, "key_range_fraction"),
    ({"key_token_scale": True, "key_fit": "lloyd"}, "key_token_scale"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(LmsqueezeError, match=match):
        KVQuant(**kwargs)


def test_registered_and_needs_calibration():
    assert get_method("kvquant") is KVQuant
    model = model_of("llama")
    with pytest.raises(LmsqueezeError, match="needs calibration"), lmsqueeze.apply(model, KVQuant()):
        pass


def test_int8_tracks_fp32_logits():
    """8-bit uniform keys/values: prefill then decode steps over the quantized cache stay close to fp32."""
    model = model_of("llama")
    ids = ids_for(2, 22)

    def decode_logits(art):
        with torch.no_grad(), lmsqueeze.apply(model, art) as s:
            cache = s.new_cache()
            outs = [model(ids[:, :14], **cache_kw(model, cache)).logits]
            outs += [model(ids[:, t:t + 1], **cache_kw(model, cache)).logits for t in range(14, 22)]
        return torch.cat(outs, 1)

    with torch.no_grad():
        ref = model(ids).logits
    out8 = decode_logits(KVQuant(bits=8, datatype="int", outliers=0.0).calibrate(model, [ids]))
    assert (out8 - ref).abs().max() / ref.abs().max() < 1e-2
    # the decode steps really read the quantized cache: 2 bits is visibly worse
    out2 = decode_logits(KVQuant(bits=2, datatype="int", outliers=0.0, sink_tokens=0).calibrate(model, [ids]))
    assert (out2 - ref)[:, 14:].abs().max() > 3 * (out8 - ref)[:, 14:].abs().max()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_calibrate_save_load_generate(family, tmp_path):
    model = model_of(family)
    ids = ids_for(2, 20, seed=1)
    art = KVQuant(bits=3, window=4, layers_per_pass=1).calibrate(model, [ids, ids_for(1, 20, seed=2)])
    assert art.tensors["layer0.k_levels"].numel() == 8 and art.meta["tokens"] > 0
    art.save(tmp_path / "kvq")
    loaded = lmsqueeze.load_artifact(tmp_path / "kvq")
    assert loaded.method == art.method
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad(), lmsqueeze.apply(model, loaded) as s:
        hf = model.generate(ids, attention_mask=mask, **cache_kw(model, s.new_cache()), max_new_tokens=6,
                            do_sample=False)
    ours = generate(model, ids, mask, max_new_tokens=6, method=loaded, use_graph=False)
    assert hf.shape == (2, 26)
    # the static decode path (device-side slots) and transformers' eager path compute the same function
    assert torch.equal(ours.new_tokens, hf[:, 20:])


def test_key_range_fraction_narrows_key_ranges():
    """key_range_fraction sets the key ranges' quantile (default: outliers); the outlier slots do not change."""
    model = model_of("llama")
    ids = ids_for(2, 40, seed=3)
    wide = KVQuant(bits=3, datatype="int").calibrate(model, [ids])
    narrow = KVQuant(bits=3, datatype="int", key_range_fraction=0.2).calibrate(model, [ids])
    assert KVQuant(bits=3).range_fraction == 0.01 and narrow.method.range_fraction == 0.2
    lo_w, hi_w = wide.tensors["layer0.k_lower"], wide.tensors["layer0.k_upper"]
    lo_n, hi_n = narrow.tensors["layer0.k_lower"], narrow.tensors["layer0.k_upper"]
    assert (lo_n >= lo_w).all() and (hi_n <= hi_w).all() and float((hi_w - lo_w - hi_n + lo_n).min()) > 0
    assert wide.meta["outlier_slots_per_vector"] == narrow.meta["outlier_slots_per_vector"] == 2


def test_key_token_scale_calibrate_and_generate():
    """key_token_scale: calibration, a cache with one scale byte per (token, head) counted in its bytes, and the
    static decode path equal to transformers' eager path."""
    model = model_of("llama")
    ids = ids_for(2, 20, seed=4)
    art = KVQuant(bits=3, key_token_scale=True).calibrate(model, [ids])
    assert art.method.new_layer_state(0, art)._kq.token_scale
    mask = torch.ones_like(ids)
    with torch.no_grad(), lmsqueeze.apply(model, art) as s:
        cache = s.new_cache()
        hf = model.generate(ids, attention_mask=mask, **cache_kw(model, cache), max_new_tokens=5, do_sample=False)
    ours = generate(model, ids, mask, max_new_tokens=5, method=art, use_graph=False)
    assert torch.equal(ours.new_tokens, hf[:, 20:])


def test_artifact_from_another_model():
    a, b = model_of("llama", seed=0), model_of("llama", seed=1)
    art = KVQuant(bits=4, datatype="int").calibrate(a, [ids_for(1, 12)])
    with pytest.raises(LmsqueezeError, match="another model"), lmsqueeze.apply(b, art):
        pass


def test_nonfinite_calibration_activations():
    model = model_of("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(LmsqueezeError, match="NaN or inf"):
        KVQuant(bits=3).calibrate(model, [ids_for(1, 12)])


def test_head_dim_not_supported():
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(LmsqueezeError, match="multiple of 64"):
        KVQuant(bits=3).calibrate(model, [ids_for(1, 12)])


def test_uncalibrated_artifact_runs():
    model = model_of("qwen3")
    art = uncalibrated_artifact(KVQuant(bits=4, datatype="nf"), model)
    with torch.no_grad(), lmsqueeze.apply(model, art):
        out = model(ids_for(1, 10)).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("window", [0, 4])
def test_crop_and_reappend(window):
    """Rolling back decode steps and appending the same tokens again reproduces the logits (window: close)."""
    model = model_of("llama")
    ids = ids_for(1, 20, seed=3)
    art = uncalibrated_artifact(KVQuant(bits=4, datatype="int", window=window), model)
    with torch.no_grad(), lmsqueeze.apply(model, art) as s:
        a = s.new_cache()
        model(ids[:, :12], **cache_kw(model, a))
        ref = [model(ids[:, t:t + 1], **cache_kw(model, a)).logits for t in range(12, 20)]
        b = s.new_cache()
        model(ids[:, :12], **cache_kw(model, b))
        for t in range(12, 17):
            model(ids[:, t:t + 1], **cache_kw(model, b))
        b.crop(-3)
        assert b.get_seq_length() == 14
        again = [model(ids[:, t:t + 1], **cache_kw(model, b)).logits for t in range(14, 20)]
    for x, y in zip(again, ref[2:]):
        if window == 0:
            assert torch.equal(x, y)
        else:
            assert (x - y).abs().max() < 0.05 * y.abs().max()
