import pytest
import torch

from lmsqueeze.bench.presets import PRESETS, Preset, build_random_model, get_preset, preset_config
from lmsqueeze.errors import LmsqueezeError

# Shrunk shapes that keep each family's class and a GQA ratio / head dim worth testing.
SMALL = {
    "llama3-8b": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                      intermediate_size=96, vocab_size=300),
    "llama2-7b": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                      intermediate_size=96, vocab_size=300),
    "mistral-7b": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                       intermediate_size=96, vocab_size=300),
    "qwen2.5-7b": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1, head_dim=128,
                       intermediate_size=96, vocab_size=300),
}
CLASSES = {"llama3-8b": "LlamaForCausalLM", "llama2-7b": "LlamaForCausalLM", "mistral-7b": "MistralForCausalLM",
           "qwen2.5-7b": "Qwen2ForCausalLM", "tiny": "LlamaForCausalLM"}


def test_full_size_configs_have_the_published_shapes():
    c = preset_config("llama3-8b")
    assert type(c).__name__ == "LlamaConfig"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert c.rope_parameters["rope_theta"] == 500000.0
    c = preset_config("llama2-7b")
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (32, 32, 11008, 32000)
    c = preset_config("mistral-7b")
    assert type(c).__name__ == "MistralConfig" and c.sliding_window is None and c.num_key_value_heads == 8
    c = preset_config("qwen2.5-7b")
    assert type(c).__name__ == "Qwen2Config"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (3584, 28, 28, 4, 128, 18944, 152064)
    assert c._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", list(SMALL) + ["tiny"])
def test_build_tiny_model_of_each_family(name):
    model = build_random_model(name, torch.float32, "cpu", num_layers=1, **SMALL.get(name, {}))
    assert type(model).__name__ == CLASSES[name]
    assert model.config.num_hidden_layers == 1 and not model.training
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == model.config.num_attention_heads * model.config.head_dim
    assert (attn.q_proj.bias is not None) == (name == "qwen2.5-7b")
    if name == "qwen2.5-7b":
        assert attn.q_proj.bias.abs().sum() > 0  # biases get random values too
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    logits = model(ids).logits
    assert logits.shape == (2, 7, model.config.vocab_size) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_same_seed_same_weights_and_overrides_apply():
    a = build_random_model("tiny", torch.float32, "cpu", seed=3)
    b = build_random_model("tiny", torch.float32, "cpu", seed=3)
    c = build_random_model("tiny", torch.float32, "cpu", seed=4, intermediate_size=64)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert c.model.layers[0].mlp.up_proj.out_features == 64


def test_unknown_preset_lists_valid_names():
    with pytest.raises(LmsqueezeError, match="llama3-8b.*qwen2.5-7b.*tiny"):
        preset_config("llama4-400b")
    with pytest.raises(LmsqueezeError, match="unknown preset"):
        build_random_model("gpt2", torch.float32, "cpu")
    assert get_preset("tiny") is PRESETS["tiny"]


def test_bad_presets_and_layers_rejected():
    with pytest.raises(LmsqueezeError, match="num_layers"):
        build_random_model("tiny", torch.float32, "cpu", num_layers=0)
    with pytest.raises(LmsqueezeError, match="family"):
        Preset("x", "gpt", 64, 2, 4, 2, 16, 128, 256, 1e4, 4096)
    with pytest.raises(LmsqueezeError, match="multiple"):
        Preset("x", "llama", 64, 2, 6, 4, 16, 128, 256, 1e4, 4096)
    with pytest.raises(LmsqueezeError, match="bias"):
        Preset("x", "qwen2", 64, 2, 4, 2, 16, 128, 256, 1e4, 4096)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(LmsqueezeError, match="CUDA"):
        build_random_model("tiny", torch.float32, "cuda")
