"""Plain-PyTorch decode attention over a packed KVQuant cache: dequantise every slot, rotate, attend.

The same function as the Triton kernel (`kernels.py`), computed in float32 with dense intermediates; the
kernel tests compare against it, and CPU decoding uses it.
"""

from __future__ import annotations

import torch

from lmsqueeze.methods.kvquant.layout import KIND_QUANT, PackedKV
from lmsqueeze.methods.kvquant.quantizers import dequantize_keys, dequantize_values
from lmsqueeze.methods.kvquant.rope import KernelRope
from lmsqueeze.models.rope import apply_rope


def dequantize_slots(kv: PackedKV, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [0, end) -> (pre-RoPE keys, values): [B, Hkv, end, D] float32, outliers included."""
    D = kv.head_dim
    ks = kv.kscale[:, :, :end] if kv.kscale.shape[-1] else None
    k = dequantize_keys(kv.kq, kv.kcodes[:, :, :end], kv.kout[:, :, :end], D, ks)
    v = dequantize_values(kv.vq, kv.vcodes[:, :, :end], kv.vout[:, :, :end], kv.vscale[:, :, :end],
                          kv.vzero[:, :, :end], D)
    return k, v


def visible(kv: PackedKV, lengths: torch.Tensor, starts: torch.Tensor | None, window: int | None,
            end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which quantized slots [B, end] and side entries [B, n_side] a query after `lengths` slots reads."""
    B = lengths.shape[0]
    L = lengths.long()[:, None]
    lo = torch.zeros_like(L) if starts is None else starts.long()[:, None]
    if window is not None:
        lo = torch.maximum(lo, L - window)
    j = torch.arange(end, device=lengths.device)[None]
    quant = (kv.kind[:, :end] == KIND_QUANT) & (j >= lo) & (j < L - kv.window)
    slot = kv.side_slot.long()
    e = torch.arange(slot.shape[1], device=lengths.device)[None].expand(B, -1)
    side = (slot >= 0) & (slot >= lo) & (slot < L) & ((e < kv.n_sink) | (slot >= L - kv.window))
    return quant, side


def decode_attention_reference(q: torch.Tensor, kv: PackedKV, lengths: torch.Tensor, scaling: float,
                               rope: KernelRope, starts: torch.Tensor | None = None,
                               window: int | None = None, return_lse: bool = False):
    """q: [B, Hq, D] (RoPE applied) -> out: [B, Hq, D] in q's dtype (and lse: [B, Hq] natural log).

    lengths: [B] filled slots; starts: [B] first non-padding slot or None; window: the model's sliding window.
    """
    B, Hq, D = q.shape
    Hkv = kv.kcodes.shape[1]
    G = Hq // Hkv
    end = int(lengths.max())
    k_pre, v = dequantize_slots(kv, end)
    cos, sin = rope.tables(kv.positions[:, :end])
    k = apply_rope(k_pre, cos, sin)
    quant, side = visible(kv, lengths, starts, window, end)
    keys = torch.cat([k, kv.side_k.float()], dim=2)                 # [B, Hkv, S, D]
    vals = torch.cat([v, kv.side_v.float()], dim=2)
    mask = torch.cat([quant, side], dim=1)                           # [B, S]
    qg = q.float().reshape(B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys) * scaling
    scores = scores.masked_fill(~mask[:, None, None, :], -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)                            # [B, Hkv, G]
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhgs,bhsd->bhgd", p, vals).reshape(B, Hq, D).to(q.dtype)
    if return_lse:
        return out, lse.reshape(B, Hq)
    return out
