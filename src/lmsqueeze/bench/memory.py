"""Peak GPU memory of decoding and prefill at a context length (`torch.cuda.max_memory_allocated`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmsqueeze.bench.caches import kv_shape, random_static_cache
from lmsqueeze.bench.device import fits
from lmsqueeze.bench.model import decode_inputs, static_step_fn
from lmsqueeze.bench.options import check_positive
from lmsqueeze.bench.prefill import PREFILL_VARIANTS

log = logging.getLogger(__name__)

GIB = 2**30


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def memory_report(model: nn.Module, lengths: Sequence[int], batches: Sequence[int] = (1,), chunk: int = 4096,
                  prefill_variants: Sequence[str] = ("hf-static-chunked", "hf-dynamic-full"),
                  **fields: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of measured memory (GiB) next to what the tensors need, for each (batch, length):

    stage "weights" (allocated), "kv-cache" (allocated by a StaticCache of length + 1 tokens), "decode-step"
    (peak during one step over it), and "prefill" per prefill variant (peak while prefilling `length` tokens).
    Off CUDA the measured columns are None (only the expected sizes are reported).
    """
    lengths = check_positive(list(lengths), "lengths")
    batches = check_positive(list(batches), "batch sizes")
    device = next(model.parameters()).device
    if device.type != "cuda":
        log.warning("memory is measured with torch.cuda; on %s only the expected sizes are reported", device)
    shape = kv_shape(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows: list[dict[str, Any]] = [dict(fields, method="hf", stage="weights", batch=None, length=None,
                                       allocated_gib=_gib(_allocated(device)), expected_gib=_gib(weights))]
    skipped = []
    for batch in batches:
        for length in lengths:
            case = dict(fields, batch=batch, length=length)
            kv = shape.nbytes(batch, length + 1)
            if not fits(2 * kv + (2 << 30), device):
                skipped.append(f"B={batch} N={length}: needs ~{2 * kv / GIB:.1f} GiB, more than is free; skipped")
                log.warning(skipped[-1])
                continue
            _reset_peak(device)
            before = _allocated(device)
            cache = random_static_cache(model, batch, length)
            after = _allocated(device)
            rows.append(dict(case, method="hf-static", stage="kv-cache",
                             allocated_gib=None if after is None else _gib(after - before), expected_gib=_gib(kv)))
            ids, pos = decode_inputs(model, batch, length)
            step = static_step_fn(model, cache, ids, pos, model)
            _reset_peak(device)
            with torch.no_grad():
                step()
            rows.append(dict(case, method="hf-static", stage="decode-step", peak_gib=_gib(_peak(device)),
                             expected_gib=_gib(weights + kv)))
            del cache, step
            gen = torch.Generator(device=device).manual_seed(0)
            prompt = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen, device=device)
            for name in prefill_variants:
                row = dict(case, method=name, stage="prefill",
                           expected_gib=_gib(weights + shape.nbytes(batch, length)))
                try:
                    bench = PREFILL_VARIANTS[name](model, prompt, chunk)
                    _reset_peak(device)
                    with torch.no_grad():
                        bench.fn()
                    row.update(chunk=bench.chunk, peak_gib=_gib(_peak(device)))
                    del bench
                except torch.OutOfMemoryError:
                    row.update(peak_gib=None, note="out of memory")
                    log.warning("B=%d N=%d %s prefill: out of memory", batch, length, name)
                rows.append(row)
            _reset_peak(device)
    return rows, skipped
