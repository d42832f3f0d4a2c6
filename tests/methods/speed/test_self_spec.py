"""Early-exit self-speculation equals plain greedy decoding; rollback leaves a fresh cache; calibration."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.speed import (CalibrationConfig, calibrate_self_speculation, plain_greedy,
                                     self_speculative_generate)
from lmsqueeze.methods.speed.calibrate import replay_rounds
from lmsqueeze.models.compat import cache_kw

V = 61


def tiny(family: str, seed: int, layers: int = 4, head_dim: int = 16, kv_heads: int = 2):
    torch.manual_seed(seed)
    cls_cfg, cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    cfg = cls_cfg(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa" if seed % 2 == 0 else "eager"
    m = cls(cfg).double().eval()
    m.generation_config.eos_token_id = None
    return m


def prompt(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + seed)
    return torch.randint(0, V, (1, int(torch.randint(1, 10, (1,), generator=g))), generator=g)


def soften_last_layer(m, scale: float) -> None:
    """Scale the last layer's residual writes: scale 0 makes the exit after layer L-1 equal the output."""
    with torch.no_grad():
        last = m.model.layers[-1]
        last.self_attn.o_proj.weight.mul_(scale)
        last.mlp.down_proj.weight.mul_(scale)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_spec_equals_greedy(family, seed):
    m = tiny(family, seed, head_dim=(64 if seed == 2 else 16), kv_heads=(4 if seed == 1 else 2))
    if seed == 0:
        soften_last_layer(m, 0.05)  # many accepted drafts, some rejected
    accepted = 0
    for j, n in enumerate([1, 4, 17]):
        ids = prompt(seed * 10 + j)
        ref = plain_greedy(m, ids, n)
        if j == 2:
            gen = m.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
            assert torch.equal(ref, gen)  # the reference is transformers' greedy decoding
        for e in (1, 2, 3):
            for k in (1, 2, 4, 7):
                out, st = self_speculative_generate(m, ids, n, exit_layer=e, draft=k)
                assert torch.equal(out, ref), (family, seed, n, e, k)
                assert st.new_tokens == n and st.accepted <= st.drafted
                accepted += st.accepted
    assert accepted > 0


def test_all_accepted_when_exit_is_exact():
    m = tiny("llama", 3)
    soften_last_layer(m, 0.0)
    ids, n, k = prompt(4), 21, 4
    out, st = self_speculative_generate(m, ids, n, exit_layer=3, draft=k)
    assert torch.equal(out, plain_greedy(m, ids, n))
    assert st.acceptance_rate == 1.0 and st.rounds == 5  # 5 rounds of k + 1 = 5 tokens, the last one short


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rollback_leaves_fresh_cache(family):
    m = tiny(family, 4)
    soften_last_layer(m, 0.1)
    ids, n = prompt(5), 19
    cache = DynamicCache(config=m.config)
    out, st = self_speculative_generate(m, ids, n, exit_layer=2, draft=3, cache=cache)
    assert st.accepted > 0 and st.accepted < st.drafted  # both the accept and the crop paths ran
    fresh = DynamicCache(config=m.config)
    m(input_ids=out[:, :-1], **cache_kw(m, fresh), use_cache=True)
    for layer, ref in zip(cache.layers, fresh.layers):
        assert layer.keys.shape == ref.keys.shape
        torch.testing.assert_close(layer.keys, ref.keys, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.values, ref.values, rtol=1e-9, atol=1e-10)


def test_bad_arguments():
    m = tiny("llama", 0)
    ids = prompt(0)
    for kwargs in ({"exit_layer": 0, "draft": 2}, {"exit_layer": 4, "draft": 2}, {"exit_layer": 2, "draft": 0}):
        with pytest.raises(LmsqueezeError):
            self_speculative_generate(m, ids, 4, **kwargs)
    with pytest.raises(LmsqueezeError):
        self_speculative_generate(m, ids.repeat(2, 1), 4, exit_layer=1, draft=1)


def test_replay_rounds():
    # matches F T T F T, k=2: round@0 n=0 (1 tok); @1 T,T n=2 (3 tok); @4 k=0 (1 tok)
    assert replay_rounds([False, True, True, False, True], 2) == (5, 3, 4, 2)
    assert replay_rounds([True] * 6, 8) == (6, 1, 5, 5)


class CharTok:
    def encode(self, text):
        return [ord(c) % V for c in text]


def test_calibration_picks_the_exact_exit():
    m = tiny("llama", 1)
    soften_last_layer(m, 0.0)  # exit after layer 3 is exact: it must win, with the longest draft
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(400))
    cal = calibrate_self_speculation(m, CharTok(), CalibrationConfig(num_prompts=2, prompt_tokens=8, gen_tokens=12,
                                                                     drafts=(1, 4, 11)), text=text)
    assert (cal.exit_layer, cal.draft) == (3, 11)
    row = [r for r in cal.table if r["exit_layer"] == 3 and r["draft"] == 11][0]
    assert row["acceptance_rate"] == 1.0 and row["tokens_per_verify"] == 12.0
    assert len(cal.table) == 3 * 3


def test_self_spec_with_squeeze_cache():
    """Inside lmsqueeze.apply (Dense) with the session's SqueezeCache, crop(-n) rollback stays lossless."""
    import lmsqueeze

    m = tiny("llama", 5)
    soften_last_layer(m, 0.1)
    ids = prompt(6)
    ref = plain_greedy(m, ids, 15)
    with lmsqueeze.apply(m) as session:
        out, st = self_speculative_generate(m, ids, 15, exit_layer=2, draft=3, cache=session.new_cache())
    assert torch.equal(out, ref)
    assert 0 < st.accepted < st.drafted
