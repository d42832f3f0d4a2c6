"""KVQuantState: one layer's quantized KV cache (a `LayerState`).

Every token is quantized as it is appended (pre-RoPE keys per channel, values per token, sparse outliers);
the first `n_sink` valid tokens of each sequence and, optionally, the last `window` tokens are also kept in
full precision in a small side buffer (layout.py). Attention:

- prefill (T > 1): the chunk attends densely to itself (full precision) and to the dequantized, RoPE-rotated
  past (side-buffer tokens exact), in plain PyTorch;
- decode (T == 1): the token is appended first, then attention reads the packed cache: the fused Triton
  kernel on CUDA (kernels.py), the reference on the CPU (reference.py). With `step.slot` set (static decode
  inside lmsqueeze.generate) nothing synchronises with the host, so the step can be captured in a CUDA graph.

Positions: every slot stores its RoPE position. Padding slots get the position they would have if the
sequence were contiguous (slot + offset), so positions run slot by slot, which the kernel relies on (it reads
one position per tile). A prefill whose valid positions are not `slot + offset` per sequence switches this
layer to the reference path (logged).
"""

from __future__ import annotations

import logging

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.cache import LayerState, Step
from lmsqueeze.methods.kvquant import layout
from lmsqueeze.methods.kvquant.layout import KIND_EMPTY, KIND_QUANT, KIND_SINK, PackedKV
from lmsqueeze.methods.kvquant.quantizers import KeyQuantizer, ValueQuantizer
from lmsqueeze.methods.kvquant.reference import decode_attention_reference, dequantize_slots
from lmsqueeze.methods.kvquant.rope import KernelRope
from lmsqueeze.methods.slot_attention import slot_attention
from lmsqueeze.models.rope import apply_rope, rope_tables

log = logging.getLogger(__name__)


class KVQuantState(LayerState):
    """Packed 2/3/4-bit (or 8-bit, reference only) KV cache of one layer."""

    def __init__(self, kq: KeyQuantizer, vq: ValueQuantizer, n_sink: int, window: int,
                 max_length: int | None = None, kernel: bool = True) -> None:
        super().__init__()
        self._kq, self._vq = kq, vq
        self.n_sink, self.window, self.max_length = n_sink, window, max_length
        self.kernel = kernel and kq.codebook.bits in (2, 3, 4)
        self.kv: PackedKV | None = None
        self.rope: KernelRope | None = None
        self.sink_count: list[int] = []
        self.offsets: list[int | None] = []  # position - slot of each sequence's tokens
        self.contiguous = True

    # buffers ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.capacity

    def _setup(self, k: torch.Tensor, step: Step) -> None:
        B, H, _, D = k.shape
        if D % 64 != 0:
            raise LmsqueezeError(f"kvquant needs a head dim that is a multiple of 64, got {D}")
        if self._kq.lower.shape != (H, D):
            raise LmsqueezeError(f"this kvquant artifact has key ranges for {tuple(self._kq.lower.shape)} "
                                 f"heads x dims, the model has ({H}, {D}); calibrate on this model")
        kq, vq = self._kq.to(k.device), self._vq.to(k.device)
        self.kv = layout.allocate(kq, vq, B, H, D, self.max_length or 0, self.n_sink, self.window, k.dtype,
                                  k.device)
        self.sink_count = [0] * B
        self.offsets = [None] * B
        self.is_initialized = True

    def reserve(self, needed: int) -> None:
        """Grow (outside any graph) so the buffers hold `needed` slots."""
        if needed > self.capacity:
            cap = max(needed, self.max_length or 0, 2 * self.capacity)
            self.kv = layout.grow(self.kv, cap, self.length)

    def memory_bytes(self) -> int:
        return 0 if self.kv is None else layout.allocated_bytes(self.kv)

    def bits_per_element(self) -> float:
        """Allocated bits per cached K/V element, all metadata included."""
        return 0.0 if self.kv is None else layout.bits_per_element(self.kv)

    def bytes_per_element(self) -> float:
        return self.bits_per_element() / 8

    # attention -------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        if self.kv is None:
            self._setup(k, step)
        if self.rope is None:
            self.rope = KernelRope.from_rotary(step.rotary, k.device)
        q = apply_rope(q, step.cos, step.sin)
        if step.slot is not None:
            return self._attend_static(q, k, v, step)
        if q.shape[2] == 1:
            start = self.length
            self._append_chunk(k, v, step)
            lengths = torch.full((q.shape[0],), start + 1, dtype=torch.int32, device=q.device)
            return self._decode(q, lengths, None, step)
        return self._attend_chunk(q, k, v, step)

    def _decode(self, q: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None,
                step: Step) -> torch.Tensor:
        """q: [B, Hq, 1, D] rotated, the new token already appended -> [B, Hq, 1, D]."""
        rope = self.rope
        if q.is_cuda and self.kernel and self.contiguous:
            from lmsqueeze.methods.kvquant.kernels import kvquant_decode_attention

            out = kvquant_decode_attention(q[:, :, 0], self.kv, lengths, step.scaling, rope, starts, step.window)
        else:
            out = decode_attention_reference(q[:, :, 0], self.kv, lengths, step.scaling, rope, starts, step.window)
        return out[:, :, None]

    def _attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Prefill: the chunk in full precision over itself, the dequantized past; then quantize the chunk."""
        start, T = self.length, k.shape[2]
        k_rot = apply_rope(k, step.cos, step.sin)
        past_k, past_v, past_valid = self._past(start, step, k.dtype)
        keys = torch.cat([past_k, k_rot], dim=2)
        vals = torch.cat([past_v, v], dim=2)
        new_valid = step.valid if step.valid is not None else torch.ones(k.shape[0], T, dtype=torch.bool,
                                                                          device=k.device)
        key_valid = torch.cat([past_valid, new_valid], dim=1)
        key_valid = None if bool(key_valid.all()) else key_valid
        out = slot_attention(q, keys, vals, start, key_valid, step.window, step.scaling)
        self._append_chunk(k, v, step, k_rot)
        return out

    def _past(self, end: int, step: Step, dtype: torch.dtype):
        """Slots [0, end): rotated keys, values [B, Hkv, end, D] (side tokens exact) and valid [B, end]."""
        kv = self.kv
        if end == 0:
            B, H, D = kv.kcodes.shape[0], kv.kcodes.shape[1], kv.head_dim
            e = kv.side_k.new_zeros(B, H, 0, D)
            return e, e, torch.zeros(B, 0, dtype=torch.bool, device=e.device)
        k_pre, v = dequantize_slots(kv, end)
        cos, sin = rope_tables(step.rotary, kv.positions[:, :end].long(), torch.float32)
        k = apply_rope(k_pre, cos, sin)
        slot = kv.side_slot.long()
        use = (slot >= 0) & (slot < end)
        if bool(use.any()):  # side entries overwrite their slots: one extra dummy column takes the rest
            idx = torch.where(use, slot, end)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k = torch.cat([k, k[:, :, :1]], 2).scatter(2, idx, kv.side_k.float())[:, :, :end]
            v = torch.cat([v, v[:, :, :1]], 2).scatter(2, idx, kv.side_v.float())[:, :, :end]
        return k.to(dtype), v.to(dtype), kv.kind[:, :end] != KIND_EMPTY

    # appending -------------------------------------------------------------------------------------------
    def _append_chunk(self, k: torch.Tensor, v: torch.Tensor, step: Step, k_rot: torch.Tensor | None = None) -> None:
        """Quantize k, v: [B, Hkv, T, D] (k pre-RoPE) into slots [length, length + T) (eager; may sync)."""
        kv = self.kv
        start, T = self.length, k.shape[2]
        self.reserve(start + T)
        kv = self.kv
        end = start + T
        kc, ko, ks = kv.kq.quantize(k)
        vc, vo, vs, vz = kv.vq.quantize(v)
        kv.kcodes[:, :, start:end] = kc
        kv.kout[:, :, start:end] = ko
        if ks is not None:
            kv.kscale[:, :, start:end] = ks
        kv.vcodes[:, :, start:end] = vc
        kv.vout[:, :, start:end] = vo
        kv.vscale[:, :, start:end] = vs
        kv.vzero[:, :, start:end] = vz
        torch.maximum(kv.vsmax, vs.float().amax(-1), out=kv.vsmax)
        B = k.shape[0]
        valid = step.valid if step.valid is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
        self._write_positions(step.positions, valid, start)
        kind = torch.where(valid, KIND_QUANT, KIND_EMPTY).to(torch.int8)
        kv.kind[:, start:end] = kind
        if k_rot is None:
            k_rot = apply_rope(k, step.cos, step.sin)
        valid_host = valid.tolist()
        sink_of = [[False] * T for _ in range(B)]
        for b in range(B):  # the first n_sink valid tokens of each sequence go to the side buffer too
            for t in range(T):
                if valid_host[b][t] and self.sink_count[b] < self.n_sink:
                    e = self.sink_count[b]
                    kv.side_k[b, :, e] = k_rot[b, :, t]
                    kv.side_v[b, :, e] = v[b, :, t]
                    kv.side_slot[b, e] = start + t
                    kv.kind[b, start + t] = KIND_SINK
                    self.sink_count[b] += 1
                    sink_of[b][t] = True
        if self.window > 0:  # the chunk's last `window` tokens, each to its own ring entry (one indexed copy)
            t = torch.arange(max(0, T - self.window), T, device=k.device)
            e = self.n_sink + (start + t) % self.window
            kv.side_k[:, :, e] = k_rot[:, :, t].to(kv.side_k.dtype)
            kv.side_v[:, :, e] = v[:, :, t].to(kv.side_v.dtype)
            ok = valid[:, t].to(k.device) & ~torch.tensor(sink_of, device=k.device)[:, t]
            kv.side_slot[:, e] = torch.where(ok, start + t, -1).to(torch.int32)
        self.length = end

    def _write_positions(self, positions: torch.Tensor, valid: torch.Tensor, start: int) -> None:
        """Store positions [B, T]; padding gets slot + offset so positions run slot by slot."""
        kv = self.kv
        B, T = positions.shape
        slots = torch.arange(start, start + T, device=positions.device)
        pos = positions.long()
        off = (pos - slots).tolist()
        val = valid.tolist()
        fixed = pos.clone()
        for b in range(B):
            offs = {off[b][t] for t in range(T) if val[b][t]}
            if self.offsets[b] is not None:
                offs.add(self.offsets[b])
            if len(offs) > 1 and self.contiguous:
                self.contiguous = False
                log.info("kvquant: positions are not consecutive per sequence; decoding uses the reference path")
            if offs and self.offsets[b] is None:
                self.offsets[b] = min(offs)
                if start > 0:  # earlier padding-only slots of this sequence: give them consistent positions
                    kv.positions[b, :start] = (torch.arange(start, device=positions.device)
                                               + self.offsets[b]).to(torch.int32)
            if self.offsets[b] is not None:
                fixed[b] = torch.where(valid[b], pos[b], slots + self.offsets[b])
        kv.positions[:, start:start + T] = fixed.to(torch.int32)

    def _attend_static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Static decode: one token per sequence at device slot `step.slot`; no host synchronisation."""
        if min(self.sink_count, default=self.n_sink) < self.n_sink:
            raise LmsqueezeError(f"kvquant keeps the first {self.n_sink} tokens of each sequence in full "
                                 "precision: prefill at least that many tokens before static decoding")
        kv, slot = self.kv, step.slot
        kc, ko, ks = kv.kq.quantize(k)
        vc, vo, vs, vz = kv.vq.quantize(v)
        kv.kcodes.index_copy_(2, slot, kc)
        kv.kout.index_copy_(2, slot, ko)
        if ks is not None:
            kv.kscale.index_copy_(2, slot, ks)
        kv.vcodes.index_copy_(2, slot, vc)
        kv.vout.index_copy_(2, slot, vo)
        kv.vscale.index_copy_(2, slot, vs)
        kv.vzero.index_copy_(2, slot, vz)
        torch.maximum(kv.vsmax, vs[..., 0].float(), out=kv.vsmax)
        kv.positions.index_copy_(1, slot, step.positions.to(torch.int32))
        kv.kind.index_fill_(1, slot, KIND_QUANT)
        if self.window > 0:
            e = self.n_sink + slot % self.window
            kv.side_k.index_copy_(2, e, apply_rope(k, step.cos, step.sin).to(kv.side_k.dtype))
            kv.side_v.index_copy_(2, e, v.to(kv.side_v.dtype))
            kv.side_slot.index_copy_(1, e, slot.to(torch.int32).expand(k.shape[0], 1).contiguous())
        return self._decode(q, step.lengths, step.starts, step)

    # rollback ----------------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        if self.kv is None:
            return
        kv, n = self.kv, self.length
        kv.kind[:, n:] = KIND_EMPTY
        for b in range(kv.side_slot.shape[0]):
            for e in range(self.n_sink):
                if int(kv.side_slot[b, e]) >= n:
                    kv.side_slot[b, e] = -1
                    self.sink_count[b] = min(self.sink_count[b], e)
        if self.window > 0 and n > 0:
            self._refill_window(n)

    def _refill_window(self, n: int) -> None:
        """After a crop: window entries that held dropped slots get the (dequantized) slot now due there."""
        kv, W = self.kv, self.window
        k_pre, v = dequantize_slots(kv, n)
        rope = self.rope
        for e in range(W):
            s = n - 1 - ((n - 1 - e) % W)  # the largest slot < n with s % W == e
            entry = self.n_sink + e
            held = kv.side_slot[:, entry]
            stale = (held >= n) | (held < 0)
            if s < max(0, n - W) or not bool(stale.any()):
                continue
            cos, sin = rope.tables(kv.positions[:, s:s + 1].long())
            kr = apply_rope(k_pre[:, :, s:s + 1], cos, sin)[:, :, 0].to(kv.side_k.dtype)
            ok = stale & (kv.kind[:, s] == KIND_QUANT)
            kv.side_k[:, :, entry] = torch.where(ok[:, None, None], kr, kv.side_k[:, :, entry])
            kv.side_v[:, :, entry] = torch.where(ok[:, None, None], v[:, :, s].to(kv.side_v.dtype),
                                                 kv.side_v[:, :, entry])
            kv.side_slot[:, entry] = torch.where(ok, s, torch.where(stale, -1, held)).to(torch.int32)

    def reset(self) -> None:
        super().reset()
        if self.kv is not None:
            self.kv.kind.zero_()
            self.kv.side_slot.fill_(-1)
            self.kv.vsmax.zero_()
            self.sink_count = [0] * len(self.sink_count)
            self.offsets = [None] * len(self.offsets)
        self.contiguous = True
