"""Launchers of CHESS's sparse GEMV kernels: Triton on CUDA tensors, `cpu.py` on CPU tensors.

    y = input_sparse_matvec(x, w_t, threshold, bias)   # x: [B, K], w_t: [K, N] -> [B, N]   (down, q, o)
    h = gate_up_sparse(x, w_gate, w_up, thresholds)     # x: [B, H], w_*: [I, H], t: [I] -> [B, I]

Both read only the weight rows the surviving activations need: the row of w_t for each input channel
with a nonzero (after thresholding) in some batch row (the union), and the row of w_up for each FFN
channel that survives in some batch row. Sparsity therefore pays only at small batch (the union fills
up: with independent 50% masks, 1 - 0.5^B of the rows are needed); callers use them for B <= 16.

Tile configs: on the first call with a new (shape, dtype, batch bucket) outside CUDA-graph capture, a few
candidate configs are timed on the actual inputs and the fastest is kept for the process (`_CHOICE`).
Under TRITON_INTERPRET=1 (tests on CPU tensors) the first candidate is used.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.tickets import ticket_buffer

log = logging.getLogger(__name__)

MAX_KERNEL_BATCH = 16
_CHOICE: dict[tuple, object] = {}
_TICKETS: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True, slots=True)
class SpmvConfig:
    """Input-sparse GEMV tiles: BLOCK_N outputs x BLOCK_K inputs per step; programs_per_sm sets the split."""

    block_n: int
    block_k: int
    num_warps: int
    programs_per_sm: int
    prefetch: bool = False  # batch 1 only: request the next tiles before this step's multiply-adds
    fused: bool = False  # batch 1 only: the last program of each column block reduces the partials (one launch)
    compact: bool = False  # batch 1 only: fused, and each program walks a compacted list of its surviving inputs
    pipe: int = 0  # batch 1 only, 1 or 2: fused, with the W tiles of the next `pipe` steps requested ahead
    tile_reduce: bool = False  # fused / pipe: the last program loads all partials as one tile (one round trip)
    evict: bool = False  # fused: weight loads marked evict-first (each weight byte is read once per call)
    xnext: bool = False  # fused: the next step's x is requested before this step's W tile


@dataclass(frozen=True, slots=True)
class GateUpConfig:
    """Gate/up kernel tiles: BLOCK_I channels per program, BLOCK_H hidden entries per step."""

    block_i: int
    block_h: int
    num_warps: int


SPMV_CONFIGS_B1 = (  # first: the fastest at Llama-3-8B down_proj and q/o, 30/50/70%, H100 (chess_gpu_h100_v8/v9.json);
    # a column-blocked weight layout, a preloaded x range (commit 371f1c3), programmatic dependent launch (fcbeb7e)
    # a per-step reduction (cbb09bc) and half-tile steps (71ff35f) were correct but not faster there
    # (chess_gpu_h100_v6/v7/v9/v10.json)
    SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True, evict=True, xnext=True),
    SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True, evict=True), SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True),
    SpmvConfig(64, 64, 2, 8, fused=True), SpmvConfig(128, 64, 4, 4), SpmvConfig(256, 32, 4, 4), SpmvConfig(128, 128, 8, 4), SpmvConfig(256, 64, 8, 2),
    SpmvConfig(128, 64, 4, 8), SpmvConfig(64, 128, 4, 4), SpmvConfig(256, 64, 8, 4), SpmvConfig(512, 32, 8, 4),
    SpmvConfig(128, 32, 4, 8), SpmvConfig(128, 64, 4, 16), SpmvConfig(256, 32, 4, 8), SpmvConfig(64, 64, 2, 8),
    SpmvConfig(128, 64, 4, 4, True), SpmvConfig(128, 32, 4, 4, True), SpmvConfig(256, 32, 8, 4, True),
    SpmvConfig(128, 64, 4, 2, True), SpmvConfig(64, 64, 2, 8, True), SpmvConfig(128, 32, 4, 8, True),
    SpmvConfig(256, 64, 8, 2, True), SpmvConfig(64, 128, 4, 4, True),
    # wider column blocks (longer contiguous row segments per request) and the fused one-launch reduction
    SpmvConfig(512, 16, 4, 8), SpmvConfig(1024, 16, 8, 4), SpmvConfig(1024, 8, 4, 8),
    SpmvConfig(128, 64, 4, 4, fused=True), SpmvConfig(128, 32, 4, 8, fused=True),
    SpmvConfig(256, 32, 4, 8, fused=True), SpmvConfig(256, 16, 4, 8, fused=True), SpmvConfig(512, 16, 4, 8, fused=True),
    SpmvConfig(512, 32, 8, 4, fused=True), SpmvConfig(1024, 16, 8, 4, fused=True), SpmvConfig(1024, 8, 4, 8, fused=True),
    SpmvConfig(64, 64, 2, 16, fused=True), SpmvConfig(128, 32, 4, 16, fused=True), SpmvConfig(256, 16, 4, 16, fused=True),
    SpmvConfig(64, 32, 2, 16, fused=True), SpmvConfig(128, 64, 4, 8, fused=True),
)
# Compacted-index variants (one launch): swept on the GPU by bench_chess_gpu.py with the configs above; a
# variant joins SPMV_CONFIGS_B1 (the runtime autotuner's candidates) only after it passed the GPU check there.
SPMV_CONFIGS_COMPACT = (
    SpmvConfig(64, 64, 2, 8, compact=True), SpmvConfig(64, 32, 2, 8, compact=True), SpmvConfig(128, 32, 4, 8, compact=True),
    SpmvConfig(128, 64, 4, 4, compact=True), SpmvConfig(64, 64, 4, 8, compact=True), SpmvConfig(64, 64, 2, 16, compact=True),
    SpmvConfig(128, 16, 4, 8, compact=True), SpmvConfig(256, 16, 4, 8, compact=True), SpmvConfig(256, 32, 8, 4, compact=True),
    SpmvConfig(64, 128, 4, 8, compact=True), SpmvConfig(128, 64, 8, 8, compact=True), SpmvConfig(32, 64, 1, 16, compact=True),
)
# Software-pipelined fused variants (`_triton_sparse_pipe.py`), swept on the GPU by bench_chess_gpu.py: all
# correct and all slower than the fused default at down_proj / q-o 50% (chess_gpu_h100_v4.json), so none is
# in SPMV_CONFIGS_B1.
SPMV_CONFIGS_PIPE = (
    SpmvConfig(64, 64, 2, 8, pipe=1), SpmvConfig(64, 64, 2, 8, pipe=2), SpmvConfig(64, 32, 2, 8, pipe=2),
    SpmvConfig(64, 64, 4, 8, pipe=1), SpmvConfig(64, 32, 1, 16, pipe=2), SpmvConfig(128, 32, 4, 4, pipe=2),
    SpmvConfig(128, 32, 2, 8, pipe=2), SpmvConfig(128, 64, 4, 4, pipe=1), SpmvConfig(128, 16, 2, 8, pipe=2),
    SpmvConfig(256, 16, 4, 4, pipe=2), SpmvConfig(256, 32, 4, 4, pipe=1), SpmvConfig(256, 16, 2, 8, pipe=2),
    SpmvConfig(512, 16, 4, 4, pipe=2), SpmvConfig(512, 8, 4, 4, pipe=2), SpmvConfig(64, 64, 2, 4, pipe=2),
    SpmvConfig(64, 32, 2, 12, pipe=2), SpmvConfig(32, 64, 1, 16, pipe=2), SpmvConfig(64, 128, 4, 4, pipe=1),
)
# The fused kernel with the one-tile reduction of the partials, swept by bench_chess_gpu.py (chess_gpu_h100_v5/v6.json:
# the first, with evict-first weight loads, is the batch-1 default).
SPMV_CONFIGS_TILE_REDUCE = (
    SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True), SpmvConfig(64, 128, 4, 4, fused=True, tile_reduce=True),
    SpmvConfig(64, 64, 2, 16, fused=True, tile_reduce=True), SpmvConfig(64, 32, 2, 16, fused=True, tile_reduce=True),
    SpmvConfig(128, 64, 4, 4, fused=True, tile_reduce=True), SpmvConfig(128, 32, 4, 8, fused=True, tile_reduce=True),
    SpmvConfig(64, 32, 2, 8, pipe=2, tile_reduce=True), SpmvConfig(32, 64, 1, 16, fused=True, tile_reduce=True),
)
# Fused variants swept by bench_chess_gpu.py; one joins SPMV_CONFIGS_B1 only after a same-run GPU timing shows it faster.
SPMV_CONFIGS_FUSED_SWEEP = (
    SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True, xnext=True),
    SpmvConfig(64, 128, 4, 4, fused=True, tile_reduce=True, evict=True, xnext=True),
    SpmvConfig(64, 32, 2, 16, fused=True, tile_reduce=True, evict=True, xnext=True),
)
SPMV_CONFIGS_DOT = (
    SpmvConfig(128, 64, 4, 4), SpmvConfig(64, 64, 4, 4), SpmvConfig(128, 32, 4, 8), SpmvConfig(256, 64, 8, 2),
)
GATE_UP_CONFIGS_B1 = (
    GateUpConfig(16, 256, 4), GateUpConfig(8, 512, 4), GateUpConfig(32, 256, 8), GateUpConfig(16, 512, 8),
    GateUpConfig(8, 256, 2), GateUpConfig(32, 128, 4), GateUpConfig(32, 256, 4),
)
GATE_UP_CONFIGS_DOT = (
    GateUpConfig(16, 128, 4), GateUpConfig(32, 128, 4), GateUpConfig(64, 64, 4), GateUpConfig(32, 256, 8),
)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter: pretend an H100 so tests run the same split logic
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _block_b(B: int) -> int:
    if B > MAX_KERNEL_BATCH:
        raise LmsqueezeError(f"sparse GEMV kernels take at most {MAX_KERNEL_BATCH} rows, got {B}; "
                             "use the dense path for larger batches")
    return 1 if B == 1 else 16


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _pick(key: tuple, configs: tuple, run) -> object:
    """The cached config for `key`; else time `run(cfg)` for each candidate (CUDA only) and keep the best."""
    if key in _CHOICE:
        return _CHOICE[key]
    device = key[-1]
    if _interpreting() or device.type != "cuda" or _capturing(device) or len(configs) == 1:
        return configs[0]
    from triton.testing import do_bench

    best, best_ms = configs[0], float("inf")
    for cfg in configs:
        try:
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=25, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (e.g. out of shared memory) is skipped
            log.debug("config %s failed: %s", cfg, e)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _CHOICE[key] = best
    log.info("sparse GEMV %s: chose %s (%.1f us)", key[:-1], best, best_ms * 1e3)
    return best


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise LmsqueezeError(f"{name} must be 2D with contiguous rows, got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")


def _num_splits(K: int, n_blocks: int, block_k: int, programs_per_sm: int, device: torch.device) -> int:
    target = max(1, (programs_per_sm * _sms(device)) // max(n_blocks, 1))
    return max(1, min(target, triton_cdiv(K, block_k)))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _red_splits(cfg: SpmvConfig, splits: int) -> int:
    """RED_SPLITS of the fused kernels: 0 (a loop over the splits) unless cfg.tile_reduce and the
    [next_pow2(splits), block_n] float32 tile of partials stays small enough for registers."""
    p = _next_pow2(splits)
    return p if cfg.tile_reduce and p * cfg.block_n <= 8192 else 0


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """One ticket per column block for the fused kernels (`lmsqueeze.kernels.tickets`)."""
    return ticket_buffer(_TICKETS, device, n)


def input_sparse_matvec_triton(x: torch.Tensor, w_t: torch.Tensor, threshold: float = 0.0,
                               bias: torch.Tensor | None = None, config: SpmvConfig | None = None
                               ) -> torch.Tensor:
    """Triton: y = threshold(x) @ w_t (+ bias), reading only the rows of w_t of surviving inputs.

    x: [B, K] (B <= 16); w_t: [K, N] with contiguous rows; bias: [N] or None -> y: [B, N] in x's dtype.
    float32 accumulation. No host synchronisation: safe inside a CUDA graph.
    """
    from lmsqueeze.methods.chess import _triton_sparse as ts

    _check_2d("x", x)
    _check_2d("w_t", w_t)
    B, K = x.shape
    N = w_t.shape[1]
    if w_t.shape[0] != K:
        raise LmsqueezeError(f"x has {K} inputs but w_t has {w_t.shape[0]} rows")
    if threshold < 0:
        raise LmsqueezeError(f"threshold must be >= 0, got {threshold}")
    BB = _block_b(B)
    ieee = x.dtype == torch.float32

    def run(cfg: SpmvConfig) -> torch.Tensor:
        n_blocks = triton_cdiv(N, cfg.block_n)
        splits = _num_splits(K, n_blocks, cfg.block_k, cfg.programs_per_sm, x.device)
        k_per = triton_cdiv(triton_cdiv(K, splits), cfg.block_k) * cfg.block_k
        splits = triton_cdiv(K, k_per)
        part = torch.empty(splits, B, N, dtype=torch.float32, device=x.device)
        if cfg.pipe and BB == 1:
            from lmsqueeze.methods.chess import _triton_sparse_pipe as tp

            if cfg.pipe not in (1, 2):
                raise LmsqueezeError(f"SpmvConfig.pipe must be 0, 1 or 2, got {cfg.pipe}")
            y = torch.empty(B, N, dtype=x.dtype, device=x.device)
            tp._input_sparse_b1_pipe_kernel[(n_blocks, splits)](
                x, w_t, part, _tickets(x.device, n_blocks), bias if bias is not None else part, y, K, N, k_per,
                splits, float(threshold), w_t.stride(0), part.stride(0),
                BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, DEPTH=cfg.pipe, HAS_BIAS=bias is not None,
                RED_SPLITS=_red_splits(cfg, splits), num_warps=cfg.num_warps,
            )
            return y
        if cfg.compact and BB == 1:
            y = torch.empty(B, N, dtype=x.dtype, device=x.device)
            idx = torch.empty(splits * k_per, dtype=torch.int32, device=x.device)
            ts._input_sparse_b1_compact_kernel[(n_blocks, splits)](
                x, w_t, part, _tickets(x.device, n_blocks), bias if bias is not None else part, y, idx, K, N, k_per,
                splits, float(threshold), w_t.stride(0), part.stride(0),
                BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, SCAN=min(1024, _next_pow2(k_per)),
                HAS_BIAS=bias is not None, num_warps=cfg.num_warps,
            )
            return y
        if cfg.fused and BB == 1:
            y = torch.empty(B, N, dtype=x.dtype, device=x.device)
            ts._input_sparse_b1_fused_kernel[(n_blocks, splits)](
                x, w_t, part, _tickets(x.device, n_blocks), bias if bias is not None else part, y, K, N, k_per,
                splits, float(threshold), w_t.stride(0), part.stride(0),
                BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, HAS_BIAS=bias is not None,
                RED_SPLITS=_red_splits(cfg, splits), EVICT=cfg.evict, XNEXT=cfg.xnext, num_warps=cfg.num_warps,
            )
            return y
        ts._input_sparse_kernel[(n_blocks, splits)](
            x, w_t, part, B, K, N, k_per, float(threshold),
            x.stride(0), w_t.stride(0), part.stride(0), part.stride(1),
            BLOCK_B=BB, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, IEEE_DOT=ieee,
            PREFETCH=cfg.prefetch and BB == 1, num_warps=cfg.num_warps,
        )
        y = torch.empty(B, N, dtype=x.dtype, device=x.device)
        rb = 256
        ts._reduce_kernel[(triton_cdiv(N, rb), B)](
            part, bias if bias is not None else part, y, N, splits, part.stride(0), part.stride(1),
            y.stride(0), HAS_BIAS=bias is not None, BLOCK_N=rb, num_warps=2,
        )
        return y

    if config is None:
        configs = SPMV_CONFIGS_B1 if BB == 1 else SPMV_CONFIGS_DOT
        config = _pick(("spmv", K, N, BB, x.dtype, w_t.dtype, x.device), configs, run)
    return run(config)


def gate_up_sparse_triton(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, thresholds: torch.Tensor,
                          config: GateUpConfig | None = None) -> torch.Tensor:
    """Triton: h = silu(x W_gate^T) * (x W_up^T), zero where |silu(gate)| <= thresholds; up rows read sparsely.

    x: [B, H] (B <= 16); w_gate, w_up: [I, H] with contiguous rows; thresholds: [I] float32 -> h: [B, I]
    in x's dtype. No host synchronisation: safe inside a CUDA graph.
    """
    from lmsqueeze.methods.chess import _triton_sparse as ts

    _check_2d("x", x)
    _check_2d("w_gate", w_gate)
    _check_2d("w_up", w_up)
    B, H = x.shape
    I = w_gate.shape[0]
    if w_gate.shape != (I, H) or w_up.shape != (I, H):
        raise LmsqueezeError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must both be [{I}, {H}]")
    if thresholds.shape != (I,):
        raise LmsqueezeError(f"thresholds must have shape [{I}], got {tuple(thresholds.shape)}")
    t = thresholds.float().contiguous()
    BB = _block_b(B)
    ieee = x.dtype == torch.float32

    def run(cfg: GateUpConfig) -> torch.Tensor:
        h = torch.empty(B, I, dtype=x.dtype, device=x.device)
        ts._gate_up_kernel[(triton_cdiv(I, cfg.block_i),)](
            x, w_gate, w_up, t, h, B, H, I,
            x.stride(0), w_gate.stride(0), w_up.stride(0), h.stride(0),
            BLOCK_B=BB, BLOCK_I=cfg.block_i, BLOCK_H=cfg.block_h, IEEE_DOT=ieee, num_warps=cfg.num_warps,
        )
        return h

    if config is None:
        configs = GATE_UP_CONFIGS_B1 if BB == 1 else GATE_UP_CONFIGS_DOT
        config = _pick(("gate_up", I, H, BB, x.dtype, w_gate.dtype, x.device), configs, run)
    return run(config)


def input_sparse_matvec(x: torch.Tensor, w_t: torch.Tensor, threshold: float = 0.0,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the vectorised CPU path otherwise. x: [B, K], w_t: [K, N] -> [B, N]."""
    if x.is_cuda:
        return input_sparse_matvec_triton(x, w_t, threshold, bias)
    from lmsqueeze.methods.chess.cpu import input_sparse_matvec_cpu

    return input_sparse_matvec_cpu(x, w_t, threshold, bias)


def gate_up_sparse(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, thresholds: torch.Tensor
                   ) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the vectorised CPU path otherwise. x: [B, H] -> h: [B, I]."""
    if x.is_cuda:
        return gate_up_sparse_triton(x, w_gate, w_up, thresholds)
    from lmsqueeze.methods.chess.cpu import gate_up_sparse_cpu

    return gate_up_sparse_cpu(x, w_gate, w_up, thresholds)
