"""Squeezed Attention options and the many-questions path: sinks, layer-wide thresholds, reusing clusters,
fixed-context eval with a prepared artifact (no second prefill), answer_many and the `lmsqueeze squeezed` CLI."""

from __future__ import annotations

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.squeezed import SqueezedAttention
from lmsqueeze.methods.squeezed.context import capture_context
from lmsqueeze.models.compat import cache_kw
from lmsqueeze.models.tiny import tiny_model

S = 80


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, art, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    with lmsqueeze.apply(model, art) as session:
        cache = session.new_cache()
        out = [model(ids[:, :prefill], **cache_kw(model, cache)).logits[0]]
        out += [model(ids[:, i:i + 1], **cache_kw(model, cache)).logits[0] for i in range(prefill, ids.shape[1])]
    return torch.cat(out)


def test_sinks_always_read_and_sparsity_zero_still_dense():
    model = tiny_model("llama")
    ids = _ids(3, S + 7)
    with torch.no_grad():
        ref = model(ids).logits[0, S:]
    art = SqueezedAttention(centroids=0.2, sparsity=0.0, observation=8, sinks=3).prepare(model, ids[:, :S])
    torch.testing.assert_close(_logits(model, art, ids[:, S:], 4), ref, atol=2e-5, rtol=1e-4)
    sparse = SqueezedAttention(centroids=0.2, sparsity=0.9, observation=8, sinks=3).prepare(model, ids[:, :S])
    for i in range(len(model.model.layers)):
        pos = sparse.tensors[f"layers.{i}.positions"]                       # [Hkv, N] relative positions
        offs = sparse.tensors[f"layers.{i}.offsets"]
        always = pos[:, int(offs[0, -2]):]                                  # the always-read "cluster"
        want = torch.cat([torch.arange(3), torch.arange(S - 8, S)]) - S
        assert torch.equal(always, want[None].expand_as(always).to(always.dtype))
        assert sparse.tensors[f"layers.{i}.labels"].shape[-1] == S - 8 - 3
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(sinks=-1)
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(observation=8, sinks=S).prepare(model, ids[:, :S])


def test_layer_thresholds_are_shared_by_the_heads_and_reach_the_target():
    model = tiny_model("qwen3")                                             # 2 KV heads
    ids = _ids(4, 160)
    art = SqueezedAttention(centroids=0.2, sparsity=0.7, observation=16, threshold="layer").prepare(model, ids)
    for i, st in enumerate(art.meta["layers"]):
        tau = art.tensors[f"layers.{i}.log_threshold"]
        assert torch.isfinite(tau).all() and (tau == tau[0]).all()
        assert 0.15 <= st["calibrated_kept_fraction"] <= 0.45                # mean over heads, near 0.3
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(threshold="layer", hierarchical=(0.05, 0.2))
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(threshold="token")


def test_reusing_clusters_equals_clustering_again():
    model = tiny_model("llama")
    ids = _ids(5, S)
    cap = capture_context(model, ids, 8)
    a70 = SqueezedAttention(centroids=0.2, sparsity=0.7, observation=8).prepare(model, ids, captured=cap)
    fresh = SqueezedAttention(centroids=0.2, sparsity=0.9, observation=8).prepare(model, ids, captured=cap)
    reused = SqueezedAttention(centroids=0.2, sparsity=0.9, observation=8).prepare(model, ids, captured=cap,
                                                                                   reuse=a70)
    for k, v in fresh.tensors.items():
        torch.testing.assert_close(reused.tensors[k], v, msg=k)
    assert not torch.equal(a70.tensors["layers.0.log_threshold"], fresh.tensors["layers.0.log_threshold"])
    with pytest.raises(LmsqueezeError):                                     # other clustering config
        SqueezedAttention(centroids=0.1, sparsity=0.9, observation=8).prepare(model, ids, captured=cap, reuse=a70)
    with pytest.raises(LmsqueezeError):                                     # another context
        SqueezedAttention(centroids=0.2, sparsity=0.9, observation=8).prepare(model, _ids(6, S), reuse=a70)


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return lmsqueeze.load_model()


def _sample(tok, length=300):
    from lmsqueeze.data.tasks import fixed_context_sample, haystack_lines
    from lmsqueeze.eval.texts import eval_text

    text, _ = eval_text(None, max_chars=40_000)
    return fixed_context_sample(tok, haystack_lines(text), length, num_facts=2, num_questions=2, seed=3)


def test_fixed_context_eval_never_prefills_a_prepared_context(zoo, monkeypatch):
    import lmsqueeze.eval.fixed_context as fc
    from lmsqueeze.eval.fixed_context import FixedContextConfig, run_fixed_context

    model, tok = zoo
    s = _sample(tok)
    ctx = tok(s.context)["input_ids"]
    method = SqueezedAttention(sparsity=0.5, observation=16, sinks=2)
    fed = []
    real = fc.prefill

    def spy(model, ids, cache, chunk_size, **kw):
        fed.append(ids.numel())
        return real(model, ids, cache, chunk_size, **kw)

    monkeypatch.setattr(fc, "prefill", spy)
    cfg = FixedContextConfig(max_new_tokens=4)
    _, by_config = run_fixed_context(model, tok, [s], method, cfg, progress=False)     # prepared per context
    art = method.prepare(model, ctx)
    _, by_artifact = run_fixed_context(model, tok, [s], art, cfg, progress=False)
    assert len(ctx) not in fed and len(fed) == 2 * len(s.questions)                   # questions only
    assert [r["prediction"] for r in by_config] == [r["prediction"] for r in by_artifact]
    other = method.prepare(model, ctx[:-5])
    with pytest.raises(LmsqueezeError):
        run_fixed_context(model, tok, [s], other, cfg, progress=False)


def test_answer_many_and_cli(zoo, tmp_path):
    from lmsqueeze.cli import main
    from lmsqueeze.methods.squeezed.answer import answer_many

    model, tok = zoo
    s = _sample(tok)
    art = SqueezedAttention(sparsity=0.0, observation=16).prepare(model, tok(s.context)["input_ids"])
    got = answer_many(model, tok, art, s.questions, max_new_tokens=4)
    dense = []
    with lmsqueeze.apply(model, None) as session, torch.inference_mode():       # sparsity 0 = dense answers
        from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids
        for q in s.questions:
            cache = session.new_cache()
            ids = tok(s.context)["input_ids"] + tok(q, add_special_tokens=False)["input_ids"]
            logits = prefill(model, torch.tensor(ids), cache)
            dense.append(tok.decode(greedy_decode(model, cache, logits, 4, stop_token_ids(tok)),
                                    skip_special_tokens=True))
    assert got == dense
    doc = tmp_path / "doc.txt"
    doc.write_text(s.context)
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(s.questions))
    out = tmp_path / "art"
    assert main(["squeezed", "prepare", str(doc), "--out", str(out), "--sparsity", "0.5", "--observation", "16",
                 "--device", "cpu"]) == 0
    assert main(["squeezed", "ask", str(out), "--questions", str(qfile), "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert main(["squeezed", "ask", str(out), "--device", "cpu"]) == 2                 # no question: user error


def test_gathered_prefill_failure_falls_back_to_the_triton_path(monkeypatch):
    """If torch's cuDNN attention refuses a shape, the 'chunk' prefill logs it, takes the gather-attention path
    with the same answer, and does not try cuDNN again."""
    from lmsqueeze.methods.squeezed import attention as A

    model = tiny_model("llama")
    ids = _ids(5, S + 6)
    art = SqueezedAttention(centroids=0.2, sparsity=0.7, observation=8, prefill="chunk").prepare(model, ids[:, :S])
    want = _logits(model, art, ids[:, S:], 4)
    calls = []

    def refuse(*a, **k):
        calls.append(1)
        raise RuntimeError("cuDNN: no engine for this shape")
    failed: list = []
    monkeypatch.setattr(A, "_GATHER_SDPA_FAILED", failed)
    monkeypatch.setattr(A, "prefill_gathered", refuse)
    monkeypatch.setattr(A, "gather_sdpa_ok", lambda *a: not failed)    # as on CUDA, until the first failure
    torch.testing.assert_close(_logits(model, art, ids[:, S:], 4), want)
    assert len(calls) == 1 and failed and "no engine" in failed[0]
