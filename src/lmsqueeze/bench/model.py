"""Full decode-step latency and batched throughput of a whole model over an N-token cache.

Generic over a step function: a variant builds, for (model, batch, length), a `StepBench` whose `fn()` runs one
decode step (all state closed over) and says whether to time it as a CUDA graph. The built-in variants are
transformers' own paths; lmsqueeze's generation path registers itself here to be timed the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmsqueeze.bench.caches import kv_shape, random_dynamic_cache, random_static_cache
from lmsqueeze.bench.device import fits
from lmsqueeze.bench.options import check_positive, parse_names
from lmsqueeze.bench.results import timing_row
from lmsqueeze.bench.timing import time_fn
from lmsqueeze.models.compat import cache_kw

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepBench:
    """One decode step: `fn()` -> logits [B, 1, V]; may be replayed any number of times (state is reset)."""

    fn: Callable[[], torch.Tensor]
    bytes_moved: int  # fewest bytes one step must move: weights read once + the KV cache read
    use_graph: bool  # time CUDA-graph replays of fn (launch overhead removed); False: time plain calls
    tokens: int  # tokens produced per call (the batch size)


StepBuilder = Callable[[nn.Module, int, int], StepBench]  # (model, batch, length) -> StepBench
STEP_VARIANTS: dict[str, StepBuilder] = {}


def register_step_variant(name: str) -> Callable[[StepBuilder], StepBuilder]:
    """Decorator: add a decode-step variant (timed by `run_step_sweep`) under `name`."""
    def deco(build: StepBuilder) -> StepBuilder:
        STEP_VARIANTS[name] = build
        return build
    return deco


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: all parameters except the input embedding table (only B rows
    of it are read), unless it is tied to the output head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def decode_step_bytes(model: nn.Module, batch: int, length: int) -> int:
    """Fewest bytes for one decode step at `length` cached tokens: weights + the K/V of length + 1 tokens."""
    return weight_bytes(model) + kv_shape(model).nbytes(batch, length + 1)


def decode_inputs(model: nn.Module, batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random next tokens input_ids: [B, 1] and their positions position_ids: [B, 1] (= length)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen, device=device)
    pos = torch.full((batch, 1), length, dtype=torch.long, device=device)
    return ids, pos


def static_step_fn(forward: Callable, cache, ids: torch.Tensor, pos: torch.Tensor,
                   model: nn.Module | None = None) -> Callable[[], torch.Tensor]:
    """One decode step into a StaticCache that leaves the cache as it found it (so a graph can be replayed).
    forward: the model, or a compiled version of `model`.

    StaticLayer advances its device-side `cumulative_length` on every update; the step winds it back by one.
    """
    lengths = [layer.cumulative_length for layer in cache.layers]
    try:
        torch._foreach_add_(lengths, 0)  # one fused launch to wind back all layers, where supported
        rewind = lambda: torch._foreach_sub_(lengths, 1)
    except (RuntimeError, NotImplementedError):
        def rewind() -> None:
            for t in lengths:
                t.sub_(1)

    kw = cache_kw(forward if model is None else model, cache)

    def step() -> torch.Tensor:
        logits = forward(input_ids=ids, position_ids=pos, **kw, use_cache=True).logits
        rewind()
        return logits
    return step


def _static(model: nn.Module, batch: int, length: int, use_graph: bool, forward: Callable | None = None):
    cache = random_static_cache(model, batch, length)
    ids, pos = decode_inputs(model, batch, length)
    fn = static_step_fn(model if forward is None else forward, cache, ids, pos, model)
    return StepBench(fn, decode_step_bytes(model, batch, length), use_graph, batch)


@register_step_variant("hf-static-graph")
def hf_static_graph(model: nn.Module, batch: int, length: int) -> StepBench:
    """transformers eager forward over a StaticCache, captured and replayed as one CUDA graph."""
    return _static(model, batch, length, use_graph=True)


@register_step_variant("hf-static-eager")
def hf_static_eager(model: nn.Module, batch: int, length: int) -> StepBench:
    """transformers eager forward over a StaticCache, plain launches (shows the launch overhead)."""
    return _static(model, batch, length, use_graph=False)


@register_step_variant("hf-static-compile")
def hf_static_compile(model: nn.Module, batch: int, length: int) -> StepBench:
    """torch.compile'd forward (inductor, no cudagraphs of its own) over a StaticCache, replayed as a CUDA graph.
    Compilation happens during warm-up and can take minutes on a real-size model."""
    compiled = torch.compile(model, dynamic=False, fullgraph=False)
    return _static(model, batch, length, use_graph=True, forward=compiled)


@register_step_variant("hf-dynamic-eager")
def hf_dynamic_eager(model: nn.Module, batch: int, length: int) -> StepBench:
    """transformers' default: eager forward over a DynamicCache (each step concatenates the whole cache).
    The cache grows by one token per timed call (0.2% over 60 calls at 32K)."""
    cache = random_dynamic_cache(model, batch, length)
    ids, pos = decode_inputs(model, batch, length)

    def step() -> torch.Tensor:
        return model(input_ids=ids, position_ids=pos, **cache_kw(model, cache), use_cache=True).logits
    return StepBench(step, decode_step_bytes(model, batch, length), False, batch)


def _logits_err(out: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None:
        return None
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def run_step_sweep(model: nn.Module, lengths: Sequence[int], batches: Sequence[int] = (1,),
                   variants: Sequence[str] = ("hf-static-graph", "hf-dynamic-eager"), baseline: str | None = None,
                   warmup: int = 5, iters: int = 30, peak_tb_per_s: float = 3.0, progress: bool = True,
                   **fields: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Time one decode step of every variant at every (batch, length); returns (rows, skipped messages).

    The baseline (default: the first variant) is timed first in each case; rows carry its time and the speedup,
    bytes moved and TB/s, tokens/s (throughput at that batch), and `logits_rel_err`: the variant's first-step
    logits against the baseline's (all caches hold the same random K/V). `fields` are added to every row.
    """
    from tqdm.auto import tqdm

    lengths = check_positive(list(lengths), "lengths")
    batches = check_positive(list(batches), "batch sizes")
    names = parse_names(variants, STEP_VARIANTS, "step variant")
    baseline = baseline or names[0]
    if baseline not in names:
        names.insert(0, baseline)
    names = [baseline] + [n for n in names if n != baseline]
    device = next(model.parameters()).device
    shape = kv_shape(model)
    rows, skipped = [], []
    cases = [(b, n) for b in batches for n in lengths]
    bar = tqdm(total=len(cases) * len(names), desc="decode step", disable=not progress or None)
    for batch, length in cases:
        need = int(shape.nbytes(batch, length + 1) * 1.1) + (1 << 30)
        if not fits(need, device):
            msg = f"B={batch} N={length}: the KV cache needs ~{need / 2**30:.1f} GiB, more than is free; skipped"
            log.warning(msg)
            skipped.append(msg)
            bar.update(len(names))
            continue
        base, ref = None, None
        for name in names:
            bar.set_postfix_str(f"B={batch} N={length} {name}")
            bench = STEP_VARIANTS[name](model, batch, length)
            with torch.no_grad():
                out = bench.fn()
                err = _logits_err(out, ref)
                timing = time_fn(bench.fn, device, warmup, iters, bench.use_graph)
            if name == baseline:
                base, ref = timing, out
            row = timing_row(name, timing, baseline=baseline, baseline_timing=base, bytes_moved=bench.bytes_moved,
                             peak_tb_per_s=peak_tb_per_s, **fields, batch=batch, length=length,
                             logits_rel_err=err)
            row["tokens_per_s"] = bench.tokens / (timing.median_ms * 1e-3)
            rows.append(row)
            del bench, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.update(1)
        del ref
    bar.close()
    return rows, skipped
