"""Named model shapes and training settings of the zoo."""

from __future__ import annotations

from dataclasses import replace

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.looped import LoopedConfig
from lmsqueeze.train.loop import TrainConfig

_BASE = dict(hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2, head_dim=64,
             rope_theta=100000.0, max_position_embeddings=8320)  # 8192-token prompts + room for answers
_TINY = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
             rope_theta=10000.0, max_position_embeddings=1024)

MODEL_PRESETS: dict[str, dict] = {
    "default": dict(_BASE, num_unique_layers=8, num_loops=1),        # the bundled Llama
    "looped-4x3": dict(_BASE, num_unique_layers=4, num_loops=3),
    "looped-2x6": dict(_BASE, num_unique_layers=2, num_loops=6),
    "tiny": dict(_TINY, num_unique_layers=2, num_loops=1),           # tests and CPU smoke runs
    "tiny-looped": dict(_TINY, num_unique_layers=2, num_loops=3),
}

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "gpu": TrainConfig(seq_len=8320, batch_size=8, lr=2e-3, warmup_steps=100, max_steps=100_000,
                       curriculum=[(0.0, 2080), (0.1, 8320)], log_every=25, eval_every=300,
                       ckpt_every=1000, device="cuda"),
    # looped: 60% of the time at 2K (attention is the cost at 8K and the block runs 3x), then 8K
    "gpu-looped": TrainConfig(seq_len=8320, batch_size=8, lr=2e-3, warmup_steps=100, max_steps=100_000,
                              curriculum=[(0.0, 2080), (0.6, 8320)], log_every=25, eval_every=300,
                              ckpt_every=1000, device="cuda"),
    # a second stage from a trained model: full length only, a short warm-up, a lower peak learning rate
    "gpu-finetune": TrainConfig(seq_len=8320, batch_size=8, lr=6e-4, warmup_steps=30, max_steps=100_000,
                                curriculum=[(0.0, 8320)], log_every=25, eval_every=300, ckpt_every=1000,
                                device="cuda"),
    "smoke": TrainConfig(seq_len=512, batch_size=2, lr=3e-3, warmup_steps=2, max_steps=6,
                         curriculum=[(0.0, 256), (0.5, 512)], log_every=2, eval_every=3, ckpt_every=3,
                         device="cpu", amp=False),
}


def model_preset(name: str, vocab_size: int, **overrides) -> LoopedConfig:
    """The `LoopedConfig` of preset `name` with the tokenizer's vocabulary size."""
    if name not in MODEL_PRESETS:
        raise LmsqueezeError(f"unknown model preset {name!r}; use one of {', '.join(MODEL_PRESETS)}")
    return LoopedConfig(**{**MODEL_PRESETS[name], "vocab_size": vocab_size, **overrides})


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise LmsqueezeError(f"unknown training preset {name!r}; use one of {', '.join(TRAIN_PRESETS)}")
    return replace(TRAIN_PRESETS[name], **overrides)
