"""Windowed RoPE (A²ATS): far keys are scored pre-RoPE against the query rotated to a fixed distance.

For a query at position m and a cached key at position j, RoPE makes the logit depend on m - j only:
RoPE(q, m) · RoPE(k, j) = q R(m - j) kᵀ. Windowed RoPE keeps that exact form for the sink tokens and the
recent window (m - j < window), and replaces the relative position of every older key by the constant
`distance`: u = q R(distance) kᵀ = RoPE(q, distance) · k_pre. The key side no longer depends on its
position, so one codebook per layer and KV head can quantize the pre-RoPE keys of every position, and all
positional information sits in the query, rotated once per step.

Windowed scores are used for retrieval only; attention over the selected tokens uses normal RoPE.

Distance bands (our extension; `bands=()` is the paper's single distance): far keys are split by their
distance m - j into bands [window, e1), [e1, e2), ..., [e_last, inf), and each band scores with the query
rotated to that band's own distance (`band_distances`). The key side stays position-free (one codebook);
a token's retrieval score is that of the pair (band, code), a "virtual code" band x C + code, so the lookup
table and the histogram grow by the number of bands while the per-token state stays one int16 code. On
the zoo model one distance loses a third of the attention mass that exact scores recover (diag in
benchmarks/results/a2ats_recall.json).
"""

from __future__ import annotations

import torch

from lmsqueeze.models.rope import apply_rope, rope_tables


def distance_tables(rotary, distance: int, dtype: torch.dtype, device: torch.device | str,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [1, 1, D] of the model's rotary embedding at position `distance` (its scaling included)."""
    pos = torch.full((1, 1), int(distance), dtype=torch.long, device=device)
    cos, sin = rope_tables(rotary, pos, torch.float32)
    return cos.to(dtype), sin.to(dtype)


def band_edges(window: int, bands: tuple[int, ...]) -> tuple[int, ...]:
    """Lower distance edge of every band: (window, e1, e2, ...). One band (window,) = the paper's WRoPE."""
    return (int(window), *(int(e) for e in bands))


def band_distances(window: int, bands: tuple[int, ...], distance: int) -> tuple[int, ...]:
    """The relative position each band scores at: `distance` with no bands, else the geometric middle of
    each band [lo, hi) and sqrt(2) x lo for the last, open band."""
    if not bands:
        return (int(distance),)
    edges = band_edges(window, bands)
    mids = [round((lo * hi) ** 0.5) for lo, hi in zip(edges[:-1], edges[1:])]
    return (*mids, round(edges[-1] * 2 ** 0.5))


def band_of(dist: torch.Tensor, bands: tuple[int, ...]) -> torch.Tensor:
    """Band index (int64) of distances m - j (>= window for candidates): number of inner edges <= dist."""
    out = torch.zeros_like(dist, dtype=torch.long)
    for e in bands:
        out += (dist >= e).long()
    return out


def multi_distance_tables(rotary, distances: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [NB, D] of the model's rotary embedding at each band distance."""
    pos = torch.tensor([list(distances)], dtype=torch.long, device=device)
    cos, sin = rope_tables(rotary, pos, torch.float32)
    return cos[0].to(dtype), sin[0].to(dtype)


def band_queries(q_pre: torch.Tensor, cos_nb: torch.Tensor, sin_nb: torch.Tensor) -> torch.Tensor:
    """q_pre: [B, Hq, D] -> [B, Hq, NB, D]: the query rotated to every band distance (cos/sin: [NB, D])."""
    B, Hq, D = q_pre.shape
    x = q_pre.float()[:, :, None, :].expand(B, Hq, cos_nb.shape[0], D)
    return apply_rope(x, cos_nb.float()[None], sin_nb.float()[None])


def wrope_query(q_pre: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor) -> torch.Tensor:
    """q_pre: [B, Hq, T, D] pre-RoPE queries -> RoPE(q, distance): [B, Hq, T, D]. cos_b, sin_b: [1, 1, D]."""
    B, _, T, D = q_pre.shape
    return apply_rope(q_pre, cos_b.expand(B, T, D), sin_b.expand(B, T, D))


def near_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, starts: torch.Tensor, sinks: int,
              window: int) -> torch.Tensor:
    """Bool [B, T, S]: key slot j is "near" query slot i (scored with exact RoPE, always attended).

    near = a sink (starts <= j < starts + sinks) or in the recent window (i - j < window).
    q_slots: [T], k_slots: [S] int; starts: [B] first non-padding slot of each sequence.
    """
    i = q_slots[None, :, None]
    j = k_slots[None, None, :]
    st = starts.long()[:, None, None]
    sink = (j >= st) & (j < st + sinks)
    return sink | (i - j < window)


def windowed_scores(q_pre: torch.Tensor, k_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cos_b: torch.Tensor, sin_b: torch.Tensor, q_start: int, starts: torch.Tensor,
                    sinks: int, window: int) -> torch.Tensor:
    """Windowed-RoPE logits (no softmax scale, no causal mask) of T queries over S cached keys.

    q_pre: [B, Hq, T, D], k_pre: [B, Hkv, S, D] pre-RoPE; cos, sin: [B, S, D] rotary tables of the key
    slots (queries sit at slots q_start..q_start+T-1, their tables are the last T rows); cos_b, sin_b:
    [1, 1, D] at `distance`. Returns [B, Hq, T, S]: exact RoPE logits for near keys (`near_mask`), the
    query rotated to `distance` against the pre-RoPE key for every other key.
    """
    _B, Hq, T, _D = q_pre.shape
    S, G = k_pre.shape[2], Hq // k_pre.shape[1]
    k_rot = apply_rope(k_pre, cos, sin).repeat_interleave(G, dim=1)
    k_raw = k_pre.repeat_interleave(G, dim=1)
    q_rot = apply_rope(q_pre, cos[:, q_start:q_start + T], sin[:, q_start:q_start + T])
    exact = torch.einsum("bhtd,bhsd->bhts", q_rot.float(), k_rot.float())
    far = torch.einsum("bhtd,bhsd->bhts", wrope_query(q_pre, cos_b, sin_b).float(), k_raw.float())
    q_slots = torch.arange(q_start, q_start + T, device=q_pre.device)
    near = near_mask(q_slots, torch.arange(S, device=q_pre.device), starts, sinks, window)
    return torch.where(near[:, None], exact, far)
