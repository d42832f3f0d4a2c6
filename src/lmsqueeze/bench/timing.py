"""Honest timers: CUDA events after warm-up, median of >= 20 runs, CUDA-graph replays to remove launch overhead."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

MIN_ITERS = 20


@dataclass(slots=True)
class Timing:
    """Per-call times in milliseconds over `iters` timed runs (after warm-up)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int
    graph: bool  # True: the times are CUDA-graph replays (no launch overhead)
    note: str = ""  # why a graph was asked for but not used, or "cpu"


def _check(warmup: int, iters: int, calls_per_iter: int) -> None:
    if iters < MIN_ITERS:
        raise LmsqueezeError(f"iters must be >= {MIN_ITERS} (median of at least {MIN_ITERS} runs), got {iters}")
    if warmup < 0:
        raise LmsqueezeError(f"warmup must be >= 0, got {warmup}")
    if calls_per_iter < 1:
        raise LmsqueezeError(f"calls_per_iter must be >= 1, got {calls_per_iter}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linear interpolation between order statistics."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list[float], graph: bool, note: str = "") -> Timing:
    """A Timing from per-run times in milliseconds."""
    return Timing(percentile(times_ms, 50), percentile(times_ms, 10), percentile(times_ms, 90), len(times_ms),
                  graph, note)


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Capture one call of `fn` in a CUDA graph (after one more warm-up call on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on its own side stream
        fn()
    torch.cuda.synchronize()
    return graph


def time_cuda(fn: Callable[[], object], warmup: int = 10, iters: int = 50, use_graph: bool = True,
              calls_per_iter: int = 1) -> Timing:
    """Time `fn` on the current CUDA device with events; times are per call of `fn` / `calls_per_iter`.

    With `use_graph`, `fn` is captured in a CUDA graph after warm-up and the graph is replayed, so the times hold
    no launch overhead; if capture fails the plain calls are timed and `Timing.note` says why.
    `calls_per_iter`: how many logical calls one `fn()` makes (e.g. one per rotated input set).
    """
    _check(warmup, iters, calls_per_iter)
    if not torch.cuda.is_available():
        raise LmsqueezeError("time_cuda needs a CUDA GPU; use time_cpu on this machine")
    torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run, graph, note = fn, None, ""
    if use_graph:
        try:
            graph = capture_graph(fn)
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to plain calls
            torch.cuda.synchronize()
            note = f"graph capture failed, timed without graph: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log.warning(note)
            graph = None
            for _ in range(max(1, warmup)):  # the failed capture may have left lazy state half-built
                fn()
            torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / calls_per_iter for s, e in zip(starts, ends)]
    del graph
    return summarize(times, graph=run is not fn, note=note)


def time_cpu(fn: Callable[[], object], warmup: int = 3, iters: int = 20, calls_per_iter: int = 1) -> Timing:
    """Time `fn` on the CPU with `time.perf_counter`; times are per call of `fn` / `calls_per_iter`."""
    _check(warmup, iters, calls_per_iter)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3 / calls_per_iter)
    return summarize(times, graph=False, note="cpu")


def time_fn(fn: Callable[[], object], device: str | torch.device, warmup: int = 10, iters: int = 50,
            use_graph: bool = True, calls_per_iter: int = 1) -> Timing:
    """`time_cuda` on a CUDA device, `time_cpu` otherwise."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, warmup, iters, use_graph, calls_per_iter)
    return time_cpu(fn, warmup, iters, calls_per_iter)
