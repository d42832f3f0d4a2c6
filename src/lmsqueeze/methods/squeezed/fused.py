"""The one-launch Squeezed decode of a flat index: centroid scores, the keep decision, the listing of kept clusters
and the attention over them in one kernel (_triton_fused.py), the PG programs of each (sequence, KV head) meeting
at two barriers; then the shared split merge. Graph-capturable: no host synchronisation, grids from shapes only.
Reference: reference.centroid_scores_reference then reference.squeezed_decode_reference."""

from __future__ import annotations

import os

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.pdl import pdl_options
from lmsqueeze.kernels.tickets import ticket_buffer
from lmsqueeze.methods.squeezed import kernels as K
from lmsqueeze.methods.squeezed.kernels import _pow2

# programs per (sequence, KV head) sharing the lookup and the attention; capped so that PG + the local-slot
# programs fit on the GPU's SMs (one resident program per SM is enough for the barrier to be safe)
FUSED_PROGRAMS = 128
FUSED_STAGES = 3
_BARRIERS: dict = {}


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_programs(device: torch.device, nloc: int, programs: int | None = None) -> int:
    """PG for this device: `programs` (None: FUSED_PROGRAMS), at most the SM count minus the local programs."""
    pg = int(programs or FUSED_PROGRAMS)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pg = min(pg, _sm_count(device) - nloc)
    if pg < 1:
        raise LmsqueezeError(f"squeezed_decode_fused: programs must be >= 1, got {pg}")
    return pg


def squeezed_decode_fused_triton(q, centroids, lsizes, keys, values, offsets, log_tau, local_k, local_v, lengths,
                                 scaling, starts=None, *, programs: int | None = None, one_launch: bool | None = None,
                                 count_kept: bool = True, partials_only: bool = False, block_n: int | None = None,
                                 block_e: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                                 local_splits: int | None = None, maxnreg: int | None = None,
                                 phases: tuple | None = None):
    """Flat-index decode in one launch (+ merge): same result as `kernels.centroid_scores` followed by
    `kernels.squeezed_decode` (no window / local_valid). q: [B, Hq, D] rotated; centroids: [Hkv, C, D]; lsizes:
    [Hkv, C] float32; keys, values: [Hkv, N, D] sorted by cluster; offsets: [Hkv, C + 2] int32; log_tau: [Hkv];
    local_k, local_v: [B, Hkv, L, D]; lengths / starts: [B] int32. Returns (out [B, Hq, D], lse [B, Hq] float32,
    kept [B, Hkv] int32 fixed rows read, or None unless `count_kept`); partials_only: (mid_o, mid_lse).
    one_launch (None: on CUDA outside the interpreter): the three phases in one launch with barriers; False:
    three launches of the same kernel, one phase each. phases: with one_launch=False, run only these of (1, 2, 3)
    (profiling)."""
    from lmsqueeze.methods.squeezed._triton_fused import _fused_decode_kernel

    B, Hq, D = q.shape
    Hkv, C, _ = centroids.shape
    G = K._check_heads(q, Hkv, keys.shape[-1], "squeezed_decode_fused")
    K._check_decode_inputs(q, keys, values, offsets, local_k, local_v, C, B, Hkv, D)
    if lsizes.shape != (Hkv, C) or centroids.shape[-1] != D:
        raise LmsqueezeError(f"squeezed_decode_fused: centroids {tuple(centroids.shape)} / log sizes "
                             f"{tuple(lsizes.shape)} do not match {Hkv} KV heads, head dim {D}")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if one_launch is None:
        one_launch = q.is_cuda and not interp
    if one_launch and interp:
        raise LmsqueezeError("squeezed_decode_fused: one_launch needs a GPU (the interpreter runs programs one "
                             "after another, so its barrier would never open); pass one_launch=False")
    l_max = local_k.shape[2]
    nloc = local_splits or K.default_local_splits(l_max)
    pg = fused_programs(q.device, nloc, programs)
    cp = -(-(C + 1) // pg)
    block_c = max(16, min(128, _pow2(cp)))
    nt = -(-cp // block_c)
    dev = q.device
    scores = torch.empty(B, Hq, C, device=dev, dtype=torch.float32)
    part_lse = torch.empty(B, Hq, pg, device=dev, dtype=torch.float32)
    start = torch.empty(B * Hkv, pg, nt * block_c, device=dev, dtype=torch.int32)
    size = torch.empty_like(start)
    count = torch.empty(B * Hkv, pg, device=dev, dtype=torch.int32)
    kept_rows = torch.empty_like(count)
    bar = ticket_buffer(_BARRIERS, dev, 64 * B * Hkv)
    splits = pg + nloc
    mid_o = torch.empty(B, Hq, splits, D, device=dev, dtype=torch.float32)
    mid_lse = torch.empty(B, Hq, splits, device=dev, dtype=torch.float32)
    args = (q, centroids, lsizes, offsets, log_tau, keys, values, local_k, local_v, lengths,
            starts if starts is not None else lengths, scores, part_lse, start, size, count, kept_rows, bar, mid_o,
            mid_lse,
            q.stride(0), q.stride(1), centroids.stride(0), centroids.stride(1), lsizes.stride(0), offsets.stride(0),
            keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), scores.stride(0), scores.stride(1),
            part_lse.stride(0), part_lse.stride(1),
            local_k.stride(0), local_k.stride(1), local_k.stride(2), local_v.stride(0), local_v.stride(1),
            local_v.stride(2),
            C, cp, pg, nloc, l_max, float(scaling), float(scaling) * K.LOG2E)
    meta = dict(HKV=Hkv, G=G, D=D, BLOCK_G=max(16, _pow2(G)), BLOCK_D=_pow2(D), BLOCK_C=block_c, NT=nt,
                BLOCK_PG=max(2, _pow2(pg)), BLOCK_N=block_n or K.DECODE_BLOCK_N, BLOCK_E=block_e or 32,
                HAS_STARTS=starts is not None, IEEE_DOT=K._ieee(q), num_warps=num_warps,
                num_stages=num_stages or FUSED_STAGES, **pdl_options(K.DECODE_PDL, dev), **K._regs(maxnreg, q))
    for phase in ((0,) if one_launch else (phases or (1, 2, 3))):
        _fused_decode_kernel[(splits, B * Hkv)](*args, PHASE=phase, **meta)
    if partials_only:
        return mid_o, mid_lse
    out, lse = K.merge_splits(mid_o, mid_lse, q.dtype, K.MERGE_BLOCK_D)
    kept = kept_rows.reshape(B, Hkv, pg).sum(-1, dtype=torch.int32) if count_kept else None
    return out, lse, kept
