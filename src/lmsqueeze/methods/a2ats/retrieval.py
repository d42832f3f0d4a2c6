"""A²ATS retrieval pieces as free functions (device-agnostic, no host synchronisation, graph-capturable).

Per decode step and layer: the new key gets a code (`assign_codes`), the token that just left the recent
window joins the candidate histogram (`count_leaving`), each query head scores every code once
(`lookup_table`: q·Ĉ, the scores of all tokens are then those of their codes), and `kernels.select_codes`
keeps, per KV group, the codes reaching the kth-largest candidate score of any of its heads, with
k = ratio x the sequence length (`tokens_to_keep`).
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
    """Scores of every code per query head: q: [B, Hq, D], score_cb: [Hkv, C, D] float32 (Ĉ = C_L L⁻¹).

    Returns lut: [B, Hkv, G, C] float32 (a permuted view; the code dim is contiguous). One bmm per KV head
    over all B x G queries, so the codebook is read once per step, not once per sequence.
    """
    B, Hq, D = q.shape
    Hkv, C, _ = score_cb.shape
    G = Hq // Hkv
    x = q.float().reshape(B, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, B * G, D)
    lut = torch.bmm(x, score_cb.transpose(1, 2))  # [Hkv, B*G, C]
    return lut.view(Hkv, B, G, C).permute(1, 0, 2, 3)


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


def recount(codes: torch.Tensor, starts: torch.Tensor, length: int, sinks: int, window: int,
            num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of the candidates' codes (eager, after a prefill or a crop).

    codes: [B, Hkv, S] int; candidates of sequence b: slots [starts[b] + sinks, length - window).
    Returns counts: [B, Hkv, num_codes] int32 and counted: [B] int64 (= every candidate slot below it is in
    the histogram).
    """
    B, Hkv, _ = codes.shape
    hi = max(length - window, 0)
    counts = torch.zeros(B, Hkv, num_codes, dtype=torch.int32, device=codes.device)
    if hi > 0:
        slots = torch.arange(hi, device=codes.device)
        w = (slots[None, :] >= starts.long()[:, None] + sinks).to(torch.int32)  # [B, hi]
        counts.scatter_add_(2, codes[:, :, :hi].long(), w[:, None, :].expand(B, Hkv, hi).contiguous())
    counted = torch.full((B,), hi, dtype=torch.long, device=codes.device)
    return counts, counted


def uncount_rewound(codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor, lengths: torch.Tensor,
                    starts: torch.Tensor, sinks: int, window: int) -> None:
    """Take out of the histogram the slots counted beyond a step at `lengths` (up to MAX_REWIND of them).

    The decode runner rewinds the lengths after its graph warm-up steps; this puts the histogram back to
    the candidates [starts + sinks, lengths − window). Runs before the step writes its new code.
    """
    B, Hkv, S = codes.shape
    hi = (lengths.long() - window).clamp_min(0)
    lo = starts.long() + sinks
    slots = hi[:, None] + torch.arange(MAX_REWIND, device=codes.device)[None, :]  # [B, R]
    out = (slots < counted[:, None]) & (slots >= lo[:, None])
    idx = slots.clamp_max(S - 1)[:, None, :].expand(B, Hkv, MAX_REWIND)
    counts.scatter_add_(2, codes.gather(2, idx).long(), -out.to(torch.int32)[:, None, :].expand(B, Hkv, MAX_REWIND))
    counted.copy_(torch.minimum(counted, hi))


def add_leaving(codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor, lengths: torch.Tensor,
                starts: torch.Tensor, sinks: int, window: int) -> None:
    """Add the slot that just left the window (lengths − 1 − window) to the histogram unless counted."""
    B, Hkv, _ = codes.shape
    hi = (lengths.long() - window).clamp_min(0)
    s_out = hi - 1
    add = (s_out >= counted) & (s_out >= starts.long() + sinks)
    idx = s_out.clamp_min(0)[:, None, None].expand(B, Hkv, 1)
    counts.scatter_add_(2, codes.gather(2, idx).long(), add.to(torch.int32)[:, None, None].expand(B, Hkv, 1))
    counted.copy_(torch.maximum(counted, hi))


def count_leaving(codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor, lengths: torch.Tensor,
                  starts: torch.Tensor, sinks: int, window: int) -> None:
    """Bring the histogram to the candidates of a step at `lengths`: slots [starts + sinks, lengths − window).

    Normally that adds the slot that just left the window. `counted` [B] records how far the histogram
    reaches, so replaying a step does not count a slot twice, and lengths that went back by up to
    MAX_REWIND steps are handled (`uncount_rewound`). codes: [B, Hkv, S]; counts: [B, Hkv, C] int32;
    counted: [B] int64; lengths, starts: [B].
    """
    uncount_rewound(codes, counts, counted, lengths, starts, sinks, window)
    add_leaving(codes, counts, counted, lengths, starts, sinks, window)
