import pytest
import torch

from lmsqueeze.bench.caches import kv_shape, random_dynamic_cache, random_static_cache
from lmsqueeze.bench.memory import memory_report
from lmsqueeze.bench.model import (
    STEP_VARIANTS,
    decode_inputs,
    decode_step_bytes,
    run_step_sweep,
    static_step_fn,
    weight_bytes,
)
from lmsqueeze.bench.prefill import run_prefill_sweep
from lmsqueeze.bench.presets import build_random_model
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.compat import cache_kw

SMALL = {
    "llama3-8b": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                      intermediate_size=96, vocab_size=200),
    "mistral-7b": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=96, vocab_size=200),
    "qwen2.5-7b": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                       intermediate_size=96, vocab_size=200),
}


def _model(name="tiny"):
    return build_random_model(name, torch.float32, "cpu", num_layers=2, **SMALL.get(name, {}))


def _err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(SMALL))
def test_static_and_dynamic_steps_agree_on_the_same_random_cache(name):
    model = _model(name)
    batch, length = 2, 37
    ids, pos = decode_inputs(model, batch, length)
    with torch.no_grad():
        static = random_static_cache(model, batch, length, seed=5)
        step = static_step_fn(model, static, ids, pos)
        a, a2 = step(), step()  # replays leave the cache as they found it
        assert all(int(layer.cumulative_length) == length for layer in static.layers)
        dyn = random_dynamic_cache(model, batch, length, seed=5)
        b = model(input_ids=ids, position_ids=pos, **cache_kw(model, dyn)).logits
        other = random_dynamic_cache(model, batch, length, seed=6)
        c = model(input_ids=ids, position_ids=pos, **cache_kw(model, other)).logits
    assert a.shape == (batch, 1, model.config.vocab_size)
    assert torch.equal(a, a2)
    assert _err(a, b) < 1e-5
    assert _err(c, b) > 1e-3  # the cache contents matter: the comparison above can fail


def test_byte_counts():
    model = _model()
    emb = model.model.embed_tokens.weight
    total = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes(model) == total - emb.numel() * 4
    s = kv_shape(model)
    assert decode_step_bytes(model, 3, 10) == weight_bytes(model) + 2 * s.num_layers * 3 * s.num_kv_heads * 11 * s.head_dim * 4


def test_step_sweep_rows():
    model = _model()
    rows, skipped = run_step_sweep(model, [21], [2], ["hf-dynamic-eager"], baseline="hf-static-graph",
                                   warmup=0, iters=20, progress=False, preset="tiny")
    assert not skipped
    assert [r["method"] for r in rows] == ["hf-static-graph", "hf-dynamic-eager"]  # baseline first
    for r in rows:
        assert r["baseline"] == "hf-static-graph" and r["preset"] == "tiny" and r["ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["ms"] * 1e-3))
        assert r["bytes"] == decode_step_bytes(model, r["batch"], 21)
        if r["method"] != "hf-static-graph":
            assert r["logits_rel_err"] < 1e-5
    with pytest.raises(LmsqueezeError, match="unknown step variant"):
        run_step_sweep(model, [8], [1], ["vllm"], progress=False)


def test_compile_variant_builds_a_working_step(monkeypatch):
    model = _model()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager", **kw))
    bench = STEP_VARIANTS["hf-static-compile"](model, 1, 9)
    ref = STEP_VARIANTS["hf-static-eager"](model, 1, 9)
    with torch.no_grad():
        assert _err(bench.fn(), ref.fn()) < 1e-5
    assert bench.use_graph and not ref.use_graph


def test_prefill_chunked_matches_whole():
    model = _model("qwen2.5-7b")
    rows, skipped = run_prefill_sweep(model, [45], [2], chunk=16, warmup=0, iters=20, progress=False)
    assert not skipped and [r["method"] for r in rows] == ["hf-dynamic-full", "hf-static-chunked"]
    assert rows[1]["chunk"] == 16 and rows[0]["chunk"] is None
    assert rows[1]["logits_rel_err"] < 1e-5
    assert all(r["tokens_per_s"] > 0 and r["tflop_per_s"] > 0 for r in rows)
    with pytest.raises(LmsqueezeError, match="chunk"):
        run_prefill_sweep(model, [45], [1], chunk=0, progress=False)


def test_memory_report_on_cpu_gives_expected_sizes():
    model = _model()
    rows, _ = memory_report(model, [30], [2], chunk=8)
    stages = [(r["stage"], r["method"]) for r in rows]
    assert stages == [("weights", "hf"), ("kv-cache", "hf-static"), ("decode-step", "hf-static"),
                      ("prefill", "hf-static-chunked"), ("prefill", "hf-dynamic-full")]
    s = kv_shape(model)
    assert rows[1]["expected_gib"] * 2**30 == pytest.approx(2 * s.num_layers * 2 * s.num_kv_heads * 31 * s.head_dim * 4)
    assert rows[1]["allocated_gib"] is None  # measured only on CUDA
