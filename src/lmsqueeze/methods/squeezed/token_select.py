"""Per-token prefill selection: every query token of a prefill chunk reads its own clusters (the paper's rule).

A prefill chunk of T user tokens used to share one key set (the clusters of highest mean estimated weight
over the chunk). Here each token t compares itself with the centroids, exactly as a decode step does
(lookup.py): a_tj = max_g (q_gt·c_j * scaling - log Z_gt) over the query heads g of the KV head, and keeps

    rule 'threshold': the clusters with a_tj > log tau (the decode threshold, calibrated offline), or
    rule 'budget':    the clusters of highest a_tj until their keys reach (1 - sparsity) of the clustered keys.

Hierarchical indexes apply the same rule at the coarse level first (coarse threshold / coarse budget) and
rank only the fine clusters under surviving coarse ones (log Z over those). The observation window (cluster
C) is always kept. Returns a per-token cluster mask keep [B, Hkv, T, C + 1]; kernels.token_select_attention
turns it into attention where every query row sees only its own token's keys.
"""

from __future__ import annotations

import math

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.squeezed.index import SqueezedIndex
from lmsqueeze.methods.squeezed.lookup import budget_keep

RULES = ("threshold", "budget")
TOKEN_CHUNK = 256     # tokens scored at once (bounds the [B, Hkv, G, tokens, C] float32 scratch)


def token_log_scores(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor, scaling: float,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    """a = max_g (s - log Z) per token. q: [B, Hq, T, D] rotated; centroids: [Hkv, C, D]; lsizes: [Hkv, C]
    (-inf: empty); allowed: [B, Hkv, T, C] bool or None (log Z and a over allowed clusters only).
    Returns [B, Hkv, T, C] float32, -inf for empty / not allowed clusters."""
    B, Hq, T, D = q.shape
    Hkv, C, _ = centroids.shape
    G = Hq // Hkv
    cent = centroids.to(q.dtype)
    ls = lsizes.float()[None, :, None, None, :]
    out = torch.empty(B, Hkv, T, C, device=q.device, dtype=torch.float32)
    for t0 in range(0, T, TOKEN_CHUNK):
        qc = q[:, :, t0:t0 + TOKEN_CHUNK].reshape(B, Hkv, G, -1, D)
        s = torch.einsum("bhgtd,hcd->bhgtc", qc, cent).float() * scaling          # [B, Hkv, G, t, C]
        x = s + ls
        if allowed is not None:
            x = x.masked_fill(~allowed[:, :, None, t0:t0 + TOKEN_CHUNK], float("-inf"))
        log_z = torch.logsumexp(x, -1, keepdim=True)
        log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
        a = (s - log_z).masked_fill(~torch.isfinite(x), float("-inf"))
        out[:, :, t0:t0 + TOKEN_CHUNK] = a.amax(2)
    return out


def _per_token_budget(a: torch.Tensor, sizes: torch.Tensor, budget: int, allowed: torch.Tensor | None):
    """budget_keep for every token: a [B, Hkv, T, C], sizes [Hkv, C] -> keep [B, Hkv, T, C]."""
    B, Hkv, T, C = a.shape
    sz = sizes.repeat_interleave(T, 0)                                             # [Hkv * T, C]
    al = None if allowed is None else allowed.reshape(B, Hkv * T, C)
    return budget_keep(a.reshape(B, Hkv * T, C), sz, budget, al).reshape(B, Hkv, T, C)


def token_keep(q: torch.Tensor, idx: SqueezedIndex, scaling: float, sparsity: float, coarse_sparsity: float,
               rule: str = "threshold") -> torch.Tensor:
    """Clusters each query token reads. q: [B, Hq, T, D] rotated -> keep [B, Hkv, T, C + 1] bool (last: the
    observation window, always). Threshold rule: the index's calibrated thresholds; budget rule: the
    sparsity (and coarse_sparsity) as key budgets per token."""
    if rule not in RULES:
        raise LmsqueezeError(f"unknown prefill selection rule {rule!r}; use one of {', '.join(RULES)}")
    B, _, T, _ = q.shape
    nc = idx.clustered
    allowed = None
    if idx.hierarchical:
        a1 = token_log_scores(q, idx.coarse_centroids, idx.coarse_log_sizes, scaling)
        if rule == "threshold":
            keep1 = a1 > idx.coarse_log_threshold[None, :, None, None]
        else:
            keep1 = _per_token_budget(a1, idx.coarse_sizes, math.ceil((1 - coarse_sparsity) * nc), None)
        par = idx.parent.long()[None, :, None, :].expand(B, -1, T, -1)
        allowed = keep1.gather(-1, par)                                             # [B, Hkv, T, C]
    a = token_log_scores(q, idx.centroids, idx.log_sizes, scaling, allowed)
    if rule == "threshold":
        keep = a > idx.log_threshold[None, :, None, None]
    else:
        keep = _per_token_budget(a, idx.sizes, math.ceil((1 - sparsity) * nc), allowed)
    return torch.cat([keep, torch.ones_like(keep[..., :1])], -1)


def kept_rows(keep: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Fixed rows each token reads. keep: [B, Hkv, T, C + 1]; offsets: [Hkv, C + 2] -> [B, Hkv, T] float32."""
    sizes = (offsets[:, 1:] - offsets[:, :-1]).float()                             # [Hkv, C + 1]
    return (keep.float() * sizes[None, :, None, :]).sum(-1)


def block_union(keep: torch.Tensor, G: int, block_m: int) -> torch.Tensor:
    """Union of the kept clusters over the tokens of each block of `block_m` packed query rows (row = t * G + g,
    as the attention kernel packs them). keep: [B, Hkv, T, K] -> [B, Hkv, NB, K] bool, NB = ceil(T*G/block_m)."""
    B, Hkv, T, K = keep.shape
    nb = -(-(T * G) // block_m)
    starts = torch.arange(nb, device=keep.device) * block_m
    lo = starts // G                                                                # first token of each block
    hi = (torch.clamp(starts + block_m, max=T * G) - 1) // G + 1                    # one past its last token
    cs = torch.cat([keep.new_zeros(B, Hkv, 1, K, dtype=torch.int32), keep.to(torch.int32).cumsum(2)], 2)
    return (cs[:, :, hi] - cs[:, :, lo]) > 0
