"""KV caches filled with random keys/values by writing their buffers directly (no 128K-token prefill)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class KVShape:
    """The KV layout of a model: per layer [B, num_kv_heads, T, head_dim] keys and values of `dtype`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def nbytes(self, batch: int, length: int) -> int:
        """Bytes of keys + values for `length` tokens of `batch` sequences over all layers."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * batch * self.num_kv_heads * length * self.head_dim * elt


def kv_shape(model: nn.Module) -> KVShape:
    """The KV layout of a Llama/Mistral/Qwen2 causal LM."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    return KVShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, p.dtype, p.device)


def random_kv(shape: KVShape, batch: int, length: int, seed: int = 0):
    """Yield (k, v) per layer, each [B, Hkv, N, D], from a generator seeded with `seed` (same seed, same data)."""
    gen = torch.Generator(device=shape.device).manual_seed(seed)
    for _ in range(shape.num_layers):
        pair = []
        for _ in range(2):
            t = torch.randn(batch, shape.num_kv_heads, length, shape.head_dim, generator=gen,
                            device=shape.device, dtype=torch.float32)
            pair.append(t.to(shape.dtype))
            del t
        yield pair[0], pair[1]


def random_static_cache(model: nn.Module, batch: int, length: int, max_cache_len: int | None = None,
                        seed: int = 0):
    """A `transformers.StaticCache` holding `length` random tokens per sequence, sized `max_cache_len`
    (default length + 1: room for one decode step, so attention reads exactly length + 1 slots)."""
    from transformers import StaticCache

    shape = kv_shape(model)
    max_cache_len = length + 1 if max_cache_len is None else max_cache_len
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.early_initialization(batch, shape.num_kv_heads, shape.head_dim, shape.dtype, shape.device)
    for layer, (k, v) in zip(cache.layers, random_kv(shape, batch, length, seed)):
        layer.keys[:, :, :length].copy_(k)
        layer.values[:, :, :length].copy_(v)
        layer.cumulative_length.fill_(length)
    return cache


def set_static_length(cache, length: int) -> None:
    """Set every layer of a StaticCache to `length` tokens seen (the next write goes to slot `length`)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def random_dynamic_cache(model: nn.Module, batch: int, length: int, seed: int = 0):
    """A `transformers.DynamicCache` holding `length` random tokens (the same data as `random_static_cache`
    with the same seed)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(random_kv(kv_shape(model), batch, length, seed)):
        cache.update(k, v, i)
    return cache
