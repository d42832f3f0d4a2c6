"""A²ATS retrieval pieces as free functions (device-agnostic, no host synchronisation, graph-capturable).

Per decode step and layer: the new key gets a code (`assign_codes`), the candidate histogram follows the
tokens that cross a band edge (`shift_histogram`: the one leaving the recent window joins band 0, one
token per inner edge moves up a band), each query head scores every (band, code) pair once (`lookup_table`:
the query rotated to each band's distance, dotted with Ĉ; the scores of all tokens are then those of their
virtual codes band x C + code), and `kernels.select_codes` keeps, per KV group, the virtual codes reaching
the kth-largest candidate score of any of its heads, with k = ratio x the sequence length
(`tokens_to_keep`). With no bands (NB = 1) the virtual code is the code.
"""

from __future__ import annotations

import torch

ASSIGN_CHUNK = 2048  # tokens per block when coding a long prefill chunk
MAX_REWIND = 8  # steps the decode lengths may go back without a recount (graph warm-up)


def assign_scores(k: torch.Tensor, assign_cb: torch.Tensor, half_norms: torch.Tensor) -> torch.Tensor:
    """k·a_c − ‖c‖²/2 for every codeword: k: [B, Hkv, T, D] -> [Hkv, B * T, C] float32 (argmax = the code).

    assign_cb: [Hkv, C, D] float32 = C_L Lᵀ (so k·a_c = (kL)·c_c); half_norms: [Hkv, C] = ‖c_c‖²/2 in
    L-space; argmin_c ‖kL − c‖² = argmax_c k·a_c − ‖c‖²/2.
    """
    B, Hkv, T, D = k.shape
    x = k.permute(1, 0, 2, 3).reshape(Hkv, B * T, D).float()
    return torch.baddbmm(half_norms[:, None, :], x, assign_cb.transpose(1, 2), beta=-1.0)


def assign_codes(k: torch.Tensor, assign_cb: torch.Tensor, half_norms: torch.Tensor) -> torch.Tensor:
    """Nearest codeword in query-weighted distance. k: [B, Hkv, T, D] -> codes [B, Hkv, T] int16."""
    B, Hkv, T, _ = k.shape
    if B * T <= ASSIGN_CHUNK:
        codes = assign_scores(k, assign_cb, half_norms).argmax(-1)
    else:
        flat = k.permute(0, 2, 1, 3).reshape(1, B * T, Hkv, -1).permute(0, 2, 1, 3)  # [1, Hkv, B*T, D]
        codes = torch.cat([assign_scores(flat[:, :, a:a + ASSIGN_CHUNK], assign_cb, half_norms).argmax(-1)
                           for a in range(0, B * T, ASSIGN_CHUNK)], dim=1)
    return codes.reshape(Hkv, B, T).permute(1, 0, 2).to(torch.int16)


def lookup_table(q: torch.Tensor, score_cb: torch.Tensor) -> torch.Tensor:
    """Scores of every (band, code) per query head: q: [B, Hq, D] or [B, Hq, NB, D] (one query per band);
    score_cb: [Hkv, C, D] (Ĉ = C_L L⁻¹), float32 or the model's half dtype: the table is computed and
    returned in score_cb's dtype (bf16 on a bf16 model: tensor cores, half the bytes; the retrieval
    scores are approximate anyway).

    Returns lut: [B, Hkv, G, NB * C] (a permuted view; the virtual-code dim band x C + code is
    contiguous). One bmm per KV head over all B x G x NB queries, so the codebook is read once per step,
    not once per sequence or band.
    """
    if q.dim() == 3:
        q = q[:, :, None]
    B, Hq, NB, D = q.shape
    Hkv, C, _ = score_cb.shape
    G = Hq // Hkv
    x = q.to(score_cb.dtype).reshape(B, Hkv, G * NB, D).permute(1, 0, 2, 3).reshape(Hkv, B * G * NB, D)
    lut = torch.bmm(x, score_cb.transpose(1, 2))  # [Hkv, B*G*NB, C]
    return lut.view(Hkv, B, G, NB * C).permute(1, 0, 2, 3)


def tokens_to_keep(ratio: float, lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """k per sequence: floor(ratio x tokens in the sequence). lengths, starts: [B] -> [B] int32."""
    return ((lengths - starts).double() * ratio).floor().to(torch.int32)


def fold_rotation(score_cb: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor) -> torch.Tensor:
    """Score codebook that takes the *pre-RoPE* query: RoPE(q, b) · ĉ = q · RoPE(ĉ, −b).

    score_cb: [Hkv, C, D]; cos_b, sin_b: [1, 1, D] at the windowed-RoPE distance -> [Hkv, C, D] float32.
    Saves rotating the query every step.
    """
    from lmsqueeze.models.rope import apply_rope

    _Hkv, C, D = score_cb.shape
    cos = cos_b.float().expand(1, C, D)
    sin = sin_b.float().expand(1, C, D)
    return apply_rope(score_cb.float()[None], cos, -sin)[0].contiguous()


def virtual_codes(codes: torch.Tensor, dist: torch.Tensor, bands: tuple[int, ...], num_codes: int) -> torch.Tensor:
    """band(dist) x num_codes + code, int64. codes and dist broadcast together."""
    from lmsqueeze.methods.a2ats.windowed_rope import band_of

    return band_of(dist, bands) * num_codes + codes.long()


def recount(codes: torch.Tensor, starts: torch.Tensor, length: int, sinks: int, window: int,
            num_codes: int, bands: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of the candidates' virtual codes for a query at `length` (eager, after a prefill or a crop).

    codes: [B, Hkv, S] int; candidates of sequence b: slots [starts[b] + sinks, length - window), slot j in
    band(length - 1 - j). Returns counts: [B, Hkv, NB * num_codes] int32 and counted: [B] int64 (= the
    length the histogram reflects).
    """
    B, Hkv, _ = codes.shape
    NB = len(bands) + 1
    hi = max(length - window, 0)
    counts = torch.zeros(B, Hkv, NB * num_codes, dtype=torch.int32, device=codes.device)
    if hi > 0:
        slots = torch.arange(hi, device=codes.device)
        w = (slots[None, :] >= starts.long()[:, None] + sinks).to(torch.int32)  # [B, hi]
        v = virtual_codes(codes[:, :, :hi], (length - 1 - slots)[None, None], bands, num_codes)
        counts.scatter_add_(2, v, w[:, None, :].expand(B, Hkv, hi).contiguous())
    counted = torch.full((B,), length, dtype=torch.long, device=codes.device)
    return counts, counted


def _move(codes: torch.Tensor, counts: torch.Tensor, j: torch.Tensor, ok: torch.Tensor, src: int | None,
          dst: int | None, num_codes: int) -> None:
    """Move the tokens at slots j: [B, R] (where ok) from band src to band dst (None: out of / into nothing)."""
    B, Hkv, S = codes.shape
    R = j.shape[1]
    c = codes.gather(2, j.clamp(0, S - 1)[:, None, :].expand(B, Hkv, R)).long()
    w = ok.to(torch.int32)[:, None, :].expand(B, Hkv, R)
    if src is not None:
        counts.scatter_add_(2, src * num_codes + c, -w)
    if dst is not None:
        counts.scatter_add_(2, dst * num_codes + c, w)


def uncount_rewound(codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor, lengths: torch.Tensor,
                    starts: torch.Tensor, sinks: int, edges: tuple[int, ...]) -> None:
    """Undo the steps counted beyond `lengths` (up to MAX_REWIND of them): going back from a query at L' to
    L' - 1, the token at distance e_i moves from band i down to band i - 1 (band 0: leaves the candidates).

    The decode runner rewinds the lengths after its graph warm-up steps. Runs before the step writes its
    new code. edges: (window, e1, ...) the lower edge of every band.
    """
    num_codes = counts.shape[2] // len(edges)
    L = lengths.long()[:, None]
    lp = L + 1 + torch.arange(MAX_REWIND, device=codes.device)[None, :]  # [B, R] the query lengths undone
    active = lp <= counted[:, None]
    lo = starts.long()[:, None] + sinks
    for i, e in enumerate(edges):
        j = lp - 1 - e
        _move(codes, counts, j, active & (j >= lo), i, i - 1 if i else None, num_codes)
    counted.copy_(torch.minimum(counted, lengths.long()))


def add_crossing(codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor, lengths: torch.Tensor,
                 starts: torch.Tensor, sinks: int, edges: tuple[int, ...]) -> None:
    """One step forward (histogram at L - 1, query at L): the token at distance e_i moves from band i - 1 up
    to band i; for i = 0 that is the slot leaving the recent window joining the candidates. Once."""
    num_codes = counts.shape[2] // len(edges)
    L = lengths.long()[:, None]
    active = counted[:, None] < L
    lo = starts.long()[:, None] + sinks
    for i, e in enumerate(edges):
        j = L - 1 - e
        _move(codes, counts, j, active & (j >= lo), i - 1 if i else None, i, num_codes)
    counted.copy_(torch.maximum(counted, lengths.long()))


def shift_histogram(codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor, lengths: torch.Tensor,
                    starts: torch.Tensor, sinks: int, edges: tuple[int, ...]) -> None:
    """Bring the histogram to the candidates of a step at `lengths` (query slot lengths - 1).

    Normally one step forward (`add_crossing`). `counted` [B] records the length the histogram reflects,
    so replaying a step does not count twice, and lengths that went back by up to MAX_REWIND steps are
    handled (`uncount_rewound`). codes: [B, Hkv, S]; counts: [B, Hkv, NB * C] int32; counted: [B] int64;
    lengths, starts: [B]; edges: `windowed_rope.band_edges(window, bands)`.
    """
    uncount_rewound(codes, counts, counted, lengths, starts, sinks, edges)
    add_crossing(codes, counts, counted, lengths, starts, sinks, edges)
