"""Tiny random models of each supported family, for tests and for the demo before a zoo model exists."""

from __future__ import annotations

from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", **overrides):
    """A small config of `family` (GQA 4 query / 2 KV heads, head_dim 16 unless overridden)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "llama":
        cls = LlamaConfig
    elif family == "mistral":
        cls, base["sliding_window"] = MistralConfig, 24
    elif family == "qwen2":
        cls = Qwen2Config
    elif family == "qwen3":
        cls, base["head_dim"] = Qwen3Config, 16
    else:
        raise LmsqueezeError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    base.update(overrides)
    return cls(**base)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny causal LM of `family`, in eval mode, with SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if family == "qwen2":  # give the q/k/v biases nonzero values so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of `family` to `path` (HF layout) and return the path."""
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(path)
    return Path(path)


def tiny_looped(unique: int, loops: int, seed: int, head_dim: int = 16, kv_heads: int = 2, std: float = 0.3):
    """A tiny random looped decoder (`unique` blocks cycled `loops` times) in float64, eval mode, for tests.

    The large init std makes early exits disagree often, so SPEED's pipeline flushes frequently."""
    from lmsqueeze.models.looped import LoopedConfig, LoopedDecoder

    cfg = LoopedConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=kv_heads,
                       head_dim=head_dim, num_unique_layers=unique, num_loops=loops)
    model = LoopedDecoder(cfg)
    model.init_weights(seed=seed, std=std)
    return model.double().eval()
