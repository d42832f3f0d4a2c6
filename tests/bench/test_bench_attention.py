import math

import pytest
import torch
import torch.nn.functional as F

from lmsqueeze.bench.attention import (
    ATTENTION_VARIANTS,
    AttentionBench,
    AttentionInputs,
    check_rows,
    dense_bytes,
    random_inputs,
    reference_attention,
    register_attention_variant,
    run_attention_sweep,
)
from lmsqueeze.bench.options import parse_int_list, parse_names
from lmsqueeze.bench.presets import Preset
from lmsqueeze.errors import LmsqueezeError


def _preset(hq, hkv, d):
    return Preset(f"t{hq}-{hkv}-{d}", "llama", hq * d, 1, hq, hkv, d, 64, 100, 1e4, 4096)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (8, 1, 128), (3, 3, 64)])
@pytest.mark.parametrize("name", ["sdpa", "sdpa-pack-gqa", "sdpa-repeat-kv"])
def test_variants_match_float64_attention(hq, hkv, d, name):
    inp = random_inputs(_preset(hq, hkv, d), batch=2, length=37, dtype=torch.float32, device=torch.device("cpu"))
    out = ATTENTION_VARIANTS[name](inp).fn()
    g = hq // hkv
    k = inp.k.double().repeat_interleave(g, dim=1)
    v = inp.v.double().repeat_interleave(g, dim=1)
    ref = F.scaled_dot_product_attention(inp.q.double(), k, v, scale=inp.scale)
    assert out.shape == (2, hq, 1, d)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert ((reference_attention(inp).double() - ref).norm() / ref.norm()).item() < 1e-5


def test_dense_bytes_counts_q_kv_and_out():
    inp = random_inputs(_preset(4, 2, 64), 3, 11, torch.bfloat16, torch.device("cpu"))
    assert dense_bytes(inp) == 2 * (2 * 3 * 4 * 64) + 2 * (2 * 3 * 2 * 11 * 64)


def test_sweep_rows_on_cpu():
    rows, skipped = run_attention_sweep("tiny", [17, 40], [1, 3], torch.float32, "cpu",
                                        ["sdpa-pack-gqa", "sdpa"], warmup=1, iters=20, progress=False)
    assert not skipped and len(rows) == 8
    assert [r["method"] for r in rows[:2]] == ["sdpa", "sdpa-pack-gqa"]  # the baseline is timed first
    for r in rows:
        assert r["baseline"] == "sdpa" and r["ms"] > 0 and r["tb_per_s"] > 0 and r["rel_err"] < 1e-5
        assert r["bytes"] == 4 * (2 * r["batch"] * 4 * 16 + 2 * r["batch"] * 2 * r["length"] * 16)
        assert math.isclose(r["speedup"], r["baseline_ms"] / r["ms"])
    assert rows[0]["speedup"] == 1.0
    assert check_rows(rows) == []


def test_registered_wrong_variant_is_flagged():
    @register_attention_variant("test-zeros")
    def zeros(inp: AttentionInputs) -> AttentionBench:
        return AttentionBench(lambda: torch.zeros_like(inp.q), dense_bytes(inp))
    try:
        rows, _ = run_attention_sweep("tiny", [9], [2], torch.float32, "cpu", ["test-zeros"], warmup=0, iters=20,
                                      progress=False)
    finally:
        del ATTENTION_VARIANTS["test-zeros"]
    assert [r["method"] for r in rows] == ["sdpa", "test-zeros"]
    bad = check_rows(rows)
    assert len(bad) == 1 and "test-zeros" in bad[0]
    nan_row = dict(rows[0], rel_err=float("nan"))
    assert check_rows([nan_row])


def test_bad_inputs_rejected():
    with pytest.raises(LmsqueezeError, match="lengths"):
        run_attention_sweep("tiny", [0], [1], torch.float32, "cpu", progress=False)
    with pytest.raises(LmsqueezeError, match="batch"):
        run_attention_sweep("tiny", [8], [], torch.float32, "cpu", progress=False)
    with pytest.raises(LmsqueezeError, match="unknown attention variant"):
        run_attention_sweep("tiny", [8], [1], torch.float32, "cpu", ["flash9"], progress=False)
    with pytest.raises(LmsqueezeError, match="unknown preset"):
        run_attention_sweep("nope", [8], [1], torch.float32, "cpu", progress=False)


def test_option_parsing():
    assert parse_int_list("32768, 131072") == [32768, 131072]
    assert parse_int_list("32k,128K") == [32768, 131072]
    assert parse_int_list([3, 5]) == [3, 5]
    for bad in ("", "32768,-1", "1.5", "abc", "0", "k"):
        with pytest.raises(LmsqueezeError):
            parse_int_list(bad)
    assert parse_names("b,a,b", ["a", "b"]) == ["b", "a"]
    with pytest.raises(LmsqueezeError, match="use one of a, b"):
        parse_names("c", ["a", "b"])
