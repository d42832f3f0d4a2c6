"""Score thresholds calibrated on the fixed context's own last tokens (the observation window) as queries.

For every observation query and every clustered key t, the key's score is a_{label(t)} (lookup.py: the log
of its estimated attention weight, max over the query heads of its KV head). log tau is the weighted
quantile of these scores (weights = cluster sizes) at `sparsity`: one query keeps on average a fraction
1 - sparsity of the keys, i.e. the decode-time rule "keep cluster j iff a_j > log tau" reaches the target.
Log domain throughout; sparsity 0 gives -inf (keep everything).
"""

from __future__ import annotations

import torch

from lmsqueeze.methods.squeezed.lookup import group_log_scores, log_sizes


def weighted_log_threshold(a: torch.Tensor, weights: torch.Tensor, sparsity: float) -> torch.Tensor:
    """a: [H, M, C] scores of M queries, weights: [H, C] keys per cluster -> log tau: [H] float32.

    Keeping the entries with a > tau keeps at most a fraction 1 - sparsity of the total weight.
    """
    H, M, C = a.shape
    if sparsity <= 0:
        return torch.full((H,), float("-inf"), device=a.device)
    vals = a.reshape(H, M * C)
    w = weights.float()[:, None, :].expand(H, M, C).reshape(H, M * C)
    order = torch.argsort(vals, dim=-1, descending=True, stable=True)
    v_sorted = vals.gather(-1, order)
    w_cum = torch.cumsum(w.gather(-1, order), -1)
    target = (1.0 - sparsity) * w_cum[:, -1:]
    i = torch.searchsorted(w_cum.contiguous(), target.contiguous(), right=True).squeeze(-1)  # entries kept
    pad = torch.cat([v_sorted, torch.full((H, 1), float("-inf"), device=a.device)], -1)
    return pad.gather(-1, i.clamp_max(M * C)[:, None]).squeeze(-1)


def obs_scores(q_obs: torch.Tensor, centroids: torch.Tensor, scaling: float) -> torch.Tensor:
    """q_obs: [Hkv, G, W, D], centroids: [Hkv, C, D] -> logits [Hkv, G, W, C] float32."""
    return torch.einsum("hgwd,hcd->hgwc", q_obs.float(), centroids.float()) * scaling


def flat_threshold(q_obs: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, scaling: float,
                   sparsity: float, per_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One-level lookup. Returns (log tau [Hkv], kept fraction of keys per head on the observation queries).
    per_head False: one threshold for all the layer's heads (the sparsity target holds for the layer)."""
    a = group_log_scores(obs_scores(q_obs, centroids, scaling), log_sizes(sizes)[:, None, None, :])  # [H, W, C]
    if per_head:
        tau = weighted_log_threshold(a, sizes, sparsity)
    else:
        H, W, C = a.shape
        joint = a.permute(1, 0, 2).reshape(1, W, H * C)
        tau = weighted_log_threshold(joint, sizes.reshape(1, H * C), sparsity).expand(H).contiguous()
    return tau, _kept_fraction(a > tau[:, None, None], sizes)


def hierarchical_thresholds(q_obs: torch.Tensor, coarse: torch.Tensor, coarse_sizes: torch.Tensor,
                            fine: torch.Tensor, fine_sizes: torch.Tensor, parent: torch.Tensor, scaling: float,
                            coarse_sparsity: float, sparsity: float):
    """Two-level lookup: tau1 prunes `coarse_sparsity` of the keys at the coarse level; tau2 is then chosen
    over the surviving fine clusters (their own log Z) so that the keys kept by both reach 1 - sparsity.

    parent: [Hkv, C2] coarse cluster of each fine cluster. Returns (log tau1 [Hkv], log tau2 [Hkv],
    kept fraction [Hkv], fraction of fine centroids scored [Hkv]).
    """
    a1 = group_log_scores(obs_scores(q_obs, coarse, scaling), log_sizes(coarse_sizes)[:, None, None, :])
    tau1 = weighted_log_threshold(a1, coarse_sizes, coarse_sparsity)
    keep1 = a1 > tau1[:, None, None]                                   # [H, W, C1]
    allowed = keep1.gather(-1, parent[:, None, :].expand(-1, keep1.shape[1], -1))  # [H, W, C2]
    s2 = obs_scores(q_obs, fine, scaling)
    a2 = group_log_scores(s2, log_sizes(fine_sizes)[:, None, None, :], allowed[:, None])
    tau2 = weighted_log_threshold(a2, fine_sizes, sparsity)
    kept = _kept_fraction(a2 > tau2[:, None, None], fine_sizes)
    return tau1, tau2, kept, allowed.float().mean(dim=(1, 2))


def _kept_fraction(keep: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """keep: [H, M, C] bool, sizes: [H, C] -> mean over queries of the kept fraction of keys: [H]."""
    kept = (keep.float() * sizes.float()[:, None, :]).sum(-1)
    return (kept / sizes.float().sum(-1, keepdim=True).clamp_min(1)).mean(-1)
