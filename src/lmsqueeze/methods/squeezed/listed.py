"""The listed Squeezed decode: the kept clusters are listed on the GPU and dealt out evenly over a fixed number
of programs per (sequence, KV head), then attended (kernels in _triton_listed.py; reference:
reference.squeezed_decode_reference). Two launches after the centroid scores plus the split merge, no host
synchronisation, grids from shapes only (CUDA-graph capturable)."""

from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.pdl import pdl_options
from lmsqueeze.methods.squeezed import kernels as K
from lmsqueeze.methods.squeezed.kernels import _pow2

# Where the listed decode is the default (kernels.squeezed_decode): from LIST_MIN_CLUSTERS clusters per KV head. Whole
# step in a CUDA graph, same run (H100, Llama-3-8B attention shape, 90%, benchmarks/results/
# squeezed_probe_listed_h100_v4.json): 128K (6550 clusters) 39.89 us vs 43.10 us for the block decode; 32K (1635)
# 21.29-24.82 us vs 19.11 us. Parts at 128K: list selection 3.8 us, listed attention 25.95 us vs 31.81 us for the
# block decode's attention (clusters dealt out evenly within each KV head). The crossover between 1635 and 6550
# clusters was not measured; 4096 sits between them.
LIST_MIN_CLUSTERS = 4096
# Where the listed decode's time goes (128K, H100, Nsight Compute: benchmarks/results/squeezed_ncu_h100_v1.txt, ncu
# driver benchmarks/scripts/ncu_squeezed_decode.py): the attention kernel alone 27.7 us at 1.69 TB/s, 1040 programs
# in 1.58 waves (5 per SM: 96 registers and 37.9 KB of shared memory both limit), SMs active 70% of the elapsed
# cycles, 11.1 cycles per issued instruction of which 4.1 wait on memory; its tile loop is 683 SASS instructions per
# warp (16 HMMA, 15 BAR; offline compile). Fewer list entries per request (8: 510 instructions) was not faster
# (27.32 vs 26.17 us), nor were 2 or 8 warps, other tiles, stages, program counts or register caps that fit 6-8
# programs per SM (squeezed_sweep_h100_v1.json, _v2.json, _v3.json). Stall sampling (squeezed_ncu_listed_stalls_h100_v1
# .txt): of 11.4 cycles per issued instruction, 4.1 wait on global memory, 2.1 on shared memory, 1.4 on fixed
# latencies, 1.1 on barriers; 0.63 of 4.36 resident warps per scheduler are eligible. A one-launch form (scores,
# keep decision, listing and attention in one kernel, the programs of a KV head meeting at two atomic barriers) was
# correct (kept rows equal, graph = eager) but slower: 50.2-56.1 vs 40.28 us at
# 128K, 22.1-38.5 vs 18.96 us (block) at 32K; its three phases as three launches 47.2 / 22.5 us
# (squeezed_probe_fused_h100_v2.json, commit 5576d24; _v1 at 0207afa has the one-launch rows only): removed.
# Per-program traces (trace_listed_decode.py; squeezed_listed_trace_h100_v1-v5.json, H100): at 128K the programs'
# rows vary from p50 70 to max 270-314, as the KV heads keep very different numbers of rows, and the slowest set the
# span. Evened out, the step did not move: clusters listed in pieces of at most 16 / 32 rows (39.97 vs 39.94 us, _v2,
# commit 4b54c59), programs shared out over the heads by kept rows (42.34 vs 40.92 us, _v3, 5ee5bdb), a persistent
# form with 132-528 programs each taking a contiguous range of all heads' entries (42.66-49.57 vs 40.14 us, _v4 /
# _v5, 1442a8c), K and V of a row side by side in memory (40.06 vs 40.01 us, _v5, ce76a8e). Whatever the split,
# the gathered tiles come in at ~1.7 TB/s (26 us for 43 MB at 128K), so the work is bandwidth-bound at the rate of
# this access pattern (clusters of ~20 rows: ~5 KB runs of K and of V), not bound by its distribution. All removed.
# programs per (sequence, KV head) over the listed clusters: 128 (64: 48.03, 256: 43.60 us at 128K, same run), and
# software-pipelining stages 3 (2: 42.05 us)
LIST_PROGRAMS = 128
LIST_STAGES = 3
# clusters per selection program and its warps (256 / 512 / 1024: 3.89 / 3.83 / 3.87 us at 128K, same run)
LIST_SELECT_BLOCK = 512
LIST_SELECT_WARPS = 4
# listed clusters one decode program requests at once (more: several requests)
LIST_BLOCK_E = 32


def use_listed(clusters: int) -> bool:
    """Whether the decode of an index with this many clusters per KV head runs the listed kernels (from the shape
    only: graph-safe)."""
    return clusters >= LIST_MIN_CLUSTERS


def select_list_triton(scores, chunk_lse, log_tau, offsets, block_s: int | None = None,
                       num_warps: int | None = None):
    """The kept clusters of each (sequence, KV head), listed per chunk of `block_s` clusters.

    scores: [B, Hq, C] float32, chunk_lse: [B, Hq, NCH] (from `centroid_scores`), log_tau: [Hkv], offsets:
    [Hkv, C + 2] int32. Returns (start, size [B*Hkv, NS, block_s] int32, count [B*Hkv, NS] int32, kept_rows
    [B*Hkv, NS] int32), NS = ceil((C + 1) / block_s): the kept non-empty clusters of chunk j (cluster C, the
    observation window, always kept), in order, as (first row, size) in slots [0, count[:, j]); later slots are
    not written."""
    from lmsqueeze.methods.squeezed._triton_listed import _select_list_kernel

    B, Hq, C = scores.shape
    Hkv = offsets.shape[0]
    block_s = _pow2(block_s or min(LIST_SELECT_BLOCK, _pow2(C + 1)))
    ns = -(-(C + 1) // block_s)
    dev = scores.device
    start = torch.empty(B * Hkv, ns, block_s, device=dev, dtype=torch.int32)
    size = torch.empty_like(start)
    count = torch.empty(B * Hkv, ns, device=dev, dtype=torch.int32)
    kept_rows = torch.empty_like(count)
    nch = chunk_lse.shape[-1]
    _select_list_kernel[(B * Hkv, ns)](
        scores, chunk_lse, log_tau, offsets, start, size, count, kept_rows,
        scores.stride(0), scores.stride(1), chunk_lse.stride(0), chunk_lse.stride(1), offsets.stride(0),
        C, nch,
        HKV=Hkv, G=Hq // Hkv, BLOCK_G=_pow2(Hq // Hkv), BLOCK_S=block_s, BLOCK_CH=max(2, _pow2(nch)),
        num_warps=num_warps or LIST_SELECT_WARPS, **pdl_options(K.DECODE_PDL, dev),
    )
    return start, size, count, kept_rows


def squeezed_decode_listed_triton(q, keys, values, offsets, scores, chunk_lse, log_tau, local_k, local_v, lengths,
                                  scaling, starts=None, *, programs: int | None = None, block_n: int | None = None,
                                  num_warps: int = 4, num_stages: int | None = None, local_splits: int | None = None,
                                  select_block: int | None = None, select_warps: int | None = None, block_e: int | None = None,
                                  count_kept: bool = True, partials_only: bool = False, hoist_v: bool | None = None,
                                  maxnreg: int | None = None, listed: tuple | None = None,
                                  trace: torch.Tensor | None = None):
    """Kernel form of `squeezed_decode_reference` (no window / local_valid), same contract as
    `kernels.squeezed_decode_triton`: returns (out [B, Hq, D], lse [B, Hq] float32, kept [B, Hkv] int32 or None
    unless `count_kept`). programs: programs per (sequence, KV head) over the listed clusters (None:
    LIST_PROGRAMS); partials_only: (mid_o, mid_lse) unmerged; listed: `select_list_triton`'s output
    for these scores (skips the selection launch; profiling). trace: int64 [(NLOC + P) * B * Hkv, 6] or None,
    filled per program with %globaltimer ns (start, after the dependency wait, counts read, first entries read,
    end) and the rows it attended (profiling)."""
    from lmsqueeze.methods.squeezed._triton_listed import _listed_decode_kernel

    B, Hq, D = q.shape
    Hkv = keys.shape[0]
    G = K._check_heads(q, Hkv, keys.shape[-1], "squeezed_decode")
    C = scores.shape[-1]
    K._check_decode_inputs(q, keys, values, offsets, local_k, local_v, C, B, Hkv, D)
    P = int(programs or LIST_PROGRAMS)
    if P < 1:
        raise LmsqueezeError(f"squeezed_decode_listed: programs must be >= 1, got {P}")
    start, size, count, kept_rows = listed or select_list_triton(scores, chunk_lse, log_tau, offsets, select_block,
                                                                 select_warps)
    ns, block_s = start.shape[1], start.shape[2]
    l_max = local_k.shape[2]
    nloc = local_splits or K.default_local_splits(l_max)
    splits = nloc + P
    mid_o = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    mid_lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    _listed_decode_kernel[(B * Hkv, splits)](
        q, keys, values, start, size, count, local_k, local_v, lengths,
        starts if starts is not None else lengths, mid_o, mid_lse,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        local_k.stride(0), local_k.stride(1), local_k.stride(2), local_v.stride(0), local_v.stride(1),
        local_v.stride(2),
        ns, P, nloc, l_max, float(scaling) * K.LOG2E,
        HKV=Hkv, G=G, D=D, BLOCK_G=max(16, _pow2(G)), BLOCK_D=_pow2(D), BLOCK_N=block_n or K.DECODE_BLOCK_N,
        BLOCK_E=block_e or LIST_BLOCK_E, BLOCK_S=block_s,
        BLOCK_NS=max(2, _pow2(ns)), HAS_STARTS=starts is not None, IEEE_DOT=K._ieee(q),
        HOIST_V=K.DECODE_HOIST_V if hoist_v is None else hoist_v,
        num_warps=num_warps, num_stages=num_stages or LIST_STAGES, **pdl_options(K.DECODE_PDL, q.device),
        **K._regs(K.DECODE_MAXNREG if maxnreg is None else maxnreg, q),
        **({"Trace": trace, "TRACE": True} if trace is not None else {}),
    )
    if partials_only:
        return mid_o, mid_lse
    out, lse = K.merge_splits(mid_o, mid_lse, q.dtype, K.MERGE_BLOCK_D)
    kept = kept_rows.reshape(B, Hkv, ns).sum(-1, dtype=torch.int32) if count_kept else None
    return out, lse, kept
