"""A²ATS as a method: ratio 1.0 == dense, offloaded == GPU-resident paths, calibrate/save/load/generate, errors."""

from __future__ import annotations

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.a2ats import A2ATS, with_settings
from lmsqueeze.methods.a2ats.state import A2ATSState
from lmsqueeze.methods.base import METHODS
from lmsqueeze.methods.baselines.oracle_topk import OracleTopK
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw

SMALL = {"codebook": 16, "sinks": 2, "window": 4, "bands": (8, 16), "kmeans_iters": 4}  # band crossings in play


def _calibrate(model, **kw):
    batches = [torch.randint(0, 256, (2, 48)), {"input_ids": torch.randint(0, 256, (1, 40))}]
    return A2ATS(**{**SMALL, **kw}).calibrate(model, batches)


def _decode_logits(model, art, ids, mask, split):
    """Prefill ids[:, :split], then one-token steps; returns the step logits [B, T - split, V]."""
    with torch.no_grad(), lmsqueeze.apply(model, art) as session:
        cache = session.new_cache()
        model(ids[:, :split], attention_mask=mask[:, :split], **cache_kw(model, cache))
        steps = [model(ids[:, j:j + 1], attention_mask=mask[:, :j + 1], **cache_kw(model, cache)).logits
                 for j in range(split, ids.shape[1])]
    return torch.cat(steps, 1), cache


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", head_dim=32, num_attention_heads=4, hidden_size=128, num_key_value_heads=2)
    return model, _calibrate(model)


def _padded(B=3, T=50, pad=(0, 5, 11)):
    ids = torch.randint(0, 256, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pad[:B]):
        mask[b, :p] = 0
    return ids, mask


def test_registered():
    assert METHODS["a2ats"] is A2ATS and METHODS["oracle_topk"] is OracleTopK


def test_ratio_one_equals_dense(family):
    model = tiny_model(family)
    art = _calibrate(model)
    ids, mask = _padded()
    want, _ = _decode_logits(model, None, ids, mask, 38)
    for offload, where in ((False, "gpu"), (True, "gpu"), (True, "cpu")):
        got, cache = _decode_logits(model, with_settings(art, ratio=1.0, offload=offload, offload_attention=where),
                                    ids, mask, 38)
        torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
        if family != "mistral":  # mistral's sliding-window layers are served densely
            assert all(layer.offloaded == offload for layer in cache.layers)


def test_offloaded_paths_equal_resident_path(llama):
    """GPU-resident sparse attention, offloaded with kernel-side reads, offloaded with CPU threads: same logits."""
    model, art = llama
    ids, mask = _padded()
    outs = [_decode_logits(model, with_settings(art, ratio=0.1, offload=o, offload_attention=w), ids, mask, 40)[0]
            for o, w in ((False, "gpu"), (True, "gpu"), (True, "cpu"))]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)
    dense, _ = _decode_logits(model, None, ids, mask, 40)
    assert (outs[0] - dense).abs().max() > 1e-3  # retrieval changed something


def test_offload_keeps_only_codes_and_near_tokens_on_device(llama):
    model, art = llama
    ids, mask = _padded(2, 60)
    _, resident = _decode_logits(model, with_settings(art, ratio=0.1, offload=False), ids, mask, 58)
    _, offloaded = _decode_logits(model, with_settings(art, ratio=0.1, offload=True), ids, mask, 58)
    r, o = resident.layers[0], offloaded.layers[0]
    assert isinstance(o, A2ATSState) and o.offloaded and o.host_bytes() > 0 and r.host_bytes() == 0
    kv = r.k.numel() * r.k.element_size() * 2
    assert r.device_bytes() - o.device_bytes() > 0.5 * kv
    assert o.codes.dtype == torch.int16


def test_calibrate_save_load_generate(tmp_path, family):
    model = tiny_model(family)
    art = _calibrate(model, ratio=0.1)
    art.save(tmp_path / "a2ats")
    loaded = lmsqueeze.load_artifact(tmp_path / "a2ats")
    assert loaded.method == art.method
    ids, mask = _padded(2, 45)
    with torch.no_grad(), lmsqueeze.apply(model, loaded):
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fast = lmsqueeze.generate(model, ids, attention_mask=mask, max_new_tokens=6, method=art, stop_tokens=[])
    assert torch.equal(eager[:, 45:], fast.new_tokens)  # static decode path == eager path
    other = tiny_model(family, seed=1)
    with pytest.raises(LmsqueezeError), lmsqueeze.apply(other, loaded):
        pass


@pytest.mark.parametrize("ablation", [{"query_aware": False}, {"windowed_rope": False}])
def test_ablations_run_and_differ(llama, ablation):
    model, art = llama
    ab = _calibrate(model, ratio=0.1, offload=False, **ablation)
    ids, mask = _padded(2, 50)
    a, _ = _decode_logits(model, with_settings(art, ratio=0.1, offload=False), ids, mask, 40)
    b, _ = _decode_logits(model, ab, ids, mask, 40)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    one, _ = _decode_logits(model, with_settings(ab, ratio=1.0), ids, mask, 40)
    dense, _ = _decode_logits(model, None, ids, mask, 40)
    torch.testing.assert_close(one, dense, atol=3e-5, rtol=1e-4)


def test_crop_and_reuse(llama):
    model, art = llama
    art = with_settings(art, ratio=0.2)
    ids = torch.randint(0, 256, (1, 50))
    with torch.no_grad(), lmsqueeze.apply(model, art) as session:
        cache = session.new_cache()
        model(ids[:, :40], **cache_kw(model, cache))
        a = [model(ids[:, j:j + 1], **cache_kw(model, cache)).logits for j in range(40, 45)]
        cache.crop(-5)
        b = [model(ids[:, j:j + 1], **cache_kw(model, cache)).logits for j in range(40, 45)]
    torch.testing.assert_close(torch.cat(a), torch.cat(b), atol=1e-5, rtol=1e-5)


def test_oracle_topk_ratio_one_is_dense_and_smaller_ratio_is_not(llama):
    model, _ = llama
    ids, mask = _padded(2, 44)
    dense, _ = _decode_logits(model, None, ids, mask, 36)
    one, _ = _decode_logits(model, OracleTopK(ratio=1.0, sinks=2, window=4), ids, mask, 36)
    torch.testing.assert_close(one, dense, atol=3e-5, rtol=1e-4)
    some, _ = _decode_logits(model, OracleTopK(ratio=0.1, sinks=2, window=4), ids, mask, 36)
    assert (some - dense).abs().max() > 1e-3


def test_bad_inputs(llama):
    model, art = llama
    for bad in ({"ratio": 0.0}, {"ratio": 1.5}, {"codebook": 1}, {"codebook": 40000}, {"window": 0},
                {"sinks": -1}, {"offload_attention": "disk"}, {"max_keys": 0}, {"bands": (64, 300)},
                {"bands": (300, 200)}):
        with pytest.raises(LmsqueezeError):
            A2ATS(**bad)
    with pytest.raises(LmsqueezeError):
        OracleTopK(ratio=0)
    with pytest.raises(LmsqueezeError):  # more centroids than calibration keys
        A2ATS(codebook=4096).calibrate(model, [torch.randint(0, 256, (1, 20))])
    for batches in (None, [], [torch.randn(1, 8)]):
        with pytest.raises(LmsqueezeError):
            A2ATS(**SMALL).calibrate(model, batches)
    with pytest.raises(LmsqueezeError):
        with_settings(art, codebook=8)
    with pytest.raises(LmsqueezeError), lmsqueeze.apply(model, A2ATS()):  # uncalibrated
        pass
    ids = torch.randint(0, 256, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # padding in the middle
    with pytest.raises(LmsqueezeError), torch.no_grad(), lmsqueeze.apply(model, art) as session:
        model(ids, attention_mask=mask, **cache_kw(model, session.new_cache()))


@pytest.mark.parametrize("offload", [False, True])
def test_warmup_steps_then_rewind_change_nothing(llama, offload):
    """The graph runner's warm-up (two static steps, then lengths put back) leaves the state as if unrun."""
    from lmsqueeze.generation import DecodeRunner, mask_positions
    from lmsqueeze.sampling import Sampling

    model, art = llama
    art = with_settings(art, ratio=0.1, offload=offload, window=3)  # small window: the ring wraps
    ids = torch.randint(0, 256, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    runs = []
    for warmup in (False, True):
        with torch.no_grad(), lmsqueeze.apply(model, art) as session:
            runner = DecodeRunner(model, session, 2, 64, Sampling(), use_graph=False)
            cache = runner.cache
            pos = mask_positions(mask)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kw(model, cache)).logits
            runner.tokens.copy_(logits[:, -1].argmax(-1)[:, None])
            runner.positions.copy_(pos[:, -1:] + 1)
            cache.start_static(torch.tensor([0, 6], dtype=torch.int32))
            def step(runner=runner, cache=cache):
                logits = model(input_ids=runner.tokens, position_ids=runner.positions, **cache_kw(model, cache),
                               use_cache=True, logits_to_keep=1).logits[:, -1]
                runner.tokens.copy_(logits.argmax(-1)[:, None])
                runner.positions.add_(1)
                cache.advance_device()
                return logits

            if warmup:  # what DecodeRunner.prepare does before capturing (it runs 2 steps; 3 here)
                saved = [t.clone() for t in (runner.tokens, runner.positions, cache.slot, cache.lengths)]
                for _ in range(3):
                    step()
                for t, s in zip((runner.tokens, runner.positions, cache.slot, cache.lengths), saved):
                    t.copy_(s)
            out = []
            for _ in range(6):
                out.append(step())
                cache.advance_host(1)
            runs.append((torch.stack(out, 1), [st.counts.clone() for st in cache.layers]))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
