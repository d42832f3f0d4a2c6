"""Model-shape presets for speed benchmarks: real shapes, random weights, nothing downloaded.

Speed does not depend on trained weights, so the benchmarks build Llama-3-8B, Llama-2-7B, Mistral-7B and
Qwen2.5-7B shaped models with random init directly on the device. Quality is measured on zoo models elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Preset:
    """The shape of one decoder-only model (what its Hugging Face config.json says)."""

    name: str
    family: str  # "llama", "mistral" or "qwen2": picks the transformers config class
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.family not in _CONFIG_CLASSES:
            raise LmsqueezeError(f"preset {self.name}: unknown family {self.family!r}; "
                                 f"use one of {', '.join(_CONFIG_CLASSES)}")
        if self.num_heads % self.num_kv_heads:
            raise LmsqueezeError(f"preset {self.name}: {self.num_heads} query heads are not a multiple of "
                                 f"{self.num_kv_heads} KV heads")
        if self.family == "qwen2" and not self.qkv_bias:
            raise LmsqueezeError(f"preset {self.name}: Qwen2 always has q/k/v biases; set qkv_bias=True")

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads


_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Llama-3.1-8B shape (its 128K context); the llama3 RoPE scaling is left out: it does not change speed.
    Preset("llama3-8b", "llama", 4096, 32, 32, 8, 128, 14336, 128256, 500000.0, 131072),
    Preset("llama2-7b", "llama", 4096, 32, 32, 32, 128, 11008, 32000, 10000.0, 4096),
    # Mistral-7B v0.2+: no sliding window, rope theta 1e6.
    Preset("mistral-7b", "mistral", 4096, 32, 32, 8, 128, 14336, 32000, 1000000.0, 32768),
    Preset("qwen2.5-7b", "qwen2", 3584, 28, 28, 4, 128, 18944, 152064, 1000000.0, 32768,
           rms_norm_eps=1e-6, qkv_bias=True),
    # For CPU tests and smoke runs of the benchmark commands (GQA 4 query / 2 KV heads).
    Preset("tiny", "llama", 64, 2, 4, 2, 16, 128, 256, 10000.0, 4096, rms_norm_eps=1e-6),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; LmsqueezeError listing the valid names otherwise."""
    if name not in PRESETS:
        raise LmsqueezeError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, **overrides):
    """A transformers config (LlamaConfig, MistralConfig or Qwen2Config) of preset `name`, SDPA attention.

    `overrides` are config keyword arguments (e.g. `num_hidden_layers=2, hidden_size=64`) applied last.
    """
    import transformers

    p = get_preset(name)
    kwargs = dict(
        hidden_size=p.hidden_size, num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads, head_dim=p.head_dim, intermediate_size=p.intermediate_size,
        vocab_size=p.vocab_size, max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta}, tie_word_embeddings=False,
    )
    if p.family == "llama":
        kwargs["attention_bias"] = p.qkv_bias
    if p.family == "mistral":
        kwargs["sliding_window"] = p.sliding_window
    kwargs.update(overrides)
    config = getattr(transformers, _CONFIG_CLASSES[p.family])(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def build_random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                       num_layers: int | None = None, seed: int = 0, **overrides):
    """A randomly initialised causal LM of preset `name`, built directly on `device`, in eval mode.

    Parameters are created on the device (a `torch.device` context), so the random init runs there and no
    full-size copy ever lives on the host. `num_layers` keeps only the first layers (smaller smoke runs).
    """
    from transformers import AutoModelForCausalLM

    if num_layers is not None:
        if num_layers < 1:
            raise LmsqueezeError(f"num_layers must be >= 1, got {num_layers}")
        overrides["num_hidden_layers"] = num_layers
    config = preset_config(name, **overrides)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmsqueezeError("CUDA is not available on this machine; pass device='cpu' with the tiny preset")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    if getattr(config, "model_type", "") == "qwen2":  # HF inits biases to zero; give them values
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    log.info("built random %s: %.2fB parameters, %s, %s", name, n / 1e9, dtype, device)
    return model
