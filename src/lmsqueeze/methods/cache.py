"""The cache every lmsqueeze backend lives in, and what one attention call hands a backend.

A `SqueezeCache` is a `transformers.Cache` whose layers are backend states (`LayerState`). Patched attention
calls `cache.layers[i].attend(q, k, v, step)` with *pre-RoPE* q/k; the state stores what its method needs and
returns the attention output. `get_seq_length()` is the logical number of tokens seen, whatever is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lmsqueeze.errors import LmsqueezeError


@dataclass(slots=True)
class Step:
    """Everything one attention call knows besides q/k/v.

    cos, sin: [B, T, D] rotary tables of the new tokens; positions: [B, T] their RoPE positions;
    valid: [B, T] bool (False = padding) or None when nothing is padded; scaling: softmax scale;
    window: sliding window length or None; layer_idx: the decoder layer; rotary: the model's rotary
    embedding module (`lmsqueeze.models.rope.rope_tables(rotary, positions, dtype)` gives cos/sin for any
    positions, e.g. to rotate stored pre-RoPE keys).

    Static decode (T == 1 inside the fast generation path; see docs/architecture.md): `slot: [1] int64` is
    where the new token goes (the same slot for every sequence), `lengths: [B] int32` the filled slots
    including it, `starts: [B] int32` the first non-padding slot. All are device tensors that the decode
    step advances, so one captured CUDA graph serves every step. None outside static decode.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None
    scaling: float
    window: int | None
    layer_idx: int
    rotary: Any = None
    lengths: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    starts: torch.Tensor | None = None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in obj (a tensor, or a list/tuple/dict of them); 0 for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


class LayerState(CacheLayerMixin):
    """Base of every backend's per-layer state. Subclasses implement `attend` (and usually `crop`)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # logical tokens seen (same for every sequence: padding is tracked, not removed)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """q: [B, Hq, T, D], k/v: [B, Hkv, T, D] (q, k pre-RoPE) -> out: [B, Hq, T, D]; appends k/v."""
        raise NotImplementedError

    # transformers' CacheLayerMixin interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise LmsqueezeError(
            "an lmsqueeze cache was used by an unpatched model; use it inside `with lmsqueeze.apply(model, ...)`"
        )

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Drop tokens: a negative argument removes that many from the end (transformers' convention)."""
        new_len = self.length + max_length if max_length < 0 else min(max_length, self.length)
        if new_len < 0:
            raise LmsqueezeError(f"cannot crop {-max_length} tokens from a cache holding {self.length}")
        self.length = new_len

    def reset(self) -> None:
        self.length = 0

    def memory_bytes(self) -> int:
        """Bytes of every tensor this state holds (allocated, not just filled)."""
        return sum(tensor_bytes(v) for v in vars(self).values())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LmsqueezeError("beam search is not supported by lmsqueeze caches; use greedy or sampling")


class SqueezeCache(Cache):
    """A transformers Cache holding one backend `LayerState` per decoder layer.

    `make_layer(layer_idx)` builds each layer's state. The cache also carries the 2D padding mask of the
    current forward (set by the patched model before its layers run).
    """

    def __init__(self, make_layer: Callable[[int], LayerState], num_layers: int,
                 batch_size: int | None = None, max_length: int | None = None) -> None:
        super().__init__(layers=[make_layer(i) for i in range(num_layers)])
        self.batch_size_hint = batch_size
        self.max_length = max_length
        self.pending_valid: torch.Tensor | None = None  # [B, T] bool for the forward in flight
        # static decode state (device tensors), set by `start_static`
        self.slot: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None

    def start_static(self, starts: torch.Tensor) -> None:
        """Enter static decode: from now on one-token forwards read and advance device-side lengths.

        starts: [B] int32, the first non-padding slot of each sequence (left padding only).
        """
        n = self.get_seq_length()
        if self.slot is None or self.starts.shape != starts.shape:  # else refill in place: graphs hold these
            self.slot = torch.empty(1, dtype=torch.int64, device=starts.device)
            self.lengths = torch.empty(starts.shape, dtype=torch.int32, device=starts.device)
            self.starts = torch.empty(starts.shape, dtype=torch.int32, device=starts.device)
        self.slot.fill_(n)
        self.lengths.fill_(n + 1)
        self.starts.copy_(starts)

    def reset(self) -> None:
        """Forget every token (buffers and static tensors are kept, so captured graphs stay valid)."""
        for layer in self.layers:
            layer.reset()
        self.pending_valid = None

    def advance_device(self) -> None:
        """After a static one-token forward: the next token goes one slot further (no host sync)."""
        self.slot.add_(1)
        self.lengths.add_(1)

    def advance_host(self, n: int = 1) -> None:
        """Keep the Python-side lengths in step with `n` static forwards that ran inside a graph."""
        for layer in self.layers:
            layer.length += n

    @property
    def is_compileable(self) -> bool:  # generate must not auto-compile around our Python-level states
        return False

    def begin_forward(self, attention_mask: torch.Tensor | None, num_new: int) -> None:
        """Record which of the `num_new` incoming tokens are padding (attention_mask: [B, past + T] or [B, T])."""
        if attention_mask is None:
            self.pending_valid = None
            return
        if attention_mask.dim() != 2:
            raise LmsqueezeError("lmsqueeze caches take a 2D attention_mask [batch, length]; got a "
                                 f"{attention_mask.dim()}D mask")
        new = attention_mask[:, -num_new:].bool()
        self.pending_valid = None if bool(new.all()) else new

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def memory_bytes(self) -> int:
        """Bytes allocated by every layer's state."""
        return sum(layer.memory_bytes() for layer in self.layers)
