"""Plain-PyTorch references of A²ATS's retrieval kernels (float32 math; any device).

They define what the Triton kernels (`_triton_a2ats.py`) compute; `kernels.py` dispatches here for CPU
tensors. Slot conventions (one decode query per sequence, left padding only):

- sequence b holds slots [starts[b], lengths[b]) (lengths counts the new token);
- sinks: slots [starts, starts + sinks); window: slots [lengths - window, lengths); both always attended;
- candidates: slots [starts + sinks, lengths - window), attended iff their virtual code is selected
  (`sel`): band(lengths - 1 - slot) x C + code, with the distance bands of `windowed_rope` (no bands: the
  code itself).
"""

from __future__ import annotations

import torch


def select_codes_reference(lut: torch.Tensor, counts: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """Codes whose score reaches the kth-largest candidate score of any head of the KV group.

    lut: [B, Hkv, G, C] float scores of each code per query head (any strides); counts: [B, Hkv, C] int
    candidate tokens per code; kth: [B] int tokens to keep per head (clipped to the candidates; <= 0 keeps
    none). Returns sel: [B, Hkv, C] bool = OR over the G heads of (lut >= t_head), where t_head is the value
    of the kth-largest candidate score (ties at t are all kept, so a head keeps >= kth tokens).
    """
    B, Hkv, G, C = lut.shape
    vals = lut.float()
    cnt = counts.long()[:, :, None, :].expand(B, Hkv, G, C)
    total = counts.long().sum(-1)  # [B, Hkv]
    k = torch.minimum(kth.long()[:, None], total)[:, :, None]  # [B, Hkv, 1]
    sorted_vals, order = vals.sort(dim=-1, descending=True)
    cum = cnt.gather(-1, order).cumsum(-1)
    idx = (cum < k[..., None]).sum(-1, keepdim=True).clamp_max(C - 1)  # first position with cum >= k
    t = sorted_vals.gather(-1, idx)  # [B, Hkv, G, 1]
    take = (vals >= t) & (k[..., None] > 0)
    return take.any(dim=2)


def code_append_reference(scores: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor,
                          slot: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, sinks: int,
                          window: int, bands: tuple[int, ...] = ()) -> None:
    """Histogram rewind (`retrieval.uncount_rewound`), the new token's code = argmax of scores: [Hkv, B, C]
    written at `slot`, then one step of band crossings counted (`retrieval.add_crossing`)."""
    from lmsqueeze.methods.a2ats.retrieval import add_crossing, uncount_rewound
    from lmsqueeze.methods.a2ats.windowed_rope import band_edges

    edges = band_edges(window, bands)
    uncount_rewound(codes, counts, counted, lengths, starts, sinks, edges)
    new = scores.argmax(-1).transpose(0, 1).to(torch.int16)[:, :, None]  # [B, Hkv, 1]
    codes.index_copy_(2, slot, new)
    add_crossing(codes, counts, counted, lengths, starts, sinks, edges)


def selected_slots(codes: torch.Tensor, sel: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                   sinks: int, window: int, near: bool = True, bands: tuple[int, ...] = ()) -> torch.Tensor:
    """Bool [B, Hkv, S]: the slots a decode step attends to.

    codes: [B, Hkv, S] int; sel: [B, Hkv, NB * C] bool/int (NB = len(bands) + 1); starts, lengths: [B] int.
    near=True: sinks, window and selected candidates; near=False: selected candidates only.
    """
    from lmsqueeze.methods.a2ats.retrieval import virtual_codes

    _B, _Hkv, S = codes.shape
    slots = torch.arange(S, device=codes.device)[None, None, :]
    st = starts.long()[:, None, None]
    ln = lengths.long()[:, None, None]
    C = sel.shape[2] // (len(bands) + 1)
    vc = virtual_codes(codes.long().clamp_min(0), (ln - 1 - slots).clamp_min(0), bands, C)
    picked = sel.bool().gather(2, vc)
    cand = (slots >= st + sinks) & (slots < ln - window)
    mask = cand & picked
    if near:
        mask = mask | ((slots >= st) & (slots < ln) & ((slots < st + sinks) | (slots >= ln - window)))
    return mask


def masked_decode_attention(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, mask: torch.Tensor,
                            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q: [B, Hq, D] (RoPE applied) over the slots where mask: [B, Hkv, S] is True.

    k_store, v_store: [B, Hkv, S, D]. Returns out: [B, Hq, D] in q's dtype (0 where nothing is attended) and
    lse: [B, Hq] float32 natural-log (-inf where nothing is attended).
    """
    B, Hq, D = q.shape
    Hkv = k_store.shape[1]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qf, k_store.to(q.device).float()) * scaling
    s = s.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[..., None])
    out = torch.einsum("bhgs,bhsd->bhgd", p, v_store.to(q.device).float())
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def sparse_decode_attention_reference(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor,
                                      codes: torch.Tensor, sel: torch.Tensor, starts: torch.Tensor,
                                      lengths: torch.Tensor, sinks: int, window: int, scaling: float,
                                      near: bool = True, return_lse: bool = False, bands: tuple[int, ...] = ()):
    """Decode attention over the slots picked by `selected_slots` (see that function for the arguments).

    q: [B, Hq, D] (RoPE applied); k_store, v_store: [B, Hkv, S, D]. Returns out: [B, Hq, D] (and lse: [B, Hq]).
    """
    mask = selected_slots(codes, sel, starts, lengths, sinks, window, near, bands)
    out, lse = masked_decode_attention(q, k_store, v_store, mask.to(q.device), scaling)
    return (out, lse) if return_lse else out
