"""Prefill latency: a B x P random prompt into a fresh cache, whole or in chunks (no CUDA graph: big kernels)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmsqueeze.bench.caches import kv_shape, set_static_length
from lmsqueeze.bench.device import fits
from lmsqueeze.bench.options import check_positive, parse_names
from lmsqueeze.bench.results import timing_row
from lmsqueeze.bench.timing import time_fn
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.compat import cache_kw

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillBench:
    """`fn()` prefills the prompt into a fresh (or reset) cache and returns the last token's logits [B, 1, V]."""

    fn: Callable[[], torch.Tensor]
    flops: float  # matmul FLOPs of the prefill (weights + causal attention)
    chunk: int | None = None  # tokens per forward, None: the whole prompt at once


PrefillBuilder = Callable[[nn.Module, torch.Tensor, int], PrefillBench]  # (model, input_ids [B, P], chunk)
PREFILL_VARIANTS: dict[str, PrefillBuilder] = {}


def register_prefill_variant(name: str) -> Callable[[PrefillBuilder], PrefillBuilder]:
    """Decorator: add a prefill variant (timed by `run_prefill_sweep`) under `name`."""
    def deco(build: PrefillBuilder) -> PrefillBuilder:
        PREFILL_VARIANTS[name] = build
        return build
    return deco


def prefill_flops(model: nn.Module, batch: int, length: int) -> float:
    """2 x (non-embedding parameters) per token, plus causal attention: QK^T and PV over length^2 / 2 pairs."""
    emb = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - emb
    cfg = model.config
    shape = kv_shape(model)
    attn = 2 * 2 * shape.num_layers * batch * cfg.num_attention_heads * shape.head_dim * length * length / 2
    return 2.0 * params * batch * length + attn


@register_prefill_variant("hf-dynamic-full")
def hf_dynamic_full(model: nn.Module, ids: torch.Tensor, chunk: int) -> PrefillBench:
    """One forward over the whole prompt into a new DynamicCache (SDPA causal, no mask): transformers' default."""
    from transformers import DynamicCache

    def fn() -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        return model(input_ids=ids, **cache_kw(model, cache), use_cache=True, logits_to_keep=1).logits
    return PrefillBench(fn, prefill_flops(model, *ids.shape))


@register_prefill_variant("hf-static-chunked")
def hf_static_chunked(model: nn.Module, ids: torch.Tensor, chunk: int) -> PrefillBench:
    """The prompt in chunks of `chunk` tokens into a StaticCache sized to the prompt (reset before each run)."""
    from transformers import StaticCache

    batch, length = ids.shape
    shape = kv_shape(model)
    cache = StaticCache(config=model.config, max_cache_len=length)
    cache.early_initialization(batch, shape.num_kv_heads, shape.head_dim, shape.dtype, shape.device)
    positions = torch.arange(length, device=ids.device).expand(batch, length)

    def fn() -> torch.Tensor:
        set_static_length(cache, 0)
        logits = None
        for s in range(0, length, chunk):
            e = min(s + chunk, length)
            logits = model(input_ids=ids[:, s:e], position_ids=positions[:, s:e], **cache_kw(model, cache),
                           use_cache=True, logits_to_keep=1).logits
        return logits
    return PrefillBench(fn, prefill_flops(model, batch, length), chunk)


def run_prefill_sweep(model: nn.Module, lengths: Sequence[int], batches: Sequence[int] = (1,), chunk: int = 4096,
                      variants: Sequence[str] = ("hf-dynamic-full", "hf-static-chunked"),
                      baseline: str | None = None, warmup: int = 1, iters: int = 20, progress: bool = True,
                      seed: int = 0, **fields: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Time each prefill variant at each (batch, prompt length); returns (rows, skipped messages).

    Rows carry the baseline's time and the speedup, tokens/s, achieved TFLOP/s and `logits_rel_err` (last-token
    logits against the baseline's on the same prompt).
    """
    from tqdm.auto import tqdm

    lengths = check_positive(list(lengths), "lengths")
    batches = check_positive(list(batches), "batch sizes")
    if chunk < 1:
        raise LmsqueezeError(f"chunk must be a positive number of tokens, got {chunk}")
    names = parse_names(variants, PREFILL_VARIANTS, "prefill variant")
    baseline = baseline or names[0]
    names = [baseline] + [n for n in names if n != baseline]
    device = next(model.parameters()).device
    shape = kv_shape(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows, skipped = [], []
    cases = [(b, n) for b in batches for n in lengths]
    bar = tqdm(total=len(cases) * len(names), desc="prefill", disable=not progress or None)
    for batch, length in cases:
        need = 2 * shape.nbytes(batch, length) + (2 << 30)
        if not fits(need, device):
            msg = f"B={batch} P={length}: needs ~{need / 2**30:.1f} GiB, more than is free; skipped"
            log.warning(msg)
            skipped.append(msg)
            bar.update(len(names))
            continue
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen, device=device)
        base, ref = None, None
        for name in names:
            bar.set_postfix_str(f"B={batch} P={length} {name}")
            bench = PREFILL_VARIANTS[name](model, ids, chunk)
            with torch.no_grad():
                out = bench.fn()
                err = None if ref is None else ((out.float() - ref).norm() / ref.norm()).item()
                timing = time_fn(bench.fn, device, warmup, iters, use_graph=False)
            if name == baseline:
                base, ref = timing, out.float()
            row = timing_row(name, timing, baseline=baseline, baseline_timing=base, **fields, batch=batch,
                             length=length, chunk=bench.chunk, logits_rel_err=err)
            row["tokens_per_s"] = batch * length / (timing.median_ms * 1e-3)
            row["tflop_per_s"] = bench.flops / (timing.median_ms * 1e-3) / 1e12
            rows.append(row)
            del bench, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.update(1)
    bar.close()
    return rows, skipped
