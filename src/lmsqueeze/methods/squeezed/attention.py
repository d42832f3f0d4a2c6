"""The Squeezed Attention layer state: sparse over the prepared fixed context, dense over the user's tokens.

Decode (one query per sequence): centroid scores -> [fine scores under surviving coarse clusters] -> one
fused kernel that keeps the clusters above the calibrated threshold and attends their rows, the observation
window and the local slots (kernels.py). On CUDA inside the static decode step this is three (four,
hierarchical) launches after the fused RoPE + KV write, with no host synchronisation.
Prefill (a chunk of T > 1 queries), `prefill` mode (SqueezedAttention's default: 'chunk'):
  'token' / 'token-budget': every query token selects its own clusters (token_select.py: the
      decode threshold, or its top clusters up to the key budget), plus the observation window; one attention
      in which each query row sees only its token's rows (kernels.token_select_attention: a block of queries
      lists the union of its tokens' rows, masked per token);
  'chunk': one key set per (sequence, KV head) for the whole chunk: the clusters of highest mean estimated
      attention over the chunk's queries (max over the query heads of the group), up to the key budget
      (1 - sparsity) of the clustered keys, plus the observation window; one gather attention over them. On
      CUDA (`prefill_gathered`) the budget is exact (the crossing cluster gives only the keys that fill it), so
      every head reads the same number of rows: they are gathered and attended by torch's cuDNN kernel with
      the query heads of a KV head packed as rows, the user tokens by the Triton kernel, merged by log-sum-exp.
"""

from __future__ import annotations

import logging
import math

import torch

from lmsqueeze.methods.cache import Step
from lmsqueeze.methods.squeezed.index import SqueezedIndex
from lmsqueeze.methods.squeezed.kernels import (
    SELECT_MAX_CLUSTERS,
    centroid_scores,
    chunk_rows_triton,
    fine_scores,
    gathered_attention,
    prefill_scores,
    squeezed_decode,
    token_select_attention,
)
from lmsqueeze.methods.squeezed.lookup import (
    budget_keep,
    chunk_agg,
    keys_from_clusters,
    mask_to_index,
    rows_from_clusters,
)
from lmsqueeze.methods.squeezed.state import FixedContextState, cached_layer
from lmsqueeze.methods.squeezed.token_select import kept_rows, token_keep

log = logging.getLogger(__name__)


def decode_scores(q: torch.Tensor, idx: SqueezedIndex, scaling: float, count: bool | None = None):
    """q: [B, Hq, D] rotated -> (scores [B, Hq, C], chunk_lse, scored [B, Hkv] fine centroids multiplied, or
    None for a flat index or when not `count`; count None: only off the GPU, to keep the step launch-lean).

    Hierarchical: coarse scores, then only the fine centroids under coarse clusters above their threshold.
    """
    if count is None:
        count = not q.is_cuda
    if not idx.hierarchical:
        s, lse = centroid_scores(q, idx.centroids, idx.log_sizes, scaling)
        return s, lse, None
    s1, e1 = centroid_scores(q, idx.coarse_centroids, idx.coarse_log_sizes, scaling)
    s2, e2, scored = fine_scores(q, idx.centroids, idx.log_sizes, idx.parent, s1, e1, idx.coarse_log_threshold,
                                 scaling, count=count)
    return s2, e2, scored


def prefill_keep(q: torch.Tensor, idx: SqueezedIndex, scaling: float, sparsity: float,
                 coarse_sparsity: float) -> torch.Tensor:
    """Clusters a prefill chunk reads. q: [B, Hq, T, D] rotated -> keep [B, Hkv, C + 1] (last: observation
    window, always)."""
    B, _, T, _ = q.shape
    Hkv = idx.keys.shape[0]
    nc = idx.clustered
    allowed = None
    lsizes = idx.log_sizes[None]
    if idx.hierarchical:
        agg1 = chunk_agg(prefill_scores(q, idx.coarse_centroids, idx.coarse_log_sizes[None], scaling), T, Hkv)
        keep1 = budget_keep(agg1, idx.coarse_sizes, math.ceil((1 - coarse_sparsity) * nc))
        allowed = keep1.gather(-1, idx.parent.long()[None].expand(B, -1, -1))
        lsizes = lsizes.masked_fill(~allowed, float("-inf"))
    agg = chunk_agg(prefill_scores(q, idx.centroids, lsizes, scaling), T, Hkv)
    keep = budget_keep(agg, idx.sizes, math.ceil((1 - sparsity) * nc), allowed)
    return torch.cat([keep, torch.ones_like(keep[..., :1])], -1)


def prefill_rows(q: torch.Tensor, idx: SqueezedIndex, scaling: float, sparsity: float, coarse_sparsity: float,
                 sync_free: bool | None = None, from_clusters: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed rows a prefill chunk reads ('chunk' rule): (rows [B, Hkv, M] int32, counts [B, Hkv] int32).
    sync_free (None: PREFILL_SYNC_FREE): M = all N rows (only the first counts are used) instead of the largest
    count, so no host synchronisation: the selection can run ahead of the GPU or inside a CUDA graph.
    from_clusters (None: PREFILL_ROWS_FROM_CLUSTERS): the same list built with a scan over clusters instead of
    rows (lookup.rows_from_clusters)."""
    width = idx.keys.shape[1] if (PREFILL_SYNC_FREE if sync_free is None else sync_free) else None
    from_clusters = PREFILL_ROWS_FROM_CLUSTERS if from_clusters is None else from_clusters
    if (q.is_cuda and PREFILL_SELECT_KERNEL and from_clusters and width is not None and not idx.hierarchical
            and idx.num_clusters <= SELECT_MAX_CLUSTERS):
        psum = prefill_scores(q, idx.centroids, idx.log_sizes[None], scaling)
        return chunk_rows_triton(psum, idx.offsets, idx.row_cluster, math.ceil((1 - sparsity) * idx.clustered), width)
    keep = prefill_keep(q, idx, scaling, sparsity, coarse_sparsity)
    if from_clusters:
        return rows_from_clusters(keep, idx.offsets, idx.row_cluster, width)
    return mask_to_index(keys_from_clusters(keep, idx.row_cluster), width)


def gather_sdpa_ok(q: torch.Tensor, idx: SqueezedIndex, window, local_valid) -> bool:
    """Whether a 'chunk' prefill takes `prefill_gathered` (PREFILL_GATHER_SDPA, CUDA, fp16/bf16, flat index, no
    sliding window or padding mask, torch's cuDNN attention present)."""
    return (PREFILL_GATHER_SDPA and not _GATHER_SDPA_FAILED and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and window is None and local_valid is None
            and not idx.hierarchical and idx.num_clusters <= SELECT_MAX_CLUSTERS
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
            and torch.backends.cudnn.is_available())


def prefill_gathered(q: torch.Tensor, idx: SqueezedIndex, scaling: float, sparsity: float, local_k, local_v,
                     lengths, starts) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'chunk' prefill with an exact key budget, so that every (sequence, KV head) reads the same number of
    fixed rows: the crossing cluster gives only the keys that fill the budget (chunk_rows_triton exact=True),
    and the rows are attended by `gathered_attention` (gathered, then torch's cuDNN kernel with the query heads
    of a KV head packed as rows). No host sync. q: [B, Hq, T, D] rotated -> (out [B, Hq, T, D], counts [B, Hkv])."""
    N = idx.keys.shape[1]
    budget = math.ceil((1 - sparsity) * idx.clustered)
    psum = prefill_scores(q, idx.centroids, idx.log_sizes[None], scaling)
    rows, counts = chunk_rows_triton(psum, idx.offsets, idx.row_cluster, budget, N, exact=True)
    width = min(budget, idx.clustered) + N - idx.clustered      # the same for every head: all clustered keys count
    out = gathered_attention(q, idx.keys, idx.values, rows, width, local_k, local_v, lengths, scaling, starts)
    return out, counts


# 'chunk' prefill on CUDA through `prefill_gathered` (exact budget, cuDNN attention over the gathered rows) instead
# of prefill_rows + the Triton gather attention: 0.771 vs 0.894-0.904 ms for a 1K-token chunk against 128K, eager
# (H100, same run, benchmarks/results/squeezed_prefill_h100_v14.json)
PREFILL_GATHER_SDPA = True
_GATHER_SDPA_FAILED: list = []   # why the cuDNN path failed in this process, if it did (then it is not tried again)
# 'chunk' prefill selection without a host sync (prefill_rows): 1.49 ms vs 1.69 ms with the sync for a 1K-token
# chunk against 128K (eager, same scoring and attention configs, same rows; H100, squeezed_decode_h100_v3.json)
PREFILL_SYNC_FREE = True
# rows_from_clusters instead of mask_to_index over all N rows: identical lists; 1.347 vs 1.510 ms eager and 1.272
# vs 1.444 ms in a CUDA graph for the whole 1K-token prefill against 128K (H100, same run, squeezed_decode_h100_v4.json)
PREFILL_ROWS_FROM_CLUSTERS = True
# flat index, no host sync, clusters from the scan: the keep decision and row list by two Triton kernels
# (kernels.chunk_rows_triton) instead of ~30 small torch ops (sort, scans, gathers, scatters)
PREFILL_SELECT_KERNEL = True
REFERENCE_SCORES = 1 << 24   # off the GPU, per-token prefill attends at most this many (query head, token, row) scores at once


class SqueezedState(FixedContextState):
    """One layer of a Squeezed Attention cache (see the module docstring)."""

    def __init__(self, layer_idx: int, artifact, sparsity: float, coarse_sparsity: float,
                 max_length: int | None = None, prefill: str = "chunk") -> None:
        super().__init__(layer_idx, max_length)
        self.artifact = artifact
        self.sparsity, self.coarse_sparsity = sparsity, coarse_sparsity
        self.prefill = prefill
        self.centroids_scored = 0.0   # centroids multiplied per query head group, summed (CPU paths only)

    def fixed(self, q: torch.Tensor) -> SqueezedIndex:
        return cached_layer(self.artifact, self.layer_idx, q.device, q.dtype, SqueezedIndex.from_tensors)

    def static_cuda_ok(self) -> bool:
        return True

    def decode_cuda(self, q_rot: torch.Tensor, idx: SqueezedIndex, step: Step) -> torch.Tensor:
        s, lse, _ = decode_scores(q_rot, idx, step.scaling)
        out, _, _ = squeezed_decode(q_rot, idx.keys, idx.values, idx.offsets, s, lse, idx.log_threshold, self.k,
                                    self.v, step.lengths, step.scaling, step.starts, count_kept=False)
        return out

    def attend_fixed(self, q_rot, idx: SqueezedIndex, step: Step, lengths, starts, local_valid, n):
        if q_rot.shape[2] != 1:
            if self.prefill == "chunk" and gather_sdpa_ok(q_rot, idx, step.window, local_valid):
                try:
                    out, counts = prefill_gathered(q_rot, idx, step.scaling, self.sparsity, self.k[:, :, :n],
                                                   self.v[:, :, :n], lengths, starts)
                except RuntimeError as e:   # cuDNN refused this shape or build: the Triton path from now on
                    _GATHER_SDPA_FAILED.append(repr(e)[:300])
                    log.warning("Squeezed prefill: torch's cuDNN attention failed (%s); using the Triton gather "
                                "attention from now on", repr(e)[:200])
                else:
                    self.note_rows(counts)
                    return out
            if self.prefill == "chunk":
                return super().attend_fixed(q_rot, idx, step, lengths, starts, local_valid, n)
            return self.prefill_per_token(q_rot, idx, step, lengths, starts, local_valid, n)
        q = q_rot[:, :, 0]
        count = self.counting(q)
        s, lse, scored = decode_scores(q, idx, step.scaling, count=count)
        out, _, kept = squeezed_decode(q, idx.keys, idx.values, idx.offsets, s, lse, idx.log_threshold,
                                       self.k[:, :, :n], self.v[:, :, :n], lengths, step.scaling, starts, local_valid,
                                       step.window, step.positions, idx.positions, count_kept=count,
                                       row_cluster=idx.row_cluster)
        if count:
            self.note_rows(kept)
            if scored is None:
                self.centroids_scored += float(idx.num_clusters)
            else:
                self.centroids_scored += float(scored.float().mean()) + idx.coarse_centroids.shape[1]
        return out[:, :, None]

    def select(self, q_rot: torch.Tensor, idx: SqueezedIndex, step: Step):
        return prefill_rows(q_rot, idx, step.scaling, self.sparsity, self.coarse_sparsity)

    def prefill_per_token(self, q_rot, idx: SqueezedIndex, step: Step, lengths, starts, local_valid, n):
        """A prefill chunk where every token reads its own clusters. q_rot: [B, Hq, T, D] -> [B, Hq, T, D]."""
        rule = "budget" if self.prefill == "token-budget" else "threshold"
        keep = token_keep(q_rot, idx, step.scaling, self.sparsity, self.coarse_sparsity, rule)
        if self.counting(q_rot):
            self.note_rows(kept_rows(keep, idx.offsets).mean(-1))
        T = q_rot.shape[2]
        step_t = T if q_rot.is_cuda else max(1, REFERENCE_SCORES // (q_rot.shape[1] * idx.keys.shape[1]))
        outs = []
        for t0 in range(0, T, step_t):            # the reference holds [B, Hq, tokens, N] scores: slice the tokens
            t1 = min(T, t0 + step_t)
            pos = None if step.positions is None else step.positions[:, t0:t1]
            outs.append(token_select_attention(q_rot[:, :, t0:t1], idx.keys, idx.values, keep[:, :, t0:t1],
                                               idx.row_cluster, self.k[:, :, :n], self.v[:, :, :n],
                                               lengths - (T - t1), step.scaling, starts, local_valid, step.window,
                                               pos, idx.positions))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)
