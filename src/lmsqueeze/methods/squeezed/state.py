"""Layer states whose cache starts with a prepared fixed context (Squeezed Attention and the baselines).

The fixed context lives outside the cache's token count (context.py: it sits at negative positions), shared
read-only by every cache and every sequence of a batch. The cache itself holds the user input and generated
tokens densely (local buffers [B, Hkv, capacity, D], RoPE applied), attended causally among themselves. The
fixed context is attended through a method-specific selection; both parts share one softmax.
"""

from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.cache import LayerState, Step
from lmsqueeze.methods.squeezed.kernels import indexed_attention
from lmsqueeze.models.rope import apply_rope

GROW_BLOCK = 256


def cached_layer(artifact, layer_idx: int, device, dtype, build):
    """The artifact's layer `layer_idx` moved to (device, dtype) by `build(tensors)`, built once per artifact
    and shared by every cache made from it."""
    store = artifact.__dict__.setdefault("_lmsqueeze_device_layers", {})
    key = (layer_idx, str(device), dtype)
    if key not in store:
        prefix = f"layers.{layer_idx}."
        tensors = {k[len(prefix):]: v for k, v in artifact.tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise LmsqueezeError(f"the artifact has no tensors for layer {layer_idx}; prepare it again")
        store[key] = build(tensors, device, dtype)
    return store[key]


class FixedContextState(LayerState):
    """Local dense buffers + a prepared fixed context. Subclasses implement `fixed(q)` (the layer's prepared
    tensors on q's device; at least .keys/.values [Hkv, N, D] and .positions [Hkv, N]) and `select(q_rot,
    fixed, step) -> (idx [B, Hkv, M] int32, counts [B, Hkv] int32)`, or override `attend_fixed`.

    count_rows_on_gpu: count the fixed rows read on CUDA too (a host sync per call: evaluation only, never
    inside a captured graph); off by default."""

    count_rows_on_gpu = False

    def __init__(self, layer_idx: int, max_length: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.max_length = max_length
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.has_padding = False
        self.rows_read = 0.0      # fixed-context rows read per query head group, summed (CPU paths only)
        self.rows_calls = 0

    # subclass hooks -----------------------------------------------------------------------------------------
    def fixed(self, q: torch.Tensor):
        raise NotImplementedError

    def select(self, q_rot: torch.Tensor, fixed, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # local buffers -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, k: torch.Tensor, needed: int) -> None:
        """Grow the local buffers (never inside a graph) to hold `needed` slots; k: [B, Hkv, T, D]."""
        if needed <= self.capacity and self.k.shape[0] == k.shape[0]:
            return
        B, H, _, D = k.shape
        cap = max(needed, self.max_length or 0, 2 * self.capacity)
        cap = -(-cap // GROW_BLOCK) * GROW_BLOCK
        new_k, new_v = k.new_zeros(B, H, cap, D), k.new_zeros(B, H, cap, D)
        new_valid = torch.ones(B, cap, dtype=torch.bool, device=k.device)
        if self.k is not None and self.k.shape[0] == B:
            n = self.length
            new_k[:, :, :n], new_v[:, :, :n], new_valid[:, :n] = self.k[:, :, :n], self.v[:, :, :n], self.valid[:, :n]
        self.k, self.v, self.valid = new_k, new_v, new_valid
        self.is_initialized = True

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
        start, T = self.length, k.shape[2]
        self.reserve(k, start + T)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        if valid is not None:
            self.valid[:, start:start + T] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        else:
            self.valid[:, start:start + T] = True
        self.length = start + T

    def reset(self) -> None:
        super().reset()
        self.has_padding = False

    # attention -----------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        fixed = self.fixed(q)
        if k.shape[1] != fixed.keys.shape[0] or k.shape[-1] != fixed.keys.shape[-1]:
            raise LmsqueezeError(f"the prepared context has {fixed.keys.shape[0]} KV heads of dim "
                                 f"{fixed.keys.shape[-1]}, the model gives {k.shape[1]} of dim {k.shape[-1]}")
        B = q.shape[0]
        if step.slot is not None:                      # static decode: one token, lengths on the device
            if q.is_cuda and step.window is None and self.static_cuda_ok():
                from lmsqueeze.kernels.rope_append import rope_append

                q_rot = rope_append(q, k, v, step.cos, step.sin, self.k, self.v, step.slot)
                return self.decode_cuda(q_rot, fixed, step)[:, :, None]
            q_rot, k_rot = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
            self.k.index_copy_(2, step.slot, k_rot)
            self.v.index_copy_(2, step.slot, v)
            n = self.length + 1 if not q.is_cuda else self.capacity
            return self.attend_fixed(q_rot, fixed, step, step.lengths, step.starts, None, n)
        q_rot, k_rot = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        self.append(k_rot, v, step.valid)
        n = self.length
        lengths = torch.full((B,), n, dtype=torch.int32, device=q.device)
        local_valid = self.valid[:, :n] if self.has_padding else None
        return self.attend_fixed(q_rot, fixed, step, lengths, None, local_valid, n)

    def static_cuda_ok(self) -> bool:
        """Whether `decode_cuda` exists for this state (the fused graph-capturable decode)."""
        return False

    def decode_cuda(self, q_rot: torch.Tensor, fixed, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def attend_fixed(self, q_rot: torch.Tensor, fixed, step: Step, lengths: torch.Tensor,
                     starts: torch.Tensor | None, local_valid: torch.Tensor | None, n: int) -> torch.Tensor:
        """Default: the subclass's selection, then one softmax over the selected rows and the local slots.
        q_rot: [B, Hq, T, D]; local slots [0, n) of the buffers are passed (lengths bound them)."""
        idx, counts = self.select(q_rot, fixed, step)
        self.note_rows(counts)
        return indexed_attention(q_rot, fixed.keys, fixed.values, idx, counts, self.k[:, :, :n], self.v[:, :, :n],
                                 lengths, step.scaling, starts, local_valid, step.window, step.positions,
                                 fixed.positions)

    def counting(self, t: torch.Tensor) -> bool:
        """Whether rows read are counted for tensors like `t` (always off the GPU; on it when asked)."""
        return not t.is_cuda or self.count_rows_on_gpu

    def note_rows(self, counts: torch.Tensor) -> None:
        """Keep a running count of the fixed rows read (CPU, or CUDA with count_rows_on_gpu)."""
        if self.counting(counts):
            self.rows_read += float(counts.float().mean())
            self.rows_calls += 1
