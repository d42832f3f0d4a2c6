"""A2ATSState: one layer's cache for A²ATS (a `LayerState`).

Buffers (allocated once for max_length slots; grown only outside captured graphs):
  k, v     [B, Hkv, cap, D]  RoPE'd keys and values: on the GPU, or pinned host memory once offloaded
  codes    [B, Hkv, cap]     int16 code of every token's key (pre-RoPE key with windowed RoPE), GPU
  counts   [B, Hkv, NB * C]  int32 histogram of the candidates' virtual codes (distance band x C + code;
                             tokens past the sinks and the window)
  near_k/v [B, Hkv, sinks + window + 8, D] and near_slots: the sinks and a ring holding the recent window,
           on the GPU (offloaded layers only)

Prefill (T > 1) is exact dense attention. A decode step (T == 1) writes the new token, codes it, scores all
(distance band, code) pairs once per query head (lookup table), keeps the virtual codes reaching the
kth-largest candidate score of any head of the KV group (k = ratio x length), and attends exactly (normal
RoPE) over sinks, window and the tokens whose (band, code) is kept. With offload, the first decode step moves K/V to pinned host memory.
Layers with a model sliding window are served densely (nothing to retrieve beyond the window).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.merge import merge_attention_states
from lmsqueeze.kernels.rope_append import rope_append
from lmsqueeze.methods.a2ats import retrieval
from lmsqueeze.methods.a2ats.kernels import (
    assign_append,
    band_edge_tensor,
    band_lookup_table,
    select_codes,
    sparse_decode_attention,
)
from lmsqueeze.methods.a2ats.offload import (
    host_empty,
    near_attention,
    near_entries,
    ring_size,
    selected_attention_cpu,
    to_host,
)
from lmsqueeze.methods.a2ats.windowed_rope import band_distances, multi_distance_tables
from lmsqueeze.methods.cache import LayerState, Step
from lmsqueeze.methods.dense import DenseState
from lmsqueeze.methods.slot_attention import slot_attention
from lmsqueeze.models.rope import apply_rope

log = logging.getLogger(__name__)

GROW_BLOCK = 256


@dataclass(slots=True)
class Codebooks:
    """One layer's codebooks. assign: [Hkv, C, D] = C_L Lᵀ; score: [Hkv, C, D] = C_L L⁻¹ (scored against the
    query rotated to each band's distance); half_norms: [Hkv, C]."""

    assign: torch.Tensor
    score: torch.Tensor
    half_norms: torch.Tensor

    def to(self, device) -> Codebooks:
        return Codebooks(*(t.to(device, torch.float32).contiguous() for t in (self.assign, self.score,
                                                                               self.half_norms)))

    @property
    def size(self) -> int:
        return self.assign.shape[1]


@dataclass(slots=True)
class Settings:
    """What a layer state needs of the method config."""

    ratio: float
    sinks: int
    window: int
    distance: int
    windowed_rope: bool
    offload: bool
    offload_attention: str
    bands: tuple[int, ...] = ()


class A2ATSState(LayerState):
    """Retrieval-sparse decode attention over a (possibly host-offloaded) full KV cache."""

    def __init__(self, settings: Settings, books: Codebooks, max_length: int | None = None) -> None:
        super().__init__()
        self.cfg = settings
        self.books = books
        self.max_length = max_length
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.codes: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.counted: torch.Tensor | None = None
        self.sel: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.near_k: torch.Tensor | None = None
        self.near_v: torch.Tensor | None = None
        self.near_slots: torch.Tensor | None = None
        self.codes_host: torch.Tensor | None = None
        self.ratio: torch.Tensor | None = None  # [1] float64
        self.offloaded = False
        self.dense: DenseState | None = None  # layers with a model sliding window
        self.device: torch.device | None = None
        self.edges: torch.Tensor | None = None  # int32 [NB] lower band edges
        self.band_cos: torch.Tensor | None = None  # [NB, D] rotary tables at the band distances
        self.band_sin: torch.Tensor | None = None
        self.score_lut: torch.Tensor | None = None  # books.score in the model's dtype (lookup table)

    # buffers -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def _setup(self, k: torch.Tensor, step: Step) -> None:
        B, Hkv, _, D = k.shape
        if self.books.assign.shape[0] != Hkv or self.books.assign.shape[2] != D:
            raise LmsqueezeError(f"this a2ats artifact has codebooks for {self.books.assign.shape[0]} KV heads of "
                                 f"dim {self.books.assign.shape[2]}, the model has {Hkv} of dim {D}; calibrate "
                                 "on this model")
        self.device = k.device
        books = self.books.to(k.device)
        C = self.books.size * (len(self.cfg.bands) + 1)  # virtual codes
        self.codes = torch.zeros(B, Hkv, 0, dtype=torch.int16, device=k.device)
        self.k = k.new_zeros(B, Hkv, 0, D)
        self.v = k.new_zeros(B, Hkv, 0, D)
        self.valid = torch.ones(B, 0, dtype=torch.bool, device=k.device)
        self.counts = torch.zeros(B, Hkv, C, dtype=torch.int32, device=k.device)
        self.counted = torch.zeros(B, dtype=torch.long, device=k.device)
        self.sel = torch.zeros(B, Hkv, C, dtype=torch.int8, device=k.device)
        self.starts = torch.zeros(B, dtype=torch.int32, device=k.device)
        self.ratio = torch.tensor([self.cfg.ratio], dtype=torch.float64, device=k.device)
        self.edges = band_edge_tensor(self.cfg.window, self.cfg.bands, k.device)
        if self.cfg.windowed_rope:  # the pre-RoPE query rotated to each band's distance scores ĉ
            dist = band_distances(self.cfg.window, self.cfg.bands, self.cfg.distance)
            self.band_cos, self.band_sin = multi_distance_tables(step.rotary, dist, torch.float32, k.device)
        self.books = books
        self.score_lut = books.score.to(k.dtype).contiguous()  # the lookup table runs in the model's dtype
        self.is_initialized = True

    def reserve(self, needed: int) -> None:
        """Grow (outside any graph) so the buffers hold `needed` slots."""
        if needed <= self.capacity:
            return
        cap = max(needed, self.max_length or 0, 2 * self.capacity)
        cap = -(-cap // GROW_BLOCK) * GROW_BLOCK
        n = self.length
        B, Hkv, _, D = self.k.shape
        if self.offloaded:
            new_k, new_v = host_empty((B, Hkv, cap, D), self.k.dtype), host_empty((B, Hkv, cap, D), self.v.dtype)
        else:
            new_k, new_v = self.k.new_zeros(B, Hkv, cap, D), self.v.new_zeros(B, Hkv, cap, D)
        new_k[:, :, :n] = self.k[:, :, :n]
        new_v[:, :, :n] = self.v[:, :, :n]
        codes = torch.zeros(B, Hkv, cap, dtype=torch.int16, device=self.device)
        codes[:, :, :n] = self.codes[:, :, :n]
        valid = torch.ones(B, cap, dtype=torch.bool, device=self.device)
        valid[:, :n] = self.valid[:, :n]
        self.k, self.v, self.codes, self.valid = new_k, new_v, codes, valid
        if self.codes_host is not None:
            self.codes_host = codes.cpu()

    def device_bytes(self) -> int:
        """Bytes this layer holds on its compute device (GPU): codes, histogram, near buffers, and K/V unless
        offloaded; codebooks excluded (shared per layer, see `codebook_bytes`)."""
        total = 0
        for t in (self.codes, self.counts, self.counted, self.sel, self.valid, self.starts, self.near_k,
                  self.near_v, self.near_slots):
            if t is not None:
                total += t.numel() * t.element_size()
        if not self.offloaded:
            for t in (self.k, self.v):
                if t is not None:
                    total += t.numel() * t.element_size()
        if self.dense is not None:
            total += self.dense.memory_bytes()
        return total

    def host_bytes(self) -> int:
        """Bytes of the offloaded K/V (and the host code mirror) in host memory."""
        if not self.offloaded:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.codes_host) if t is not None)

    def codebook_bytes(self) -> int:
        books = (self.books.assign, self.books.score, self.books.half_norms)
        extra = (self.score_lut,) if self.score_lut is not None and self.score_lut.dtype != self.books.score.dtype else ()
        return sum(t.numel() * t.element_size() for t in (*books, *extra))

    def memory_bytes(self) -> int:
        return self.device_bytes() + self.host_bytes()

    # attention -----------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        if step.window is not None:
            return self._attend_dense(q, k, v, step)
        if self.k is None:
            self._setup(k, step)
        if q.shape[2] > 1:
            return self._prefill(q, k, v, step)
        return self._decode(q, k, v, step)

    def _attend_dense(self, q, k, v, step: Step) -> torch.Tensor:
        if self.dense is None:
            self.dense = DenseState(self.max_length)
        self.dense.length = self.length
        out = self.dense.attend(q, k, v, step)
        self.length = self.dense.length
        self.is_initialized = True
        return out

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Exact dense attention of a chunk over the past and itself; store, code and count the chunk."""
        cfg = self.cfg
        start, T = self.length, k.shape[2]
        end = start + T
        self.reserve(end)
        q_rot = apply_rope(q, step.cos, step.sin)
        k_rot = apply_rope(k, step.cos, step.sin)
        self.k[:, :, start:end] = k_rot.to(self.k.device)
        self.v[:, :, start:end] = v.to(self.v.device)
        codes = retrieval.assign_codes(k if cfg.windowed_rope else k_rot, self.books.assign, self.books.half_norms)
        self.codes[:, :, start:end] = codes
        if self.codes_host is not None:
            self.codes_host[:, :, start:end] = codes.cpu()
        self.valid[:, start:end] = True if step.valid is None else step.valid
        self.length = end
        self._update_starts()
        self._recount()
        keys, vals = self.k[:, :, :end], self.v[:, :, :end]
        if self.offloaded:
            keys, vals = keys.to(q.device), vals.to(q.device)
            self._rebuild_near()
        valid = self.valid[:, :end]
        valid = None if bool(valid.all()) else valid
        return slot_attention(q_rot, keys, vals, start, valid, None, step.scaling)

    def _update_starts(self) -> None:
        """starts = first non-padding slot per sequence; padding must be a prefix (left padding)."""
        valid = self.valid[:, :self.length]
        starts = (~valid).long().cumprod(dim=1).sum(dim=1)
        expected = torch.arange(self.length, device=valid.device)[None] >= starts[:, None]
        if not torch.equal(expected, valid):
            raise LmsqueezeError("a2ats supports left padding only (padding before the tokens of each sequence)")
        self.starts.copy_(starts)

    def _recount(self) -> None:
        """Rebuild the candidate histogram in place (buffers keep their addresses for captured graphs)."""
        counts, counted = retrieval.recount(self.codes, self.starts, self.length, self.cfg.sinks, self.cfg.window,
                                            self.books.size, self.cfg.bands)
        self.counts.copy_(counts)
        self.counted.copy_(counted)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        cfg, books = self.cfg, self.books
        B = q.shape[0]
        static = step.slot is not None
        if static:
            slot, lengths, starts = step.slot, step.lengths, step.starts
        else:
            if step.valid is not None and not bool(step.valid.all()):
                raise LmsqueezeError("a2ats decodes no padding tokens; pad on the left of the prompt only")
            self.reserve(self.length + 1)
            slot = torch.tensor([self.length], dtype=torch.long, device=q.device)
            lengths = torch.full((B,), self.length + 1, dtype=torch.int32, device=q.device)
            starts = self.starts
        if cfg.offload and not self.offloaded:
            self._offload()
        cos, sin = step.cos.expand(B, -1, -1), step.sin.expand(B, -1, -1)  # [1, 1, D] without position_ids
        q_rot = rope_append(q, k, v, cos, sin, self.k, self.v, slot)  # [B, Hq, D]; writes slot
        k_code = k if cfg.windowed_rope else apply_rope(k, step.cos, step.sin)
        assign_append(k_code, books.assign, books.half_norms, self.codes, self.counts, self.counted, slot, lengths,
                      starts, cfg.sinks, cfg.window, cfg.bands, self.edges)
        if cfg.windowed_rope:  # the pre-RoPE query rotated to each band's distance, dotted with Ĉ
            lut = band_lookup_table(q[:, :, 0], self.band_cos, self.band_sin, self.score_lut)
        else:
            lut = retrieval.lookup_table(q_rot, self.score_lut)
        sel = select_codes(lut, self.counts, lengths, starts, self.ratio, out=self.sel)
        if not self.offloaded:
            out = sparse_decode_attention(q_rot, self.k, self.v, self.codes, sel, starts, lengths, cfg.sinks,
                                          cfg.window, step.scaling, near=True, bands=cfg.bands, edges=self.edges)
        else:
            out = self._decode_offloaded(q_rot, k, v, step, slot, lengths, starts, sel)
        if not static:
            self.length += 1
        return out[:, :, None]

    def _decode_offloaded(self, q_rot, k, v, step: Step, slot, lengths, starts, sel) -> torch.Tensor:
        cfg = self.cfg
        B = q_rot.shape[0]
        entry = near_entries(slot, starts, cfg.sinks, cfg.window)
        rows = torch.arange(B, device=q_rot.device)
        k_rot = apply_rope(k, step.cos, step.sin)
        self.near_k[rows, :, entry] = k_rot[:, :, 0]
        self.near_v[rows, :, entry] = v[:, :, 0]
        self.near_slots[rows, entry] = slot.to(torch.int32).expand(B)
        near_out, near_lse = near_attention(q_rot, self.near_k, self.near_v, self.near_slots, starts, lengths,
                                            cfg.sinks, cfg.window, step.scaling)
        if cfg.offload_attention == "cpu":
            if q_rot.is_cuda and torch.cuda.is_current_stream_capturing():
                raise LmsqueezeError("a2ats offload_attention='cpu' cannot run inside a CUDA graph; "
                                     "use generate(..., use_graph=False) or offload_attention='gpu'")
            self.codes_host.index_copy_(2, slot.cpu(), self.codes.index_select(2, slot).cpu())
            far_out, far_lse = selected_attention_cpu(q_rot, self.k, self.v, self.codes_host, sel, starts, lengths,
                                                      cfg.sinks, cfg.window, step.scaling, near=False,
                                                      bands=cfg.bands)
        else:
            far_out, far_lse = sparse_decode_attention(q_rot, self.k, self.v, self.codes, sel, starts, lengths,
                                                       cfg.sinks, cfg.window, step.scaling, near=False,
                                                       return_lse=True, bands=cfg.bands, edges=self.edges)
        out, _ = merge_attention_states(far_out, far_lse, near_out, near_lse)
        return out

    # offloading ----------------------------------------------------------------------------------------
    def _offload(self) -> None:
        """Move K/V to (pinned) host memory and keep the sinks and the window on the device (eager)."""
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise LmsqueezeError("a2ats offloads at the first decode step, which must run before graph capture")
        B, Hkv, _cap, D = self.k.shape
        E = self.cfg.sinks + ring_size(self.cfg.window)
        self.near_k = torch.zeros(B, Hkv, E, D, dtype=self.k.dtype, device=self.device)
        self.near_v = torch.zeros_like(self.near_k)
        self.near_slots = torch.full((B, E), -1, dtype=torch.int32, device=self.device)
        self.k, self.v = to_host(self.k), to_host(self.v)
        if self.cfg.offload_attention == "cpu":
            self.codes_host = self.codes.cpu()
        self.offloaded = True
        self._rebuild_near()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _rebuild_near(self) -> None:
        """Fill the near buffers from the store: sinks [starts, starts + sinks) and the last `window` slots."""
        cfg, n = self.cfg, self.length
        B = self.k.shape[0]
        starts = self.starts.to("cpu").long()
        self.near_slots.fill_(-1)
        for b in range(B):
            st = int(starts[b])
            sink_slots = list(range(st, min(st + cfg.sinks, n)))
            ring_slots = list(range(max(0, n - cfg.window), n))
            entries = list(range(len(sink_slots))) + [cfg.sinks + s % ring_size(cfg.window) for s in ring_slots]
            slots = sink_slots + ring_slots
            if not slots:
                continue
            e = torch.tensor(entries, device=self.device)
            s = torch.tensor(slots)
            self.near_k[b, :, e] = self.k[b, :, s].to(self.device)
            self.near_v[b, :, e] = self.v[b, :, s].to(self.device)
            self.near_slots[b, e] = torch.tensor(slots, dtype=torch.int32, device=self.device)

    # cache protocol ------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        if self.dense is not None:
            self.dense.crop(max_length)
        if self.codes is not None:
            self._recount()
            if self.offloaded:
                self._rebuild_near()

    def reset(self) -> None:
        """Forget every token; buffers (and the offloaded store) stay where they are, so graphs stay valid."""
        super().reset()
        if self.dense is not None:
            self.dense.reset()
        if self.valid is not None:
            self.valid.fill_(True)
            self.counts.zero_()
            self.counted.zero_()
            self.starts.zero_()
        if self.near_slots is not None:
            self.near_slots.fill_(-1)
