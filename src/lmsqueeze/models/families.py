"""What differs between the supported decoder families, found from the module itself (no class lists)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmsqueeze.errors import LmsqueezeError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """Head layout of one attention module."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def check_supported(model: nn.Module) -> None:
    """Raise LmsqueezeError unless the model is one of the supported causal-LM families."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise LmsqueezeError(
            f"unsupported architecture {name}; lmsqueeze supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    check_supported(model)
    return [layer.self_attn for layer in model.model.layers]


def attention_shape(module: nn.Module) -> AttentionShape:
    """Head counts and head dim of an attention module (from its config and projections)."""
    cfg = module.config
    return AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, module.head_dim)


def sliding_window(module: nn.Module) -> int | None:
    """The layer's sliding window (Mistral: config; Qwen2/Qwen3: per layer type), or None."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)
