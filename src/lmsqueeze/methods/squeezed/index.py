"""The per-layer index of a prepared fixed context: keys sorted by cluster, centroids, offsets, thresholds.

Layout (per layer, per KV head; N = Nc + A fixed-context tokens, Nc clustered, A always attended: the first
`sinks` tokens (attention sinks) and the W-token observation window):
  keys, values: [Hkv, N, D]  RoPE applied at *relative* positions (token i of an S-token context sits at
                i - S, so the user input starts at position 0); rows [0, Nc) sorted by cluster (a cluster is
                the contiguous range offsets[j]:offsets[j+1]), rows [Nc, N) the sinks then the observation
                window, in context order.
  positions:    [Hkv, N] int32 relative position of each row (for sliding-window models).
  offsets:      [Hkv, C + 2] int32; "cluster" C is the sinks + observation window (always attended).
  centroids:    [Hkv, C, D] float32 mean of the raw keys of each cluster (0 for an empty one).
  labels:       [Hkv, Nc] int32 cluster of each clustered key (context tokens sinks .. S - W - 1) in order.
  log_threshold:[Hkv] float32 (decode keeps cluster j iff its score > this).
Hierarchical mode adds coarse_centroids [Hkv, C1, D], coarse_offsets [Hkv, C1 + 1] (fine clusters are sorted
by coarse cluster: a coarse cluster owns fine clusters coarse_offsets[c]:coarse_offsets[c+1]), parent
[Hkv, C] int32 and coarse_log_threshold [Hkv].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.squeezed.cluster import cluster_means, spherical_kmeans
from lmsqueeze.methods.squeezed.lookup import log_sizes
from lmsqueeze.methods.squeezed.thresholds import flat_threshold, hierarchical_thresholds

INDEX_FIELDS = ("keys", "values", "positions", "offsets", "centroids", "labels", "log_threshold")
HIER_FIELDS = ("coarse_centroids", "coarse_offsets", "parent", "coarse_log_threshold")


def num_clusters(fraction: float, n: int) -> int:
    """Clusters for n keys at `fraction` (at least 1, at most n)."""
    return max(1, min(n, round(fraction * n)))


def row_clusters(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """The cluster of each sorted row: offsets [H, C + 2] (cluster c's rows are [offsets[c], offsets[c + 1]), the
    last one the observation window), n rows per head -> [H, n] int64."""
    H, C2 = offsets.shape
    sizes = (offsets[:, 1:] - offsets[:, :-1]).long().flatten()
    return torch.repeat_interleave(torch.arange(C2 - 1, device=offsets.device).repeat(H), sizes).reshape(H, n)


def _offsets(sizes: torch.Tensor) -> torch.Tensor:
    """sizes: [H, C] -> [H, C + 1] exclusive-then-total cumulative sums (int64)."""
    return torch.cat([torch.zeros_like(sizes[:, :1]), torch.cumsum(sizes, -1)], -1)


def build_layer_index(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, q_obs: torch.Tensor,
                      scaling: float, *, centroids: float, sparsity: float, observation: int,
                      hierarchical: tuple[float, float] | None = None, coarse_sparsity: float = 0.5,
                      iters: int = 16, seed: int = 0, sinks: int = 0, threshold: str = "head",
                      labels: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Cluster one layer's fixed-context keys and calibrate its thresholds.

    keys, values: [Hkv, S, D] (RoPE at relative positions); positions: [S] int relative positions;
    q_obs: [Hq, W, D] the queries of the last W = `observation` tokens (same RoPE convention); sinks: first
    tokens always attended (never clustered); threshold: 'head' (one calibrated threshold per KV head) or
    'layer' (one per layer: heads with peaked attention keep fewer keys, flat ones more); labels: [Hkv, Nc]
    cluster labels to reuse (another index of this context with the same clusters: skips K-means; flat only).
    Returns (tensors named as in the module docstring, calibration statistics).
    """
    Hkv, S, D = keys.shape
    W = observation
    if S <= W + sinks:
        raise LmsqueezeError(f"the fixed context has {S} tokens, not more than the observation window ({W}) "
                             f"plus {sinks} sinks; use a longer context or a smaller `observation` / `sinks`")
    Hq = q_obs.shape[0]
    if q_obs.shape != (Hq, W, D) or Hq % Hkv:
        raise LmsqueezeError(f"observation queries {tuple(q_obs.shape)} do not match keys {tuple(keys.shape)}")
    Nc = S - W - sinks
    clustered = keys[:, sinks:sinks + Nc]
    C = num_clusters(hierarchical[1] if hierarchical else centroids, Nc)
    if labels is not None:
        if hierarchical or labels.shape != (Hkv, Nc) or int(labels.max()) >= C:
            raise LmsqueezeError(f"labels to reuse {tuple(labels.shape)} do not fit {Hkv} heads x {Nc} clustered "
                                 f"keys in {C} clusters (flat lookup only): prepare without `reuse`")
        labels = labels.to(keys.device).long()
    else:
        labels = spherical_kmeans(clustered, C, iters, seed)
    cents, sizes = cluster_means(clustered, labels, C)
    # (Numbering the clusters so that similar ones fall in different decode blocks, so a query's kept rows would
    # spread evenly over the decode programs, changed nothing: 42.36 us at 128K either way, the heaviest block 310
    # vs 332 kept rows (H100, benchmarks/results/squeezed_decode_trace_h100_v6.json, commit 7563fbd). K-means'
    # numbering is already unrelated to similarity; the uneven blocks are the binomial spread of 32 clusters.)
    out: dict[str, torch.Tensor] = {}
    stats: dict[str, float] = {"clusters": C, "clustered": Nc, "observation": W, "sinks": sinks,
                               "empty_clusters": float((sizes == 0).float().mean())}
    if hierarchical:
        C1 = num_clusters(hierarchical[0], Nc)
        C1 = min(C1, C)
        parent0 = spherical_kmeans(cents, C1, iters, seed + 1)           # coarse cluster of each fine one
        perm = torch.argsort(parent0 * C + torch.arange(C, device=keys.device), dim=-1)  # fine sorted by parent
        inv = torch.argsort(perm, dim=-1)
        labels = inv.gather(-1, labels)
        cents = cents.gather(1, perm[..., None].expand(-1, -1, D))
        sizes = sizes.gather(-1, perm)
        parent = parent0.gather(-1, perm)
        coarse_cents, coarse_sizes = cluster_means(clustered, parent.gather(-1, labels), C1)
        fine_per_coarse = torch.zeros(Hkv, C1, dtype=torch.int64, device=keys.device).scatter_add_(
            1, parent, torch.ones_like(parent))
        G = Hq // Hkv
        tau1, tau2, kept, scored = hierarchical_thresholds(
            q_obs.reshape(Hkv, G, W, D), coarse_cents, coarse_sizes, cents, sizes, parent, scaling,
            coarse_sparsity, sparsity)
        out.update(coarse_centroids=coarse_cents, coarse_offsets=_offsets(fine_per_coarse).to(torch.int32),
                   parent=parent.to(torch.int32), coarse_log_threshold=tau1)
        out["log_threshold"] = tau2
        stats.update(coarse_clusters=C1, fine_scored_fraction=float(scored.mean()))
    else:
        tau, kept = flat_threshold(q_obs.reshape(Hkv, Hq // Hkv, W, D), cents, sizes, scaling, sparsity,
                                   per_head=threshold == "head")
        out["log_threshold"] = tau
    stats["calibrated_kept_fraction"] = float(kept.mean())
    order = torch.argsort(labels, dim=-1, stable=True) + sinks            # [Hkv, Nc] rows grouped by cluster
    always = torch.cat([torch.arange(sinks, device=keys.device), torch.arange(sinks + Nc, S, device=keys.device)])
    rows = torch.cat([order, always[None].expand(Hkv, -1)], -1)           # [Hkv, N]
    out["keys"] = keys.gather(1, rows[..., None].expand(-1, -1, D)).contiguous()
    out["values"] = values.gather(1, rows[..., None].expand(-1, -1, D)).contiguous()
    out["positions"] = positions.to(keys.device)[rows].to(torch.int32)
    offs = _offsets(sizes)
    out["offsets"] = torch.cat([offs, torch.full((Hkv, 1), S, device=keys.device, dtype=offs.dtype)], -1).to(
        torch.int32)
    out["centroids"] = cents.float().contiguous()
    out["labels"] = labels.to(torch.int32)
    return out, stats


@dataclass
class SqueezedIndex:
    """One layer's index on a device, with derived tensors the lookup needs (see the module docstring)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    centroids: torch.Tensor          # in the compute dtype (what the kernels read)
    log_sizes: torch.Tensor          # [Hkv, C] float32
    sizes: torch.Tensor              # [Hkv, C] int64
    log_threshold: torch.Tensor
    row_cluster: torch.Tensor        # [Hkv, N] int64 cluster of each row (C for the observation window)
    coarse_centroids: torch.Tensor | None = None
    coarse_log_sizes: torch.Tensor | None = None
    coarse_sizes: torch.Tensor | None = None
    coarse_offsets: torch.Tensor | None = None
    parent: torch.Tensor | None = None
    coarse_log_threshold: torch.Tensor | None = None
    clustered_rows: int | None = None  # clustered keys per head, read once when built (no host sync per use)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def clustered(self) -> int:
        if self.clustered_rows is None:
            self.clustered_rows = int(self.offsets[0, -2])
        return self.clustered_rows

    @property
    def hierarchical(self) -> bool:
        return self.coarse_centroids is not None

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], device, dtype: torch.dtype) -> SqueezedIndex:
        """Move a layer's saved tensors to `device`; keys/values/centroids in `dtype`."""
        offsets = t["offsets"].to(device=device, dtype=torch.int32).contiguous()
        sizes = (offsets[:, 1:-1] - offsets[:, :-2]).long()
        row_cluster = row_clusters(offsets, t["positions"].shape[1])
        idx = cls(
            keys=t["keys"].to(device=device, dtype=dtype).contiguous(),
            values=t["values"].to(device=device, dtype=dtype).contiguous(),
            positions=t["positions"].to(device=device, dtype=torch.int32).contiguous(),
            offsets=offsets, centroids=t["centroids"].to(device=device, dtype=dtype).contiguous(),
            log_sizes=log_sizes(sizes).contiguous(), sizes=sizes,
            log_threshold=t["log_threshold"].to(device=device, dtype=torch.float32).contiguous(),
            row_cluster=row_cluster, clustered_rows=int(offsets[0, -2]),
        )
        if "coarse_centroids" in t:
            co = t["coarse_offsets"].to(device=device).long()
            key_off = offsets.long().gather(-1, co)                       # key offset of each coarse range
            idx.coarse_centroids = t["coarse_centroids"].to(device=device, dtype=dtype).contiguous()
            idx.coarse_sizes = key_off[:, 1:] - key_off[:, :-1]
            idx.coarse_log_sizes = log_sizes(idx.coarse_sizes).contiguous()
            idx.coarse_offsets = co.to(torch.int32).contiguous()
            idx.parent = t["parent"].to(device=device, dtype=torch.int32).contiguous()
            idx.coarse_log_threshold = t["coarse_log_threshold"].to(device=device, dtype=torch.float32).contiguous()
        return idx
