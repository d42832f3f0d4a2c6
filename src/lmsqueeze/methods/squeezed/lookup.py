"""Centroid lookup math (plain torch): estimated attention of each cluster, and which keys to read.

For query head g, cluster j with centroid c_j and N_j keys (s_gj = q_g·c_j * scaling)::

    log Z_g = logsumexp_j (s_gj + log N_j)      # estimated log softmax denominator over the fixed context
    a_j     = max_g (s_gj - log Z_g)            # log of the estimated attention weight of one key of j,
                                                # the max over the query heads that share the KV head (GQA)

Everything stays in the log domain (no exp of raw logits: massive activations cannot overflow), and empty
clusters (N_j = 0) get a_j = -inf. Decode keeps cluster j when a_j > log tau (tau calibrated offline, see
thresholds.py); a prefill chunk keeps the clusters of highest mean estimated weight over its queries up to
the key budget. The last "cluster" of the sorted fixed context (index C) is the observation window: always
kept.
"""

from __future__ import annotations

import torch


def log_sizes(sizes: torch.Tensor) -> torch.Tensor:
    """log N_j as float32, -inf for empty clusters. sizes: [..., C] int."""
    s = sizes.float()
    return torch.where(s > 0, s.clamp_min(1).log(), torch.full_like(s, float("-inf")))


def safe_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over `dim`, with -inf (not NaN) where every entry is -inf."""
    return torch.logsumexp(x, dim=dim)  # torch returns -inf for all -inf rows


def group_log_scores(scores: torch.Tensor, lsizes: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """a = max_g (s_g - log Z_g), -inf where a cluster is empty or not allowed.

    scores: [..., G, M, C] float32 logits (M queries per head); lsizes: broadcastable to [..., 1, 1, C];
    allowed: bool broadcastable to scores (e.g. the fine clusters under surviving coarse ones) or None.
    Returns [..., M, C] float32.
    """
    x = scores + lsizes
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    log_z = safe_lse(x, -1)
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    a = (scores - log_z[..., None]).masked_fill(~torch.isfinite(x), float("-inf"))
    return a.amax(dim=-3)


def chunk_mean_scores(scores: torch.Tensor, lsizes: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill: log of the mean over a chunk's queries of the estimated weight, max over the group.

    scores: [..., G, T, C]; returns [..., C] float32 (-inf for empty / not allowed clusters).
    """
    x = scores + lsizes
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    log_z = safe_lse(x, -1)
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    logp = (scores - log_z[..., None]).masked_fill(~torch.isfinite(x), float("-inf"))
    T = scores.shape[-2]
    mean = torch.logsumexp(logp, dim=-2) - torch.log(torch.tensor(float(T)))  # [..., G, C]
    return mean.amax(dim=-2)


def chunk_agg(psum: torch.Tensor, T: int, hkv: int) -> torch.Tensor:
    """psum [B, Hq, C] -> log of the mean estimated weight, max over each KV head's query heads: [B, Hkv, C]."""
    B, Hq, C = psum.shape
    return torch.log(psum / T).reshape(B, hkv, Hq // hkv, C).amax(2)


def budget_keep(agg: torch.Tensor, sizes: torch.Tensor, budget: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the clusters of highest `agg` until their keys reach `budget` (the crossing cluster included).

    agg: [B, H, C] float32; sizes: [H, C] int; allowed: [B, H, C] bool or None. Non-empty allowed clusters
    are eligible even at agg = -inf (an underflowed estimate), ranked last. Returns bool [B, H, C].
    """
    return budget_sizes(agg, sizes, budget, allowed) > 0


def budget_sizes(agg: torch.Tensor, sizes: torch.Tensor, budget: int,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """`budget_keep` as kept keys per cluster, exactly `budget` in all: the crossing cluster gives only its first
    (budget - keys of the clusters ranked above it) keys. Returns int64 [B, H, C] (fewer than `budget` in all
    only when the eligible clusters hold fewer keys)."""
    B, H, C = agg.shape
    sz = sizes.to(agg.device).long()[None].expand(B, H, C)
    eligible = sz > 0
    if allowed is not None:
        eligible = eligible & allowed
    key = torch.where(torch.isfinite(agg), agg, torch.full_like(agg, -3.0e38))
    key = torch.where(eligible, key, torch.full_like(agg, float("-inf")))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    sz_sorted = torch.where(eligible, sz, 0).gather(-1, order)
    before = torch.cumsum(sz_sorted, -1) - sz_sorted
    ks_sorted = (budget - before).clamp(0).minimum(sz_sorted)
    return torch.zeros_like(ks_sorted).scatter_(-1, order, ks_sorted)


def keys_from_clusters(keep: torch.Tensor, row_cluster: torch.Tensor) -> torch.Tensor:
    """Key mask from a cluster mask. keep: [B, H, C + 1] bool (index C = the observation window);
    row_cluster: [H, N] int64 cluster of each sorted key row. Returns bool [B, H, N]."""
    B = keep.shape[0]
    return keep.gather(-1, row_cluster[None].expand(B, -1, -1))


def mask_to_index(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a key mask into index lists. mask: [B, H, N] bool -> (idx [B, H, M] int32 ascending,
    padded with 0; counts [B, H] int32). M = `width` or the largest count (a host sync: prefill only)."""
    counts = mask.sum(-1)
    M = int(counts.max()) if width is None else width
    M = max(M, 1)
    pos = torch.cumsum(mask.long(), -1) - 1
    pos = torch.where(mask, pos, torch.full_like(pos, M))  # unselected rows land in a spill column
    idx = torch.zeros(*mask.shape[:2], M + 1, dtype=torch.int64, device=mask.device)
    rows = torch.arange(mask.shape[-1], device=mask.device).expand_as(pos)
    idx.scatter_(-1, pos.clamp_max(M), rows)
    return idx[..., :M].to(torch.int32).contiguous(), counts.clamp_max(M).to(torch.int32)


def rows_from_clusters(keep: torch.Tensor, offsets: torch.Tensor, row_cluster: torch.Tensor,
                       width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_to_index(keys_from_clusters(keep, row_cluster), width)` without a cumulative sum over the N rows:
    keys are sorted by cluster, so the p-th kept row of cluster c lands at (kept keys of clusters before c) + p;
    the cumulative sum runs over the C + 1 clusters, then each row is placed by one gather and one scatter.
    keep: [B, H, C + 1] bool, or int kept keys per cluster (its first ones); offsets: [H, C + 2] int (cluster
    c's rows are [offsets[c], offsets[c + 1])); row_cluster: [H, N]. Returns (idx [B, H, M] int32 ascending,
    padded with 0; counts [B, H] int32); M = `width` or the largest count (a host sync)."""
    B, H, _ = keep.shape
    N = row_cluster.shape[-1]
    offs = offsets.long()
    if keep.dtype == torch.bool:
        ks = torch.where(keep, (offs[:, 1:] - offs[:, :-1])[None], 0)            # [B, H, C + 1] kept sizes
    else:
        ks = keep.long()
    before = torch.cumsum(ks, -1) - ks                                            # kept keys of earlier clusters
    counts = ks.sum(-1)
    M = max(int(counts.max()) if width is None else width, 1)
    rc = row_cluster.long()
    rank = torch.arange(N, device=keep.device)[None] - offs.gather(1, rc)         # [H, N] row within its cluster
    rcb = rc[None].expand(B, -1, -1)
    pos = torch.where(rank[None] < ks.gather(-1, rcb), before.gather(-1, rcb) + rank[None], M)
    idx = torch.zeros(B, H, M + 1, dtype=torch.int32, device=keep.device)
    idx.scatter_(-1, pos.clamp_max(M), torch.arange(N, dtype=torch.int32, device=keep.device).expand(B, H, -1))
    return idx[..., :M].contiguous(), counts.clamp_max(M).to(torch.int32)
