"""The buffers of one layer's quantized KV cache, shared by the cache, the reference and the kernel.

Slots are cache positions 0..capacity-1 (the same for every sequence; padding is a slot kind, not removed).

    kcodes  [B, Hkv, cap, Wk] int32   packed pre-RoPE key codes (pack.py layout)
    vcodes  [B, Hkv, cap, Wv] int32   packed value codes
    kout    [B, Hkv, cap, n_out / 2] int32  sparse key outliers, two 16-bit entries a word (pack.pack_outliers)
    vout    [B, Hkv, cap, n_out / 2] int32  sparse value outliers
    vscale  [B, Hkv, cap] fp16, vzero [B, Hkv, cap] fp16   per-(token, head) value scale and zero
    kscale  [B, Hkv, cap] uint8  per-(token, head) key scale codes (quantizers.token_scale_codes); [B, Hkv, 0]
                               when the key quantizer has no token scales
    positions [B, cap] int32   RoPE position of each slot (padding slots get the position they would have
                               if the sequence were contiguous, so positions run slot-by-slot; see cache.py)
    kind    [B, cap] int8      0 = empty or padding, 1 = quantized token, 2 = sink (read from the side buffer)
    side_k, side_v [B, Hkv, n_side, D]  full-precision *post-RoPE* keys / values: entries [0, n_sink) are the
                               sink tokens, entries n_sink + (slot % window) the fp16 window of recent tokens
    side_slot [B, n_side] int32  the slot each side entry holds, -1 when empty
    vsmax   [B, Hkv] float32  the largest value scale stored so far (the kernel normalises p * scale by it)

Attention at a query with `length` filled slots reads the quantized slots j with kind 1 and
start <= j < length - window, plus the side entries whose slot is in [start, length) (window entries only
when their slot >= length - window).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lmsqueeze.methods.kvquant.pack import outlier_words, words_per_row
from lmsqueeze.methods.kvquant.quantizers import KeyQuantizer, ValueQuantizer

KIND_EMPTY, KIND_QUANT, KIND_SINK = 0, 1, 2
GROW_BLOCK = 256  # capacity is a multiple of this (and of every kernel tile)


@dataclass
class PackedKV:
    """One layer's quantized cache buffers and quantizers (see the module docstring for shapes)."""

    kq: KeyQuantizer
    vq: ValueQuantizer
    kcodes: torch.Tensor
    vcodes: torch.Tensor
    kout: torch.Tensor
    vout: torch.Tensor
    vscale: torch.Tensor
    vzero: torch.Tensor
    kscale: torch.Tensor
    positions: torch.Tensor
    kind: torch.Tensor
    side_k: torch.Tensor
    side_v: torch.Tensor
    side_slot: torch.Tensor
    vsmax: torch.Tensor
    n_sink: int
    window: int

    @property
    def bits(self) -> int:
        return self.kq.codebook.bits

    @property
    def head_dim(self) -> int:
        return self.side_k.shape[-1]

    @property
    def capacity(self) -> int:
        return self.kcodes.shape[2]

    @property
    def n_out_words(self) -> int:
        """int32 words of sparse outliers per (token, head) vector (two entries each)."""
        return self.kout.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-token buffers (everything whose size grows with the capacity)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}


def allocate(kq: KeyQuantizer, vq: ValueQuantizer, batch: int, kv_heads: int, head_dim: int, capacity: int,
             n_sink: int, window: int, dtype: torch.dtype, device: torch.device) -> PackedKV:
    """Zeroed buffers for `capacity` slots (rounded up to GROW_BLOCK)."""
    cap = -(-max(capacity, 1) // GROW_BLOCK) * GROW_BLOCK
    bits = kq.codebook.bits
    w = words_per_row(head_dim, bits)
    n_out = outlier_words(kq.n_out)
    n_side = n_sink + window
    i32 = {"dtype": torch.int32, "device": device}
    return PackedKV(
        kq=kq, vq=vq,
        kcodes=torch.zeros(batch, kv_heads, cap, w, **i32),
        vcodes=torch.zeros(batch, kv_heads, cap, w, **i32),
        kout=torch.zeros(batch, kv_heads, cap, n_out, **i32),
        vout=torch.zeros(batch, kv_heads, cap, n_out, **i32),
        vscale=torch.zeros(batch, kv_heads, cap, dtype=torch.float16, device=device),
        vzero=torch.zeros(batch, kv_heads, cap, dtype=torch.float16, device=device),
        kscale=torch.zeros(batch, kv_heads, cap if kq.token_scale else 0, dtype=torch.uint8, device=device),
        positions=torch.zeros(batch, cap, **i32),
        kind=torch.zeros(batch, cap, dtype=torch.int8, device=device),
        side_k=torch.zeros(batch, kv_heads, n_side, head_dim, dtype=dtype, device=device),
        side_v=torch.zeros(batch, kv_heads, n_side, head_dim, dtype=dtype, device=device),
        side_slot=torch.full((batch, n_side), -1, **i32),
        vsmax=torch.zeros(batch, kv_heads, dtype=torch.float32, device=device),
        n_sink=n_sink, window=window,
    )


def grow(kv: PackedKV, capacity: int, filled: int) -> PackedKV:
    """A copy of `kv` with room for `capacity` slots, the first `filled` slots copied over."""
    B, H, _, _ = kv.kcodes.shape
    new = allocate(kv.kq, kv.vq, B, H, kv.head_dim, capacity, kv.n_sink, kv.window, kv.side_k.dtype,
                   kv.kcodes.device)
    for name in ("kcodes", "vcodes", "kout", "vout", "vscale", "vzero", "kscale"):
        getattr(new, name)[:, :, :filled] = getattr(kv, name)[:, :, :filled]
    for name in ("positions", "kind"):
        getattr(new, name)[:, :filled] = getattr(kv, name)[:, :filled]
    for name in ("side_k", "side_v", "side_slot", "vsmax"):
        getattr(new, name).copy_(getattr(kv, name))
    return new


def allocated_bytes(kv: PackedKV) -> int:
    """Every byte this layer's cache holds: per-token buffers, side buffers and the quantizers' tensors."""
    per_layer = [kv.kq.s16, kv.kq.z16, kv.kq.zeff, kv.kq.lower, kv.kq.upper, kv.kq.codebook.levels, kv.vq.codebook.levels]
    return sum(t.numel() * t.element_size() for t in [*kv.tensors().values(), *per_layer])


def bits_per_element(kv: PackedKV) -> float:
    """Allocated bits per cached K or V element (all metadata included) at the allocated capacity."""
    B, H, cap, _ = kv.kcodes.shape
    return 8 * allocated_bytes(kv) / (2 * B * H * cap * kv.head_dim)
