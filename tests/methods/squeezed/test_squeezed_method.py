"""Squeezed Attention end to end on tiny models (CPU): dense equality at sparsity 0, thresholds, artifacts,
many questions with crop rollback, batches, hierarchical lookup cost, errors."""

from __future__ import annotations

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import load_artifact
from lmsqueeze.methods.squeezed import SqueezedAttention
from lmsqueeze.methods.squeezed.attention import decode_scores
from lmsqueeze.methods.squeezed.context import capture_context
from lmsqueeze.methods.squeezed.index import SqueezedIndex
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw

S = 80


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(model, art, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ids [1, T] after the prepared context: `prefill` tokens in one chunk, then one at a time."""
    with lmsqueeze.apply(model, art) as session:
        cache = session.new_cache()
        out = [model(ids[:, :prefill], **cache_kw(model, cache)).logits[0]]
        out += [model(ids[:, i:i + 1], **cache_kw(model, cache)).logits[0] for i in range(prefill, ids.shape[1])]
    return torch.cat(out)


def test_sparsity_zero_equals_dense(family):
    model = tiny_model(family)                        # mistral: sliding window 24 < context
    ids = _ids(1, S + 9)
    with torch.no_grad():
        ref = model(ids).logits[0, S:]
    art = SqueezedAttention(centroids=0.2, sparsity=0.0, observation=8).prepare(model, ids[:, :S])
    torch.testing.assert_close(_run(model, art, ids[:, S:], 5), ref, atol=2e-5, rtol=1e-4)
    sparse = SqueezedAttention(centroids=0.2, sparsity=0.9, observation=8).prepare(model, ids[:, :S])
    assert (_run(model, sparse, ids[:, S:], 5) - ref).abs().max() > 1e-4   # the test can tell sparse from dense


def test_hierarchical_sparsity_zero_equals_dense():
    model = tiny_model("qwen3")
    ids = _ids(2, S + 6)
    with torch.no_grad():
        ref = model(ids).logits[0, S:]
    art = SqueezedAttention(sparsity=0.0, coarse_sparsity=0.0, hierarchical=(0.05, 0.2), observation=8).prepare(
        model, ids[:, :S])
    torch.testing.assert_close(_run(model, art, ids[:, S:], 3), ref, atol=2e-5, rtol=1e-4)


def test_thresholds_finite_and_reach_target(family):
    model = tiny_model(family)
    if family == "qwen2":                             # massive activations: logits far above exp's fp32 range
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 40)
                layer.self_attn.k_proj.bias.normal_(0, 40)
    art = SqueezedAttention(centroids=0.15, sparsity=0.8, observation=16).prepare(model, _ids(3, 160))
    for name, t in art.tensors.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    for st in art.meta["layers"]:
        assert 0.05 <= st["calibrated_kept_fraction"] <= 0.2 + 1e-6


def test_prepare_save_load_many_questions_with_crop(tmp_path):
    model = tiny_model("llama")
    ctx = _ids(4, S)
    art = SqueezedAttention(centroids=0.2, sparsity=0.7, observation=8).prepare(model, ctx)
    art.save(tmp_path / "sq")
    loaded = load_artifact(tmp_path / "sq")
    assert loaded.method == art.method and torch.equal(loaded.tensors["context_ids"], ctx[0])
    questions = [_ids(10 + i, 5 + i) for i in range(4)]
    fresh = [_run(model, loaded, q, q.shape[1] - 2)[-1] for q in questions]
    with lmsqueeze.apply(model, loaded) as session, torch.no_grad():
        cache = session.new_cache()
        for q, want in zip(questions, fresh):
            model(q[:, :-2], **cache_kw(model, cache))
            model(q[:, -2:-1], **cache_kw(model, cache))
            got = model(q[:, -1:], **cache_kw(model, cache)).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert cache.get_seq_length() == q.shape[1]          # the context is outside the count
            cache.crop(-q.shape[1])
            assert cache.get_seq_length() == 0
    with pytest.raises(LmsqueezeError), lmsqueeze.apply(tiny_model("llama", seed=5), loaded):
        pass                                                     # another model's weights


def test_batch_matches_single_and_generate_static_path():
    model = tiny_model("qwen2")
    art = SqueezedAttention(centroids=0.2, sparsity=0.8, observation=8).prepare(model, _ids(6, S))
    q = torch.cat([_ids(7, 6), _ids(8, 6)])
    single = [_run(model, art, q[i:i + 1], 4) for i in range(2)]
    with lmsqueeze.apply(model, art) as session, torch.no_grad():
        cache = session.new_cache()
        batched = [model(q[:, :4], **cache_kw(model, cache)).logits]
        batched += [model(q[:, i:i + 1], **cache_kw(model, cache)).logits for i in (4, 5)]
    batched = torch.cat(batched, 1)
    for i in range(2):
        torch.testing.assert_close(batched[i], single[i], atol=1e-5, rtol=1e-5)
    out = lmsqueeze.generation.generate(model, q[:1], max_new_tokens=5, method=art, use_graph=False)
    with lmsqueeze.apply(model, art) as session, torch.no_grad():          # the eager loop, token by token
        cache, tok, want = session.new_cache(), q[:1], []
        for _ in range(5):
            nxt = model(tok, **cache_kw(model, cache)).logits[0, -1].argmax()
            want.append(int(nxt))
            tok = nxt.view(1, 1)
    assert out.new_tokens[0].tolist() == want


def test_hierarchical_scores_fewer_centroids():
    model = tiny_model("llama")
    ctx = _ids(9, 400)
    hier = SqueezedAttention(sparsity=0.9, hierarchical=(0.02, 0.2), observation=16).prepare(model, ctx)
    idx = SqueezedIndex.from_tensors({k[9:]: v for k, v in hier.tensors.items() if k.startswith("layers.0.")},
                                     "cpu", torch.float32)
    cap = capture_context(model, ctx, 16)[0]                       # the context's own last queries
    q = cap.q_obs.transpose(0, 1)                                 # [16 queries as a batch, Hq, D]
    _, _, scored = decode_scores(q, idx, cap.scaling)
    flat_ops = idx.num_clusters                                   # a one-level lookup at the fine level
    hier_ops = idx.coarse_centroids.shape[1] + scored.float()     # coarse + fine actually multiplied
    assert hier_ops.mean() < 0.8 * flat_ops, (hier_ops, flat_ops)


@pytest.mark.parametrize("kwargs", [{"sparsity": 1.0}, {"centroids": 0.0}, {"observation": 0},
                                    {"hierarchical": (0.1, 0.05)}, {"hierarchical": (0.1,)},
                                    {"coarse_sparsity": -0.1}, {"kmeans_iters": -1}])
def test_bad_config(kwargs):
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(**kwargs)


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(LmsqueezeError):                           # context not longer than the window
        SqueezedAttention(observation=64).prepare(model, _ids(1, 40))
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(observation=4).prepare(model, torch.zeros(0, dtype=torch.long))
    with pytest.raises(LmsqueezeError), lmsqueeze.apply(model, SqueezedAttention()):
        pass                                                      # needs a prepared context
