"""Decode attention: one new query per sequence over a preallocated (static) KV slot cache.

Triton flash-decoding on CUDA tensors, the float32 PyTorch reference (`reference.py`) on CPU.

How to use it from a static cache inside a CUDA graph
-----------------------------------------------------
Allocate once, outside the graph::

    k_cache = torch.empty(B, Hkv, S_max, D, dtype=bf16, device="cuda")   # or a view of a bigger buffer
    v_cache = torch.empty_like(k_cache)
    lengths = torch.zeros(B, dtype=torch.int32, device="cuda")           # filled slots per sequence
    starts  = torch.zeros(B, dtype=torch.int32, device="cuda")           # left padding, or None

Each decode step (the part that is captured) writes the new token's (RoPE-rotated) k/v at slot
`lengths[b]` with a device-side index (`index_copy_` / scatter, e.g.
`k_cache[torch.arange(B), :, lengths] = k_new`), increments `lengths` in place (`lengths.add_(1)`), then calls
`out = decode_attention(q, k_cache, v_cache, lengths, scaling, starts=starts, window=window)`.

Why this captures and replays correctly:
- the launch grid is (B * Hkv, num_splits) with num_splits chosen from (B, Hkv, S_max) only, never from
  the lengths' values, so one captured graph serves every length up to S_max;
- the kernel reads `lengths` / `starts` from device memory and splits only the *valid* slot range
  [max(start, length - window), length) among its programs, so a half-empty static buffer costs no
  extra bytes (each replay reads just the filled slots) and every program has equal work;
- nothing synchronises with the host (no `.item()`, no data-dependent shapes); the two small partial
  buffers are allocated from the graph's private pool during capture.
Pass the same `num_splits` (or leave it None) at capture and replay; keep `lengths <= S_max` (growing the
buffer means re-capturing, outside the graph). Programs whose chunk is empty write lse = -inf and are
ignored by the merge; a sequence with no valid slot returns out = 0 (lse = -inf).
"""

from __future__ import annotations

import functools

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.reference import decode_attention_reference

SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 128
# Split-kernel programs to aim for per SM. With BLOCK_N=64, 4 warps, 3 stages (96 KB shared memory) two
# programs fit on an H100 SM, so 2 per SM is one full wave; 4 per SM (two waves) was slower at 128K in the
# sweeps of benchmarks/results/decode_kernel_h100_first_sweep.json and decode_kernel_h100.json.
PROGRAMS_PER_SM = 2


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter / CPU: pretend H100 so tests exercise the same split logic
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def default_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Slots per tile: 64 for 2-byte dtypes up to D=128, smaller for wide rows (shared-memory budget)."""
    row_bytes = head_dim * (4 if dtype == torch.float32 else 2)
    return 64 if row_bytes <= 256 else 32


def default_num_splits(batch: int, kv_heads: int, s_max: int, block_n: int, sms: int = 132,
                       programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Splits of the sequence per (batch, KV head): enough programs to fill the GPU, at most one tile each.

    Depends only on shapes (never on lengths), so a captured CUDA graph stays valid for every length.
    """
    want = -(-programs_per_sm * sms // (batch * kv_heads))
    tiles = -(-s_max // block_n)
    return max(1, min(want, tiles, MAX_SPLITS))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
           starts: torch.Tensor | None, window: int | None, kernel: bool = True) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise LmsqueezeError(f"decode_attention wants q [B, Hq, D] and k/v caches [B, Hkv, S_max, D]; got "
                             f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % k_cache.shape[1] != 0:
        raise LmsqueezeError(f"q {tuple(q.shape)} does not match caches {tuple(k_cache.shape)}: batch and head "
                             "dim must agree and query heads must be a multiple of KV heads")
    if kernel and D not in SUPPORTED_HEAD_DIMS:
        raise LmsqueezeError(f"head dim {D} is not supported by decode_attention; use one of "
                             f"{SUPPORTED_HEAD_DIMS} or the reference")
    if kernel and q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise LmsqueezeError(f"decode_attention needs q/k/v of one dtype among fp16/bf16/fp32; got "
                             f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise LmsqueezeError("decode_attention needs the last (head) dim of q/k/v contiguous; call .contiguous()")
    for name, t in (("lengths", lengths), ("starts", starts)):
        if t is not None and (t.dtype != torch.int32 or t.shape != (B,) or t.device != q.device):
            raise LmsqueezeError(f"{name} must be an int32 [B] tensor on {q.device}; got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
    if window is not None and window < 1:
        raise LmsqueezeError(f"window must be a positive number of slots or None, got {window}")


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            lengths: torch.Tensor, scaling: float, starts: torch.Tensor | None = None,
                            window: int | None = None, num_splits: int | None = None,
                            return_lse: bool = False, *, block_n: int | None = None,
                            num_warps: int = 4, num_stages: int = 3):
    """The Triton kernel on any tensors Triton accepts (CUDA, or CPU under TRITON_INTERPRET=1).

    Same contract as `decode_attention`; block_n / num_warps / num_stages are tuning knobs.
    """
    _check(q, k_cache, v_cache, lengths, starts, window)
    from lmsqueeze.kernels._triton_decode import decode_attention_launch

    B, _, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    block_n = block_n or default_block_n(D, q.dtype)
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, s_max, block_n, _device_sms(q.device))
    if not 1 <= num_splits <= 4096:
        raise LmsqueezeError(f"num_splits must be in 1..4096, got {num_splits}")
    return decode_attention_launch(q, k_cache, v_cache, lengths, scaling, starts, window, num_splits,
                                   return_lse, block_n, num_warps, num_stages)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scaling: float, starts: torch.Tensor | None = None, window: int | None = None,
                     num_splits: int | None = None, return_lse: bool = False):
    """Attention of one query per sequence over the valid slots of a static KV cache.

    q: [B, Hq, D] (RoPE applied); k_cache, v_cache: [B, Hkv, S_max, D] (may be strided views; last dim
    contiguous); lengths: [B] int32 device tensor = filled slots; starts: [B] int32 or None = first valid
    slot (left padding before it); window: None or attend only slots j >= lengths - window.
    Hq = G * Hkv (query head h reads KV head h // G); D in {64, 96, 128, 256}; fp16 / bf16 / fp32.
    num_splits: sequence splits per (batch, KV head); None picks one from the shapes (graph-safe).
    Returns out: [B, Hq, D] in q's dtype, plus lse: [B, Hq] float32 natural-log when return_lse.
    CUDA tensors run the Triton kernel (no host sync; CUDA-graph capturable); others the reference.
    """
    if q.is_cuda:
        return decode_attention_triton(q, k_cache, v_cache, lengths, scaling, starts, window, num_splits,
                                       return_lse)
    _check(q, k_cache, v_cache, lengths, starts, window, kernel=False)
    return decode_attention_reference(q, k_cache, v_cache, lengths, scaling, starts, window, num_splits,
                                      return_lse)
