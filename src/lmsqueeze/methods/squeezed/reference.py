"""Plain-PyTorch references of the Squeezed Attention kernels (float32 math, any device).

They define what the Triton kernels in `_triton_kernels.py` compute; `kernels.py` dispatches here for CPU
tensors and for the cases the kernels do not cover (sliding windows, arbitrary padding masks).

Shapes: B batch, Hq = G * Hkv query heads, D head dim, C clusters, N fixed-context rows (sorted by cluster,
observation window last), L local (user + generated) slots. Queries are RoPE-rotated.
"""

from __future__ import annotations

import torch

from lmsqueeze.kernels.merge import merge_attention_states
from lmsqueeze.methods.squeezed.lookup import budget_keep, budget_sizes, chunk_agg, rows_from_clusters

NEG = float("-inf")


def centroid_scores_reference(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor, scaling: float,
                              chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, D]; centroids: [Hkv, C, D]; lsizes: [Hkv, C] log cluster sizes (-inf: empty).

    Returns scores [B, Hq, C] = q·c * scaling (float32) and chunk_lse [B, Hq, ceil(C / chunk)] =
    logsumexp over each chunk of `chunk` clusters of (score + log size).
    """
    B, Hq, D = q.shape
    Hkv, C, _ = centroids.shape
    G = Hq // Hkv
    s = torch.einsum("bhgd,hcd->bhgc", q.float().reshape(B, Hkv, G, D), centroids.float()) * scaling
    x = s + lsizes.float()[None, :, None, :]
    return s.reshape(B, Hq, C), _chunk_lse(x.reshape(B, Hq, C), chunk)


def _chunk_lse(x: torch.Tensor, chunk: int) -> torch.Tensor:
    B, H, C = x.shape
    n = -(-C // chunk)
    pad = torch.full((B, H, n * chunk - C), NEG, device=x.device)
    return torch.logsumexp(torch.cat([x, pad], -1).reshape(B, H, n, chunk), -1)


def _log_z(chunk_lse: torch.Tensor) -> torch.Tensor:
    """[B, Hq, NCH] -> [B, Hq] log Z, 0 where no cluster counted (so scores stay -inf, never NaN)."""
    z = torch.logsumexp(chunk_lse, -1)
    return torch.where(torch.isfinite(z), z, torch.zeros_like(z))


def cluster_keep(scores: torch.Tensor, chunk_lse: torch.Tensor, log_tau: torch.Tensor, G: int) -> torch.Tensor:
    """Decode rule. scores: [B, Hq, C], chunk_lse: [B, Hq, NCH], log_tau: [Hkv] -> keep [B, Hkv, C] bool."""
    B, Hq, C = scores.shape
    a = (scores - _log_z(chunk_lse)[..., None]).reshape(B, Hq // G, G, C).amax(2)
    return a > log_tau[None, :, None]


def fine_scores_reference(q: torch.Tensor, fine: torch.Tensor, fine_lsizes: torch.Tensor, parent: torch.Tensor,
                          coarse_scores: torch.Tensor, coarse_chunk_lse: torch.Tensor, coarse_log_tau: torch.Tensor,
                          scaling: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level of the hierarchical lookup: score only the fine centroids under surviving coarse ones.

    q: [B, Hq, D]; fine: [Hkv, C2, D]; fine_lsizes: [Hkv, C2]; parent: [Hkv, C2] int; coarse_scores /
    coarse_chunk_lse: the first level's outputs; coarse_log_tau: [Hkv].
    Returns scores [B, Hq, C2] (-inf under pruned coarse clusters), chunk_lse [B, Hq, ceil(C2 / chunk)]
    over the scored ones, and scored [B, Hkv] int32 = fine centroids actually multiplied (the operation count).
    """
    B, Hq, D = q.shape
    Hkv, C2, _ = fine.shape
    G = Hq // Hkv
    keep1 = cluster_keep(coarse_scores, coarse_chunk_lse, coarse_log_tau, G)           # [B, Hkv, C1]
    alive = keep1.gather(-1, parent.long()[None].expand(B, -1, -1))                     # [B, Hkv, C2]
    s = torch.full((B, Hkv, G, C2), NEG, device=q.device)
    qg = q.float().reshape(B, Hkv, G, D)
    for b in range(B):
        for h in range(Hkv):
            rows = alive[b, h].nonzero().squeeze(-1)
            if rows.numel():
                s[b, h, :, rows] = (qg[b, h] @ fine[h, rows].float().T) * scaling     # only these rows
    x = (s + fine_lsizes.float()[None, :, None, :]).masked_fill(~alive[:, :, None, :], NEG)
    scored = alive.sum(-1).to(torch.int32)
    return s.reshape(B, Hq, C2), _chunk_lse(x.reshape(B, Hq, C2), chunk), scored


def _attend(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: [..., M] float32 (-inf = masked), values: [..., M, D] -> (out [..., D], lse [...])."""
    lse = torch.logsumexp(scores, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])
    return (p[..., None, :] @ values.float()).squeeze(-2), lse


def _local_mask(B: int, T: int, L: int, lengths: torch.Tensor, starts: torch.Tensor | None,
                local_valid: torch.Tensor | None, window: int | None, device) -> torch.Tensor:
    """[B, T, L] bool: query t sits at local slot lengths - T + t and sees slots <= its own."""
    j = torch.arange(L, device=device)[None, None, :]
    qs = (lengths.long()[:, None] - T + torch.arange(T, device=device)[None, :])[..., None]   # [B, T, 1]
    m = j <= qs
    if starts is not None:
        m = m & (j >= starts.long()[:, None, None])
    if local_valid is not None:
        m = m & local_valid[:, None, :L]
    if window is not None:
        m = m & (qs - j < window)
    return m | (j == qs)


def _fixed_window(mask: torch.Tensor, window: int | None, q_pos: torch.Tensor | None,
                  key_pos: torch.Tensor | None) -> torch.Tensor:
    """mask: [B, Hkv, T, N] & (q_pos - key_pos < window). q_pos: [B, T], key_pos: [Hkv, N] (or [B, Hkv, N])."""
    if window is None:
        return mask
    kp = key_pos.long() if key_pos.dim() == 3 else key_pos.long()[None]
    return mask & (q_pos.long()[:, None, :, None] - kp[:, :, None, :] < window)


def indexed_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                                counts: torch.Tensor, local_k: torch.Tensor, local_v: torch.Tensor,
                                lengths: torch.Tensor, scaling: float, starts: torch.Tensor | None = None,
                                local_valid: torch.Tensor | None = None, window: int | None = None,
                                q_pos: torch.Tensor | None = None, key_pos: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new queries over selected fixed-context rows and the causal local slots.

    q: [B, Hq, T, D]; keys, values: [Hkv, N, D]; idx: [B, Hkv, M] int rows (the first counts[b, h] used);
    local_k, local_v: [B, Hkv, L, D] with the chunk already written; lengths: [B] filled local slots
    (query t sits at slot lengths - T + t); starts: [B] first valid local slot; local_valid: [B, L] bool;
    window with q_pos: [B, T] and key_pos: [Hkv, N] positions. Returns (out [B, Hq, T, D] in q's dtype,
    lse [B, Hq, T] float32).
    """
    B, Hq, T, D = q.shape
    Hkv = keys.shape[0]
    G = Hq // Hkv
    M = idx.shape[-1]
    rows = idx.long().clamp(0, keys.shape[1] - 1)
    kf = keys.float()[None].expand(B, -1, -1, -1).gather(2, rows[..., None].expand(-1, -1, -1, D))  # [B,Hkv,M,D]
    vf = values.float()[None].expand(B, -1, -1, -1).gather(2, rows[..., None].expand(-1, -1, -1, D))
    qg = q.float().reshape(B, Hkv, G * T, D)
    fmask = (torch.arange(M, device=q.device)[None, None, :] < counts.long()[..., None])[:, :, None, :]
    fmask = fmask.expand(B, Hkv, T, M)
    if window is not None:
        kp = key_pos.long()[None].expand(B, -1, -1).gather(2, rows)
        fmask = _fixed_window(fmask, window, q_pos, kp)
    s_fixed = (qg @ kf.transpose(-1, -2)).reshape(B, Hkv, G, T, M) * scaling
    s_fixed = s_fixed.masked_fill(~fmask[:, :, None], NEG)
    out_f, lse_f = _attend(s_fixed, vf[:, :, None, None])
    out_l, lse_l = _local_part(qg.reshape(B, Hkv, G, T, D), local_k, local_v, lengths, starts, local_valid, window,
                               scaling)
    out, lse = merge_attention_states(out_f, lse_f, out_l, lse_l)
    return out.reshape(B, Hq, T, D).to(q.dtype), lse.reshape(B, Hq, T)


def _local_part(qg: torch.Tensor, local_k: torch.Tensor, local_v: torch.Tensor, lengths: torch.Tensor,
                starts, local_valid, window, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qg: [B, Hkv, G, T, D] float32 over the causal local slots -> (out [B, Hkv, G, T, D], lse)."""
    B, Hkv, G, T, D = qg.shape
    L = local_k.shape[2]
    lmask = _local_mask(B, T, L, lengths, starts, local_valid, window, qg.device)         # [B, T, L]
    s_local = (qg.reshape(B, Hkv, G * T, D) @ local_k.float().transpose(-1, -2)).reshape(B, Hkv, G, T, L) * scaling
    s_local = s_local.masked_fill(~lmask[:, None, None], NEG)
    return _attend(s_local, local_v.float()[:, :, None, None])


def squeezed_decode_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                              scores: torch.Tensor, chunk_lse: torch.Tensor, log_tau: torch.Tensor,
                              local_k: torch.Tensor, local_v: torch.Tensor, lengths: torch.Tensor, scaling: float,
                              starts: torch.Tensor | None = None, local_valid: torch.Tensor | None = None,
                              window: int | None = None, q_pos: torch.Tensor | None = None,
                              key_pos: torch.Tensor | None = None, row_cluster: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode query per sequence: keep clusters by threshold, attend their rows + the observation
    window + the local slots [starts, lengths), all in one softmax.

    q: [B, Hq, D]; keys, values: [Hkv, N, D]; offsets: [Hkv, C + 2]; scores: [B, Hq, C]; chunk_lse:
    [B, Hq, NCH]; log_tau: [Hkv]; row_cluster: [Hkv, N] cluster of each row (derived from offsets if None).
    Returns (out [B, Hq, D], lse [B, Hq] float32, kept [B, Hkv] int32 = fixed rows read).
    """
    B, Hq, D = q.shape
    Hkv, N, _ = keys.shape
    G = Hq // Hkv
    C = scores.shape[-1]
    keep = cluster_keep(scores, chunk_lse, log_tau, G)
    keep = torch.cat([keep, torch.ones_like(keep[..., :1])], -1)                          # + observation window
    if row_cluster is None:
        sizes = (offsets[:, 1:] - offsets[:, :-1]).long()
        row_cluster = torch.repeat_interleave(torch.arange(C + 1, device=q.device).repeat(Hkv),
                                              sizes.flatten()).reshape(Hkv, N)
    rmask = keep.gather(-1, row_cluster.long()[None].expand(B, -1, -1))                   # [B, Hkv, N]
    kept = rmask.sum(-1).to(torch.int32)
    qg = q.float().reshape(B, Hkv, G, D)
    if not q.is_cuda and window is None:
        # read only the kept rows (a host sync: fine off the GPU, and ~10x less work at 90% sparsity)
        idx, counts = _mask_rows(rmask)
        M = idx.shape[-1]
        kf = keys[None].expand(B, -1, -1, -1).gather(2, idx[..., None].expand(-1, -1, -1, D)).float()
        vf = values[None].expand(B, -1, -1, -1).gather(2, idx[..., None].expand(-1, -1, -1, D)).float()
        s_fixed = (qg @ kf.transpose(-1, -2)) * scaling                                   # [B, Hkv, G, M]
        live = (torch.arange(M, device=q.device)[None, None] < counts[..., None])[:, :, None]
        out_f, lse_f = _attend(s_fixed.masked_fill(~live, NEG), vf[:, :, None])
    else:
        fmask = _fixed_window(rmask[:, :, None, :], window, q_pos, key_pos)               # [B, Hkv, 1, N]
        s_fixed = (qg @ keys.float().transpose(-1, -2)[None]) * scaling                     # [B, Hkv, G, N]
        out_f, lse_f = _attend(s_fixed.masked_fill(~fmask, NEG), values.float()[None, :, None])
    out_l, lse_l = _local_part(qg[:, :, :, None], local_k, local_v, lengths, starts, local_valid, window, scaling)
    out, lse = merge_attention_states(out_f, lse_f, out_l[:, :, :, 0], lse_l[:, :, :, 0])
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq), kept


def _mask_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask: [B, H, N] bool -> (rows [B, H, M] int64 ascending, padded with 0; counts [B, H] int64); M = the
    largest count (at least 1)."""
    counts = mask.sum(-1)
    M = max(1, int(counts.max()))
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :M]   # kept rows first, in order
    live = torch.arange(M, device=mask.device) < counts[..., None]
    return torch.where(live, order, torch.zeros_like(order)), counts


def prefill_scores_reference(q: torch.Tensor, centroids: torch.Tensor, lsizes: torch.Tensor,
                             scaling: float) -> torch.Tensor:
    """Sum over a chunk's queries of the estimated per-key attention weight of each cluster.

    q: [B, Hq, T, D]; centroids: [Hkv, C, D]; lsizes: [B or 1, Hkv, C] (-inf: empty or excluded).
    Returns psum [B, Hq, C] float32 = sum_t exp(s_tj - log Z_t) (0 for excluded clusters).
    """
    B, Hq, T, D = q.shape
    Hkv, C, _ = centroids.shape
    G = Hq // Hkv
    s = torch.einsum("bhgtd,hcd->bhgtc", q.float().reshape(B, Hkv, G, T, D), centroids.float()) * scaling
    ls = lsizes.float()[:, :, None, None, :]
    x = s + ls
    log_z = torch.logsumexp(x, -1, keepdim=True)
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    p = torch.exp(s - log_z).masked_fill(~torch.isfinite(ls.expand_as(s)), 0.0)
    return p.sum(3).reshape(B, Hq, C)


def token_select_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     keep: torch.Tensor, row_cluster: torch.Tensor, local_k: torch.Tensor,
                                     local_v: torch.Tensor, lengths: torch.Tensor, scaling: float,
                                     starts: torch.Tensor | None = None, local_valid: torch.Tensor | None = None,
                                     window: int | None = None, q_pos: torch.Tensor | None = None,
                                     key_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill with a key set per query token: token t attends the fixed rows of its kept clusters and the
    causal local slots, one softmax.

    q: [B, Hq, T, D]; keys, values: [Hkv, N, D]; keep: [B, Hkv, T, C + 1] bool (token_select.token_keep);
    row_cluster: [Hkv, N] cluster of each row (C = the observation window); the rest as in
    `indexed_attention_reference`. Returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32).
    """
    B, Hq, T, D = q.shape
    Hkv = keys.shape[0]
    G = Hq // Hkv
    fmask = keep.gather(-1, row_cluster.long()[None, :, None, :].expand(B, -1, T, -1))        # [B, Hkv, T, N]
    fmask = _fixed_window(fmask, window, q_pos, key_pos)
    qg = q.float().reshape(B, Hkv, G, T, D)
    N = keys.shape[1]
    s_fixed = (qg.reshape(B, Hkv, G * T, D) @ keys.float().transpose(-1, -2)[None]) * scaling  # [B, Hkv, G*T, N]
    s_fixed = s_fixed.reshape(B, Hkv, G, T, N).masked_fill(~fmask[:, :, None], NEG)
    lse_f = torch.logsumexp(s_fixed, -1)
    p = torch.exp(s_fixed - torch.where(torch.isfinite(lse_f), lse_f, torch.zeros_like(lse_f))[..., None])
    out_f = (p.reshape(B, Hkv, G * T, N) @ values.float()[None]).reshape(B, Hkv, G, T, D)   # values never expanded
    out_l, lse_l = _local_part(qg, local_k, local_v, lengths, starts, local_valid, window, scaling)
    out, lse = merge_attention_states(out_f, lse_f, out_l, lse_l)
    return out.reshape(B, Hq, T, D).to(q.dtype), lse.reshape(B, Hq, T)


def chunk_rows_reference(psum: torch.Tensor, offsets: torch.Tensor, row_cluster: torch.Tensor, T: int, budget: int,
                         width: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'chunk' prefill selection in torch: lookup.budget_keep on the chunk's estimated weights, the
    observation window appended, then lookup.rows_from_clusters. psum: [B, Hq, C] (prefill_scores);
    offsets: [Hkv, C + 2] int32; row_cluster: [Hkv, N]; T: the chunk's queries; budget: fixed keys to read;
    exact: the crossing cluster gives only the keys that fill the budget (lookup.budget_sizes), so every head
    reads budget + window rows. Returns (idx [B, Hkv, width] int32 ascending, padded with 0; counts [B, Hkv])."""
    Hkv = offsets.shape[0]
    sizes = (offsets[:, 1:-1] - offsets[:, :-2]).long()
    agg = chunk_agg(psum, T, Hkv)
    if exact:
        ks = budget_sizes(agg, sizes, budget)
        window = (offsets[:, -1] - offsets[:, -2]).long()[None, :, None].expand(ks.shape[0], -1, 1)
        return rows_from_clusters(torch.cat([ks, window], -1), offsets, row_cluster, width)
    keep = budget_keep(agg, sizes, budget)
    keep = torch.cat([keep, torch.ones_like(keep[..., :1])], -1)
    return rows_from_clusters(keep, offsets, row_cluster, width)
