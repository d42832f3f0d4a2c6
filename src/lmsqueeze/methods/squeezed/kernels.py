"""Squeezed Attention kernels: Triton on CUDA tensors, the PyTorch references (reference.py) elsewhere.

Each public function has a `*_triton` twin that runs the kernel on any tensor Triton accepts (CUDA, or CPU
under TRITON_INTERPRET=1 in the tests). The decode path (`centroid_scores` -> [`fine_scores`] ->
`squeezed_decode`) never synchronises with the host and allocates only per-call scratch, so it can be
captured in a CUDA graph; its launch grids depend on shapes only.
"""

from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.pdl import pdl_options
from lmsqueeze.kernels.tickets import ticket_buffer
from lmsqueeze.methods.squeezed.reference import (
    centroid_scores_reference,
    fine_scores_reference,
    indexed_attention_reference,
    prefill_scores_reference,
    squeezed_decode_reference,
    token_select_attention_reference,
)

BLOCK_C = 64          # clusters per scoring program
BLOCK_N = 64          # keys per tile (prefill)
# decode: clusters per sparse program and keys per tile. (32, 32, 4 warps) was the fastest of five configs at
# 32K and 128K on the H100 (benchmarks/results/squeezed_decode_h100.json, extra.decode_*.decode_sweep);
# 64-key tiles with 4 warps spill registers at D=128 (ptxas, sm_90).
DECODE_BLOCK_C = 32
DECODE_BLOCK_N = 32
LOG2E = 1.4426950408889634
# The decode runs one pass, each program a fixed range of clusters (_triton_kernels.py). A balanced variant (a
# planning kernel counting the kept rows per block of clusters, then equal shares of each head's kept tiles per
# program) evened out the programs but each tile waited on its block's keep decision (a dependent L2 round trip),
# and it was slower in every config tried: whole step 23.3-43.9 vs 19.1 us at 32K, 59.6-72.9 vs 42.7 us at 128K
# (H100, same run, benchmarks/results/squeezed_decode_trace_h100_v5.json; earlier forms in _v2-_v4); so was the
# older select-and-pack ("compact") path (attention 112.8 vs 40.5 us at 128K, squeezed_decode_h100.json). Both were
# removed.
DECODE_STAGES = 2     # software-pipelining stages of the fused decode kernel
# split-K merge: None = the shared kernel (a program per head); int = dims per program. 16: merge alone 3.3 / 3.8 us
# at 32K / 128K vs 4.8 / 5.3 us for the shared kernel (H100, benchmarks/results/squeezed_decode_h100.json,
# extra.decode_*.merge_sweep)
MERGE_BLOCK_D = 16
# prefill centroid scoring (block_m queries, block_c centroids, warps, stages): (128, 64, 4, 3) 0.372 ms vs 0.568 ms
# for the earlier (64, 64, 4, 3), 1024 queries x 32 heads x 6550 centroids, D=128 (H100, same run:
# squeezed_decode_h100_v2.json, extra.prefill_131072_1024.scores_sweep)
PREFILL_SCORES_CONFIG = (128, 64, 4, 3)
# prefill centroid scoring in base 2 with the scale inside one FMA per score (prefill_scores_triton's `exp2`):
# 0.3204 vs 0.3727 ms at PREFILL_SCORES_CONFIG (H100, same run, squeezed_prefill_h100_v7.json, scores_sweep)
PREFILL_SCORES_EXP2 = True
# (Packed f16 exponentials (ex2.approx.f16x2) were tried and not kept: on sm_90 they compile to two MUFU.EX2.F16 per
# pair (offline SASS, Triton 3.9), so the MUFU issues do not halve; never timed.)
# prefill gather attention: whole tiles of listed rows without masks (indexed_attention_triton's `steady`), with
# (query rows, warps, stages, keys per tile) = PREFILL_STEADY_TILES above 256 query rows. 1K tokens x 4 heads over
# 13.1K listed rows, D=128 (H100, same run, squeezed_prefill_h100_v7.json, attention_sweep): 0.5965 ms at
# (128, 8, 2, 128) vs 0.6532 ms for the earlier default (64, 4, 3, 64) with every tile masked; (64, 4, 3, 64)
# unmasked took 0.7230 ms, so the tiles change with it
PREFILL_STEADY = True
# (Triton's warp specialization, tl.range(..., warp_specialize=True) on the steady loop, left the sm_90 code
# unchanged (offline compile, Triton 3.9): not applied on Hopper to this loop, so not used.)
PREFILL_STEADY_TILES = (128, 8, 2, 128)
# Packing the G query heads of a KV head into one scoring tile's rows (centroid tiles read once per group) was
# slower: 0.415 vs 0.373 ms at the best configs (H100, same run: squeezed_prefill_h100_v6.json, scores_sweep, commit
# 38463c9); the scoring is not bound by its centroid reads, and the option was removed. So was splitting the
# centroids over 2 / 4 / 8 ranges in two launches (each range's log Z statistics, then the sums): 0.353 / 0.362 /
# 0.373 vs 0.328 ms for one launch (same run: squeezed_prefill_h100_v10.json, scores_sweep, commit 369e645).
# fused merge: the last split program of each (sequence, KV head) merges the partials itself (atomic ticket):
# one launch fewer, but measured slower on the H100 in every config (its one program reads all partials: at the
# default tiles 26.4 vs 16.7 us at 32K, 56.6 vs 37.6 us at 128K; squeezed_decode_h100_v2.json, decode_sweep),
# so off. Wider cluster ranges per program (64-256) and several blocks per program were slower too (v2, v3). A
# sliced form (the last M programs of each KV head to finish, M up to 16, merge D / M dims each, waiting for the
# rest of their group; in the block and the listed kernels) was correct but slower at every M: best 23.51 vs 18.91 us
# at 32K (block), 46.09 vs 40.11 us at 128K (listed), same run (squeezed_probe_merge_h100_v1.json, commit 990ee99,
# reverted): the merge launch with PDL costs less than the merging programs' L2 round trips at the kernel's tail.
DECODE_FUSED_MERGE = False
# Programmatic dependent launch for the decode path's kernels (centroid scores, split attention, merge: Hopper+,
# `lmsqueeze.kernels.pdl`): each kernel's programs are scheduled while the previous one finishes. H100, same run,
# graphed: 20.1 vs 21.3 us at 32K, 45.0 vs 46.0 us at 128K, outputs bit-identical (squeezed_decode_h100_v5.json).
DECODE_PDL = True
# decode kernel variants (`_squeezed_decode_kernel`): EARLY runs everything that does not read the scores (q,
# offsets, the local-slot attention) before the PDL wait; LOCAL_FIRST gives the local-slot programs the first
# split indices; HOIST_V requests each V tile with its K tile; MAXNREG caps registers per thread (None: the
# compiler's choice, 93 at the default tiles). Whole step, CUDA graph, same run (H100,
# benchmarks/results/squeezed_decode_trace_h100_v4.json): 32K 19.30 us with EARLY + LOCAL_FIRST + 96 registers vs
# 19.69 us for none of them, 128K 42.34 vs 44.04 us; EARLY + LOCAL_FIRST alone: 20.51 / 43.63 us, 96 registers
# alone 19.53 / 42.82 us; HOIST_V with 96 registers 19.45 / 43.06 us; caps of 64 (spills), 80, 112, 128 no better.
# Per-program traces (same file): the step is bound by the few programs whose block keeps many rows (p50 7 us,
# max 27 us after the scores are ready at 128K), not by occupancy.
DECODE_EARLY = True
DECODE_LOCAL_FIRST = True
DECODE_HOIST_V = False
DECODE_MAXNREG = 96
# (K / V tiles loaded evict-first in L2, each being read once per step, changed nothing: 128K whole step 40.23 vs
# 40.35 us listed, 42.82 vs 42.65 us block; 32K 19.34 vs 19.39 us; same run, squeezed_sweep_h100_v5.json, commit
# b7d9d16; removed.)
_LAST_KERNEL: dict = {}  # the last compiled decode attention kernel (profiling: registers, spills)
_TICKETS: dict = {}
# A decode tile loop that requested the next tile's K and V before this tile's math (two tiles in flight; the
# kernels get no cp.async pipelining from Triton) was correct but slower on the H100 (32K: 19.1 vs 17.1 us, 128K:
# 42.3 vs 37.5 us at the default tiles; squeezed_decode_h100_v4.json, probe_*.attention_sweep) and was removed.


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """One ticket per (sequence, KV head) for the fused-merge decode (`lmsqueeze.kernels.tickets`)."""
    return ticket_buffer(_TICKETS, device, n)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_heads(q: torch.Tensor, hkv: int, d: int, what: str) -> int:
    Hq, D = q.shape[1], q.shape[-1]
    if D != d or Hq % hkv:
        raise LmsqueezeError(f"{what}: q {tuple(q.shape)} does not match {hkv} KV heads of dim {d}; query heads "
                             "must be a multiple of KV heads and head dims must agree")
    if D < 16 or D & (D - 1):
        raise LmsqueezeError(f"{what}: the Triton kernel needs a power-of-two head dim >= 16, got {D}")
    return Hq // hkv


def _ieee(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32


# --- centroid scoring ---------------------------------------------------------------------------------------
# int8 centroids (one float32 scale per centroid) in the decode scoring kernel were timed and not adopted: scoring
# alone 6.4-6.9 vs 8.0-9.1 us at 128K, whole step 38.60 vs 39.73 us (listed) and 18.92 vs 19.33 us at 32K (block),
# H100, same run (benchmarks/results/squeezed_sweep_h100_v1.json, commit 57d107c); the scores move by up to 0.046
# (log units) and the kept clusters change, so the quality runs would have to be redone for a 3% step gain.

def centroid_scores_triton(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor, scaling: float,
                           chunk: int = BLOCK_C, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form of `centroid_scores_reference`: q [B, Hq, D], centroids [Hkv, C, D], lsizes [Hkv, C]."""
    from lmsqueeze.methods.squeezed._triton_kernels import _centroid_scores_kernel

    B, Hq, D = q.shape
    Hkv, C, _ = centroids.shape
    G = _check_heads(q, Hkv, centroids.shape[-1], "centroid_scores")
    nch = -(-C // chunk)
    scores = torch.empty(B, Hq, C, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, nch, device=q.device, dtype=torch.float32)
    _centroid_scores_kernel[(B * Hkv, nch)](
        q, centroids, lsizes, scores, lse,
        q.stride(0), q.stride(1), centroids.stride(0), centroids.stride(1), lsizes.stride(0),
        scores.stride(0), scores.stride(1), lse.stride(0), lse.stride(1),
        C, float(scaling),
        HKV=Hkv, G=G, D=D, BLOCK_G=max(16, _pow2(G)), BLOCK_D=_pow2(D), BLOCK_C=chunk, IEEE_DOT=_ieee(q),
        num_warps=num_warps, **pdl_options(DECODE_PDL, q.device),
    )
    return scores, lse


def centroid_scores(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor, scaling: float,
                    chunk: int = BLOCK_C) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, Hq, C] = q·c * scaling (float32) and chunk_lse [B, Hq, ceil(C / chunk)] =
    logsumexp(score + log size) per chunk of clusters. q: [B, Hq, D] rotated; centroids: [Hkv, C, D];
    lsizes: [Hkv, C] float32 log cluster sizes (-inf for empty clusters)."""
    if q.is_cuda:
        return centroid_scores_triton(q, centroids, lsizes, scaling, chunk)
    return centroid_scores_reference(q, centroids, lsizes, scaling, chunk)


def fine_scores_triton(q, fine, fine_lsizes, parent, coarse_scores, coarse_chunk_lse, coarse_log_tau, scaling,
                       chunk: int = BLOCK_C, count: bool = True):
    """Kernel form of `fine_scores_reference` (same arguments and returns; scored is None unless `count`:
    the sum is one more launch in the decode step)."""
    from lmsqueeze.methods.squeezed._triton_kernels import _fine_scores_kernel

    B, Hq, D = q.shape
    Hkv, C2, _ = fine.shape
    G = _check_heads(q, Hkv, fine.shape[-1], "fine_scores")
    nch1 = coarse_chunk_lse.shape[-1]
    nch2 = -(-C2 // chunk)
    s2 = torch.empty(B, Hq, C2, device=q.device, dtype=torch.float32)
    lse2 = torch.empty(B, Hq, nch2, device=q.device, dtype=torch.float32)
    scored = torch.empty(B, Hkv, nch2, device=q.device, dtype=torch.int32)
    _fine_scores_kernel[(B * Hkv, nch2)](
        q, fine, fine_lsizes, parent, coarse_scores, coarse_chunk_lse, coarse_log_tau, s2, lse2, scored,
        q.stride(0), q.stride(1), fine.stride(0), fine.stride(1), fine_lsizes.stride(0), parent.stride(0),
        coarse_scores.stride(0), coarse_scores.stride(1), coarse_chunk_lse.stride(0), coarse_chunk_lse.stride(1),
        s2.stride(0), s2.stride(1), lse2.stride(0), lse2.stride(1),
        C2, nch1, nch2, float(scaling),
        HKV=Hkv, G=G, D=D, BLOCK_G=max(16, _pow2(G)), BLOCK_D=_pow2(D), BLOCK_C=chunk,
        BLOCK_CH1=max(2, _pow2(nch1)), IEEE_DOT=_ieee(q), num_warps=4,
    )
    return s2, lse2, (scored.sum(-1, dtype=torch.int32) if count else None)


def fine_scores(q, fine, fine_lsizes, parent, coarse_scores, coarse_chunk_lse, coarse_log_tau, scaling,
                chunk: int = BLOCK_C, count: bool = True):
    """Second level of the hierarchical lookup: scores [B, Hq, C2] of the fine centroids under surviving coarse
    clusters (-inf elsewhere), their chunk logsumexps, and scored [B, Hkv] = fine centroids read (None on CUDA
    unless `count`)."""
    if q.is_cuda:
        return fine_scores_triton(q, fine, fine_lsizes, parent, coarse_scores, coarse_chunk_lse, coarse_log_tau,
                                  scaling, chunk, count)
    return fine_scores_reference(q, fine, fine_lsizes, parent, coarse_scores, coarse_chunk_lse, coarse_log_tau,
                                 scaling, chunk)


# --- sparse decode -------------------------------------------------------------------------------------------

def _regs(maxnreg: int | None, q: torch.Tensor) -> dict:
    """Launch keyword capping registers per thread (CUDA only; the interpreter takes none)."""
    return {"maxnreg": int(maxnreg)} if maxnreg and q.is_cuda else {}


def _check_decode_inputs(q, keys, values, offsets, local_k, local_v, C: int, B: int, Hkv: int, D: int) -> None:
    if offsets.shape != (Hkv, C + 2) or local_k.shape[:2] != (B, Hkv) or local_k.shape[-1] != D:
        raise LmsqueezeError(f"squeezed_decode: offsets {tuple(offsets.shape)} / local cache "
                             f"{tuple(local_k.shape)} do not match {C} clusters, batch {B}, {Hkv} KV heads")
    for t in (keys, values, local_k, local_v):
        if t.stride(-1) != 1 or t.dtype != q.dtype:
            raise LmsqueezeError("squeezed_decode needs keys/values/local caches in q's dtype with a contiguous "
                                 "last dim")


def default_sub_splits(cluster_blocks: int) -> int:
    """Programs per block of clusters in the fused decode, from the shape only (graph-safe): 2 up to 64 blocks
    (18.7 vs 21.6 us at 32K, 1635 clusters), 1 beyond (38.7 vs 42.5 us at 128K, 6550 clusters): H100,
    benchmarks/results/squeezed_decode_sweep_h100.json, extra.decode_*.decode_sweep."""
    return 2 if cluster_blocks <= 64 else 1


def default_blocks_per_program(cluster_blocks: int) -> int:
    """Blocks of clusters per decode program, from the shape only (graph-safe): 1. Two to eight blocks per
    program were all slower on the H100 (32K: 24.9-68.2 us vs 17.1 us, 128K: 42.3-81.9 us vs 37.3 us;
    squeezed_decode_h100_v3.json, extra.probe_*.attention_sweep): each block costs ~8 us of serial latency."""
    return 1


def default_local_splits(l_max: int) -> int:
    """Programs per (batch, KV head) over the local slots: from the buffer size only (graph-safe)."""
    return max(1, min(8, -(-l_max // 512)))


def squeezed_decode_triton(q, keys, values, offsets, scores, chunk_lse, log_tau, local_k, local_v, lengths,
                           scaling, starts=None, *, block_c: int = DECODE_BLOCK_C, block_n: int = DECODE_BLOCK_N,
                           local_splits: int | None = None, num_warps: int = 4, num_stages: int = DECODE_STAGES,
                           count_kept: bool = True, sub_splits: int | None = None,
                           merge_block_d: int | None = MERGE_BLOCK_D, partials_only: bool = False,
                           fused_merge: bool | None = None, blocks_per_program: int | None = None,
                           early: bool | None = None, local_first: bool | None = None, hoist_v: bool | None = None,
                           trace: torch.Tensor | None = None, maxnreg: int | None = DECODE_MAXNREG):
    """Kernel form of `squeezed_decode_reference` (no window / local_valid): returns (out, lse, kept); kept is
    None unless `count_kept` (its sum is one more launch in the decode step). sub_splits: programs per block
    of clusters (each takes every sub_splits-th tile of the block's kept rows); None: `default_sub_splits`.
    merge_block_d: None merges the split partials with the shared kernel (one program per query head), an int
    with `merge_splits` (D / merge_block_d programs per head). partials_only: return (mid_o, mid_lse) unmerged
    (to time the parts). fused_merge (None: DECODE_FUSED_MERGE): the split kernel merges its own partials (the
    last program of each (sequence, KV head), by an atomic ticket): one launch. blocks_per_program: blocks of
    clusters one program reads in turn (strided: j, j + NSP/bpp, ..), one online softmax and one partial for all:
    q and log Z loaded once, fewer partials to merge. early / local_first / hoist_v (None: DECODE_EARLY /
    DECODE_LOCAL_FIRST / DECODE_HOIST_V): see the kernel. trace: int64 [splits * B * Hkv, 4] or None, filled
    with each program's (start, after the dependency wait, end) %globaltimer ns and kept rows (profiling).
    maxnreg: register cap per thread (CUDA; None: the compiler's choice)."""
    from lmsqueeze.methods.squeezed._triton_kernels import _squeezed_decode_kernel

    B, Hq, D = q.shape
    Hkv = keys.shape[0]
    G = _check_heads(q, Hkv, keys.shape[-1], "squeezed_decode")
    C = scores.shape[-1]
    nch = chunk_lse.shape[-1]
    _check_decode_inputs(q, keys, values, offsets, local_k, local_v, C, B, Hkv, D)
    l_max = local_k.shape[2]
    nsp = -(-(C + 1) // block_c)
    nloc = local_splits or default_local_splits(l_max)
    sub_splits = sub_splits or default_sub_splits(nsp)
    bpp = max(1, min(int(blocks_per_program or default_blocks_per_program(nsp)), nsp))
    nspp = -(-nsp // bpp)
    splits = nspp * sub_splits + nloc
    mid_o = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    mid_lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    kept = torch.empty(B, Hkv, nsp, device=q.device, dtype=torch.int32)
    fuse = (DECODE_FUSED_MERGE if fused_merge is None else fused_merge) and not partials_only
    if fuse:
        out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)
        ticket = _tickets(q.device, B * Hkv)
    else:
        out, lse, ticket = mid_o, mid_lse, kept          # unused placeholders
    kernel = _squeezed_decode_kernel[(B * Hkv, splits)](
        q, keys, values, offsets, scores, chunk_lse, log_tau, local_k, local_v, lengths,
        starts if starts is not None else lengths, mid_o, mid_lse, kept,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        offsets.stride(0), scores.stride(0), scores.stride(1), chunk_lse.stride(0), chunk_lse.stride(1),
        local_k.stride(0), local_k.stride(1), local_k.stride(2), local_v.stride(0), local_v.stride(1),
        local_v.stride(2),
        C, nch, nsp, nloc, l_max, float(scaling) * LOG2E,
        Ticket=ticket, Out=out, OutLse=lse, stride_outb=out.stride(0) if fuse else 0,
        stride_outh=out.stride(1) if fuse else 0, HKV=Hkv, G=G, D=D, BLOCK_G=max(16, _pow2(G)), BLOCK_D=_pow2(D), BLOCK_N=block_n, BLOCK_C=block_c,
        BLOCK_CH=max(2, _pow2(nch)), HAS_STARTS=starts is not None, IEEE_DOT=_ieee(q), NSUB=sub_splits,
        FUSE_MERGE=fuse, BLOCK_GM=max(2, _pow2(G)), BLOCK_S=8, NSPP=nspp, BPP=bpp,
        EARLY=DECODE_EARLY if early is None else early,
        LOCAL_FIRST=DECODE_LOCAL_FIRST if local_first is None else local_first,
        HOIST_V=DECODE_HOIST_V if hoist_v is None else hoist_v, Trace=trace, TRACE=trace is not None,
        num_warps=num_warps, num_stages=num_stages, **pdl_options(DECODE_PDL, q.device), **_regs(maxnreg, q),
    )
    _LAST_KERNEL["decode"] = kernel
    if partials_only:
        return mid_o, mid_lse
    if not fuse:
        out, lse = merge_splits(mid_o, mid_lse, q.dtype, merge_block_d)
    return out, lse, (kept.sum(-1, dtype=torch.int32) if count_kept else None)


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, dtype: torch.dtype, block_d: int | None = MERGE_BLOCK_D):
    """Merge split-K partials by log-sum-exp. mid_o: [B, Hq, S, D] float32 (each split normalised), mid_lse:
    [B, Hq, S] -> (out [B, Hq, D] in `dtype`, lse [B, Hq] float32). block_d None: the shared kernel (one
    program per head); an int: D / block_d programs per head (more parallel, same bytes)."""
    from lmsqueeze.kernels._triton_decode import _merge_splits_kernel

    B, Hq, S, D = mid_o.shape
    out = torch.empty(B, Hq, D, device=mid_o.device, dtype=dtype)
    lse = torch.empty(B, Hq, device=mid_o.device, dtype=torch.float32)
    if block_d is None or D % block_d or block_d > D:
        block_d = _pow2(D)
    bs = max(2, _pow2(S))
    _merge_splits_kernel[(B * Hq, -(-D // block_d))](
        mid_o, mid_lse, out, lse, out.stride(0), out.stride(1), S,
        HQ=Hq, D=D, BLOCK_S=bs, BLOCK_D=block_d, WRITE_LSE=True, num_warps=4 if bs * block_d <= 8192 else 8,
        **pdl_options(DECODE_PDL, mid_o.device),
    )
    return out, lse


def squeezed_decode(q, keys, values, offsets, scores, chunk_lse, log_tau, local_k, local_v, lengths, scaling,
                    starts=None, local_valid=None, window=None, q_pos=None, key_pos=None, count_kept: bool = True,
                    row_cluster=None):
    """One decode query per sequence over the kept clusters of the fixed context + its local slots.

    q: [B, Hq, D] rotated; keys, values: [Hkv, N, D] sorted by cluster; offsets: [Hkv, C + 2] int32;
    scores, chunk_lse: from `centroid_scores` / `fine_scores`; log_tau: [Hkv]; local_k, local_v:
    [B, Hkv, L, D] (new token already written); lengths: [B] int32 filled local slots; starts: [B] int32 first
    valid slot. Returns (out [B, Hq, D], lse [B, Hq] float32, kept [B, Hkv] int32 fixed rows read).
    Sliding windows and arbitrary padding masks run the reference. count_kept=False skips the count on CUDA. On
    CUDA, indexes of listed.LIST_MIN_CLUSTERS clusters or more run the listed decode (listed.py), others the block
    decode (`squeezed_decode_triton`).
    """
    if q.is_cuda and window is None and local_valid is None:
        from lmsqueeze.methods.squeezed import listed

        fn = listed.squeezed_decode_listed_triton if listed.use_listed(scores.shape[-1]) else squeezed_decode_triton
        return fn(q, keys, values, offsets, scores, chunk_lse, log_tau, local_k, local_v, lengths, scaling, starts,
                  count_kept=count_kept)
    return squeezed_decode_reference(q, keys, values, offsets, scores, chunk_lse, log_tau, local_k, local_v,
                                     lengths, scaling, starts, local_valid, window, q_pos, key_pos, row_cluster)


# --- prefill -------------------------------------------------------------------------------------------------

def prefill_scores_triton(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor, scaling: float,
                          block_m: int | None = None, block_c: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None, exp2: bool | str | None = None) -> torch.Tensor:
    """Kernel form of `prefill_scores_reference`: psum [B, Hq, C]. block_m queries x block_c centroids per tile
    (both passes stream the centroids: num_stages pipelines those loads); None: PREFILL_SCORES_CONFIG (read at
    call time). exp2 (None: PREFILL_SCORES_EXP2): base-2 exponentials with the scale inside one FMA per score and
    exclusions as -inf biases (no select per score); "rows": that with pass 2 on the untransposed tile (the kernel
    before PASS2_T, for comparison)."""
    cfg = PREFILL_SCORES_CONFIG
    block_m, block_c = block_m or cfg[0], block_c or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    from lmsqueeze.methods.squeezed._triton_kernels import _prefill_scores_kernel

    B, Hq, T, D = q.shape
    Hkv, C, _ = centroids.shape
    G = _check_heads(q, Hkv, centroids.shape[-1], "prefill_scores")
    if lsizes.dim() != 3 or lsizes.shape[1:] != (Hkv, C) or lsizes.shape[0] not in (1, B):
        raise LmsqueezeError(f"prefill_scores: lsizes {tuple(lsizes.shape)} must be [1 or B, Hkv, C]")
    e2 = PREFILL_SCORES_EXP2 if exp2 is None else exp2
    nmb = -(-T // block_m)
    part = torch.empty(B, Hq, nmb, C, device=q.device, dtype=torch.float32)
    _prefill_scores_kernel[(nmb, B * Hq)](
        q, centroids, lsizes, part,
        q.stride(0), q.stride(1), q.stride(2), centroids.stride(0), centroids.stride(1),
        lsizes.stride(0) if lsizes.shape[0] > 1 else 0, lsizes.stride(1),
        T, C, nmb, float(scaling),
        HQ=Hq, G=G, D=D, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=_pow2(D), IEEE_DOT=_ieee(q),
        EXP2=bool(e2), PASS2_T=e2 != "rows", num_warps=num_warps, num_stages=num_stages,
    )
    return part.sum(2)


def prefill_scores(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor, scaling: float) -> torch.Tensor:
    """psum [B, Hq, C] = sum over the chunk's queries of exp(score - log Z) (0 for excluded clusters).
    q: [B, Hq, T, D]; centroids: [Hkv, C, D]; lsizes: [1 or B, Hkv, C] (-inf excludes a cluster)."""
    if q.is_cuda:
        return prefill_scores_triton(q, centroids, lsizes, scaling)
    return prefill_scores_reference(q, centroids, lsizes, scaling)


# the 'chunk' selection kernel holds one (sequence, KV head)'s clusters in registers: at most this many (+1 window)
SELECT_MAX_CLUSTERS = 16383


def chunk_rows_triton(psum: torch.Tensor, offsets: torch.Tensor, row_cluster: torch.Tensor, budget: int,
                      width: int | None = None, num_warps: int | None = None,
                      exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form of `reference.chunk_rows_reference` (two launches, no host sync, graph-capturable; T is not needed:
    the ranking by max psum equals the ranking by log(psum / T)); width None: N (every row fits); exact: the
    crossing cluster gives only the keys that fill the budget."""
    from lmsqueeze.methods.squeezed._triton_select import _budget_keep_kernel, _rows_from_keep_kernel

    B, Hq, C = psum.shape
    Hkv, N = row_cluster.shape
    if offsets.shape != (Hkv, C + 2) or Hq % Hkv:
        raise LmsqueezeError(f"chunk_rows: offsets {tuple(offsets.shape)} / row_cluster {tuple(row_cluster.shape)} "
                             f"do not match psum {tuple(psum.shape)}")
    if C > SELECT_MAX_CLUSTERS:
        raise LmsqueezeError(f"chunk_rows_triton handles at most {SELECT_MAX_CLUSTERS} clusters, got {C}; use "
                             "chunk_rows_reference")
    width = N if width is None else width
    if width < N:
        raise LmsqueezeError("chunk_rows_triton needs width >= N (no host sync for the largest count)")
    psum = psum.contiguous()
    ksz = torch.empty(B, Hkv, C + 1, device=psum.device, dtype=torch.int32)
    before = torch.empty(B, Hkv, C + 1, device=psum.device, dtype=torch.int32)
    counts = torch.empty(B, Hkv, device=psum.device, dtype=torch.int32)
    idx = torch.zeros(B, Hkv, width, device=psum.device, dtype=torch.int32)
    bc = _pow2(C + 1)
    _budget_keep_kernel[(B * Hkv,)](
        psum, offsets, ksz, before, counts, psum.stride(0), psum.stride(1), offsets.stride(0),
        ksz.stride(0), ksz.stride(1), C, int(budget),
        HKV=Hkv, G=Hq // Hkv, BLOCK_C=bc, EXACT=exact, num_warps=num_warps or (8 if bc >= 4096 else 4),
    )
    block = 1024
    _rows_from_keep_kernel[(-(-N // block), B * Hkv)](
        ksz, before, offsets, row_cluster, idx, ksz.stride(0), ksz.stride(1), offsets.stride(0),
        row_cluster.stride(0), idx.stride(0), idx.stride(1), N, HKV=Hkv, BLOCK=block, num_warps=4,
    )
    return idx, counts


def gather_rows_triton(keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, kg: torch.Tensor,
                       vg: torch.Tensor, block_r: int = 64) -> None:
    """kg[b, h, r] = keys[h, idx[b, h, r]], vg likewise, for r < W. keys, values: [Hkv, N, D]; idx: [B, Hkv, W]
    int32 (valid rows); kg, vg: [B, Hkv, W, D] written in place (last dim contiguous). Reference: `torch.gather`."""
    from lmsqueeze.methods.squeezed._triton_kernels import _gather_rows_kernel

    B, Hkv, W = idx.shape
    D = keys.shape[-1]
    if kg.shape != (B, Hkv, W, D) or vg.shape != kg.shape or keys.shape[0] != Hkv or idx.stride(-1) != 1:
        raise LmsqueezeError(f"gather_rows: idx {tuple(idx.shape)}, keys {tuple(keys.shape)} and outputs "
                             f"{tuple(kg.shape)} do not match")
    _gather_rows_kernel[(-(-W // block_r), B * Hkv)](
        keys, values, idx, kg, vg, keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        idx.stride(0), idx.stride(1), kg.stride(0), kg.stride(1), kg.stride(2), vg.stride(0), vg.stride(1),
        vg.stride(2), W, HKV=Hkv, D=D, BLOCK_R=block_r, BLOCK_D=_pow2(D), num_warps=4,
    )


def cudnn_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """Dense attention with its log-sum-exp through torch's cuDNN kernel (private op; CUDA, fp16/bf16).
    q: [B, H, M, D], k, v: [B, H, N, D] -> (out [B, H, M, D], lse [B, H, M] float32, natural log)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                    scale=scaling)[:2]
    return out, lse.reshape(q.shape[:3]).float()


def gathered_attention(q, keys, values, idx, width: int, local_k, local_v, lengths, scaling, starts=None,
                       fixed_attn=None):
    """Prefill attention over the same number (`width`) of listed fixed rows for every (sequence, KV head) and
    the causal local slots: the listed rows copied into a compact buffer (`gather_rows_triton`), the G query
    heads of a KV head packed as the rows of one dense attention with log-sum-exp over them (`fixed_attn`, None:
    `cudnn_attention_lse`), the local slots by `indexed_attention_triton` with no listed rows, the two merged by
    log-sum-exp (one Triton kernel). q: [B, Hq, T, D] rotated; idx: [B, Hkv, >= width] int32 (the first `width`
    used); others as `indexed_attention`. Returns [B, Hq, T, D]."""
    from lmsqueeze.kernels.merge import merge_attention_outputs_triton

    B, Hq, T, D = q.shape
    Hkv = keys.shape[0]
    G = _check_heads(q, Hkv, keys.shape[-1], "gathered_attention")
    kg = torch.empty(B, Hkv, width, D, device=q.device, dtype=keys.dtype)
    vg = torch.empty_like(kg)
    gather_rows_triton(keys, values, idx[..., :width], kg, vg)
    q = q.contiguous()
    o_f, lse_f = (fixed_attn or cudnn_attention_lse)(q.view(B, Hkv, G * T, D), kg, vg, scaling)
    none = torch.zeros(B, Hkv, device=q.device, dtype=torch.int32)
    o_l, lse_l = indexed_attention_triton(q, keys, values, idx, none, local_k, local_v, lengths, scaling, starts,
                                          return_lse=True)
    return merge_attention_outputs_triton(o_f.reshape(B, Hq, T, D).to(q.dtype), lse_f.reshape(B, Hq, T), o_l,
                                          lse_l)


def indexed_attention_triton(q, keys, values, idx, counts, local_k, local_v, lengths, scaling, starts=None,
                             return_lse: bool = False, *, block_m: int | None = None, block_n: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None,
                             steady: bool | None = None):
    """Kernel form of `indexed_attention_reference` (no window / local_valid). steady (None: PREFILL_STEADY):
    the listed rows' whole tiles run without masks (the scale inside one FMA per score), the rest masked."""
    from lmsqueeze.methods.squeezed._triton_kernels import _indexed_attention_kernel

    B, Hq, T, D = q.shape
    Hkv = keys.shape[0]
    G = _check_heads(q, Hkv, keys.shape[-1], "indexed_attention")
    if idx.shape[:2] != (B, Hkv) or counts.shape != (B, Hkv) or local_k.shape[:2] != (B, Hkv):
        raise LmsqueezeError(f"indexed_attention: idx {tuple(idx.shape)}, counts {tuple(counts.shape)} and local "
                             f"cache {tuple(local_k.shape)} must lead with [B={B}, Hkv={Hkv}]")
    if idx.stride(-1) != 1 or counts.stride(-1) != 1:
        raise LmsqueezeError("indexed_attention needs idx / counts contiguous in the last dim")
    rows = T * G
    steady = PREFILL_STEADY if steady is None else steady
    if steady and rows > 256 and block_m is None and block_n is None:
        block_m, num_warps, num_stages, block_n = PREFILL_STEADY_TILES
    block_n = block_n or 64
    block_m, num_warps, num_stages = _prefill_block_config(rows, block_m, num_warps, num_stages)
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32) if return_lse else out
    _indexed_attention_kernel[(-(-rows // block_m), B * Hkv)](
        q, keys, values, idx, counts, local_k, local_v, lengths, starts if starts is not None else lengths, out, lse,
        counts, counts,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        idx.stride(0), idx.stride(1), 0, counts.stride(0), counts.stride(1), 0,
        local_k.stride(0), local_k.stride(1), local_k.stride(2), local_v.stride(0), local_v.stride(1),
        local_v.stride(2), out.stride(0), out.stride(1), out.stride(2), 0, 0, 0, 0,
        T, local_k.shape[2], float(scaling) * LOG2E,
        HKV=Hkv, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(D),
        HAS_STARTS=starts is not None, WRITE_LSE=return_lse, IEEE_DOT=_ieee(q), TOKEN_MASK=False,
        STEADY=steady, num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out


def _prefill_block_config(rows: int, block_m, num_warps, num_stages) -> tuple[int, int, int]:
    # > 256 query rows with every tile masked (token prefill; chunk prefill uses PREFILL_STEADY_TILES): (64, 4
    # warps, 3 stages) 0.650 ms vs 0.751 ms for (128, 8, 3) at 1024 x 4 rows over 13.1K listed keys, D=128 (H100,
    # same run: squeezed_decode_h100_v2.json, extra.prefill_131072_1024.attention_sweep)
    if block_m is None:
        block_m = 16 if rows <= 16 else 64
    if num_warps is None:
        num_warps = 4 if block_m <= 64 else 8
    if num_stages is None:
        num_stages = 3 if rows > 256 or block_m == 128 else 2
    return block_m, num_warps, num_stages


def block_rows(keep: torch.Tensor, row_cluster: torch.Tensor, G: int, block_m: int):
    """The fixed rows each block of `block_m` packed query rows lists: the union of its tokens' clusters.
    keep: [B, Hkv, T, C + 1] bool; row_cluster: [Hkv, N] -> (idx [B, Hkv, NB, M] int32, counts [B, Hkv, NB]
    int32). A host sync (the width M): prefill only."""
    from lmsqueeze.methods.squeezed.lookup import mask_to_index
    from lmsqueeze.methods.squeezed.token_select import block_union

    B, Hkv = keep.shape[:2]
    union = block_union(keep, G, block_m)                                          # [B, Hkv, NB, C + 1]
    nb = union.shape[2]
    rmask = union.gather(-1, row_cluster.long()[None, :, None, :].expand(B, -1, nb, -1))   # [B, Hkv, NB, N]
    idx, counts = mask_to_index(rmask.reshape(B, Hkv * nb, -1))
    return idx.reshape(B, Hkv, nb, -1), counts.reshape(B, Hkv, nb).contiguous()


def token_select_attention_triton(q, keys, values, keep, row_cluster, local_k, local_v, lengths, scaling, starts=None,
                                  return_lse: bool = False, *, block_m: int | None = None, block_n: int = 64,
                                  num_warps: int | None = None, num_stages: int | None = None):
    """Kernel form of `token_select_attention_reference` (no window / local_valid): each block of query rows
    reads the union of its tokens' rows, masked per token inside the kernel."""
    from lmsqueeze.methods.squeezed._triton_kernels import _indexed_attention_kernel

    B, Hq, T, D = q.shape
    Hkv, N, _ = keys.shape
    G = _check_heads(q, Hkv, keys.shape[-1], "token_select_attention")
    if keep.shape[:3] != (B, Hkv, T) or row_cluster.shape != (Hkv, N) or local_k.shape[:2] != (B, Hkv):
        raise LmsqueezeError(f"token_select_attention: keep {tuple(keep.shape)}, row_cluster "
                             f"{tuple(row_cluster.shape)} and local cache {tuple(local_k.shape)} do not match "
                             f"q {tuple(q.shape)} and keys {tuple(keys.shape)}")
    rows = T * G
    block_m, num_warps, num_stages = _prefill_block_config(rows, block_m, num_warps, num_stages)
    idx, counts = block_rows(keep, row_cluster, G, block_m)
    keep8 = keep.to(torch.int8).contiguous()
    rc = row_cluster.to(torch.int32).contiguous()
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32) if return_lse else out
    _indexed_attention_kernel[(idx.shape[2], B * Hkv)](
        q, keys, values, idx, counts, local_k, local_v, lengths, starts if starts is not None else lengths, out, lse,
        keep8, rc,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2), counts.stride(0), counts.stride(1), counts.stride(2),
        local_k.stride(0), local_k.stride(1), local_k.stride(2), local_v.stride(0), local_v.stride(1),
        local_v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        keep8.stride(0), keep8.stride(1), keep8.stride(2), rc.stride(0),
        T, local_k.shape[2], float(scaling) * LOG2E,
        HKV=Hkv, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(D),
        HAS_STARTS=starts is not None, WRITE_LSE=return_lse, IEEE_DOT=_ieee(q), TOKEN_MASK=True,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out


def token_select_attention(q, keys, values, keep, row_cluster, local_k, local_v, lengths, scaling, starts=None,
                           local_valid=None, window=None, q_pos=None, key_pos=None, return_lse: bool = False):
    """Prefill where every query token reads its own clusters: T queries over the fixed rows of their kept
    clusters + the causal local slots, one softmax.

    q: [B, Hq, T, D] rotated; keys, values: [Hkv, N, D] (sorted by cluster); keep: [B, Hkv, T, C + 1] bool
    (token_select.token_keep); row_cluster: [Hkv, N] int cluster of each row; local_k, local_v:
    [B, Hkv, L, D] with this chunk written; lengths: [B] int32; starts: [B] int32 or None.
    Returns out [B, Hq, T, D] (and lse [B, Hq, T] float32).
    """
    if q.is_cuda and window is None and local_valid is None:
        return token_select_attention_triton(q, keys, values, keep, row_cluster, local_k, local_v, lengths, scaling,
                                             starts, return_lse)
    out, lse = token_select_attention_reference(q, keys, values, keep, row_cluster, local_k, local_v, lengths,
                                                scaling, starts, local_valid, window, q_pos, key_pos)
    return (out, lse) if return_lse else out


def indexed_attention(q, keys, values, idx, counts, local_k, local_v, lengths, scaling, starts=None,
                      local_valid=None, window=None, q_pos=None, key_pos=None, return_lse: bool = False):
    """T queries over listed fixed-context rows + causal local slots, one softmax.

    q: [B, Hq, T, D] rotated; keys, values: [Hkv, N, D]; idx: [B, Hkv, M] int32 rows, counts: [B, Hkv] int32
    (the first counts[b, h] of idx are used); local_k, local_v: [B, Hkv, L, D] with this chunk written;
    lengths: [B] int32 filled local slots (query t at slot lengths - T + t); starts: [B] int32 first valid
    slot. Returns out [B, Hq, T, D] (and lse [B, Hq, T] float32).
    """
    if q.is_cuda and window is None and local_valid is None:
        return indexed_attention_triton(q, keys, values, idx, counts, local_k, local_v, lengths, scaling, starts,
                                        return_lse)
    out, lse = indexed_attention_reference(q, keys, values, idx, counts, local_k, local_v, lengths, scaling, starts,
                                           local_valid, window, q_pos, key_pos)
    return (out, lse) if return_lse else out
