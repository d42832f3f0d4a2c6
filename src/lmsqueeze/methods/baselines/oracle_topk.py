"""Oracle top-k: each query head attends to its k highest exact logits plus sinks and window.

The upper bound of every top-k retrieval method at the same budget (k = ratio x length per head): it
computes all exact logits (so it saves nothing) and keeps the best. Eager decode only (k depends on the
host-side length); prefill is dense. Registered as "oracle_topk".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Method, register_method
from lmsqueeze.methods.cache import Step
from lmsqueeze.methods.dense import DenseState
from lmsqueeze.models.rope import apply_rope


def candidate_mask(S: int, starts: torch.Tensor, length: int, sinks: int, window: int) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """(near, candidate): bool [B, S] masks of slots [0, S) for a query at slot length - 1.

    near = sinks [starts, starts + sinks) and window [length - window, length); candidate = the slots
    between them.
    """
    slots = torch.arange(S, device=starts.device)[None, :]
    st = starts.long()[:, None]
    live = (slots >= st) & (slots < length)
    near = live & ((slots < st + sinks) | (slots >= length - window))
    return near, live & ~near


def topk_mask(scores: torch.Tensor, candidate: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """Bool mask of each row's kth highest-scoring candidates. scores: [B, H, S]; candidate: [B, S] bool;
    kth: [B] int (tokens per head; clipped to the candidates)."""
    _B, _H, S = scores.shape
    k_max = int(kth.max()) if kth.numel() else 0
    k_max = min(k_max, S)
    if k_max <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    masked = scores.float().masked_fill(~candidate[:, None, :], float("-inf"))
    vals, idx = masked.topk(k_max, dim=-1)
    keep = (torch.arange(k_max, device=scores.device)[None, None, :] < kth.to(scores.device)[:, None, None]) \
        & torch.isfinite(vals)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, keep)


class OracleTopKState(DenseState):
    """Dense storage; decode attends per query head to its exact top-k candidates plus sinks and window."""

    def __init__(self, ratio: float, sinks: int, window: int, max_length: int | None = None) -> None:
        super().__init__(max_length)
        self.ratio, self.sinks, self.window = ratio, sinks, window

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        if q.shape[2] > 1 or step.window is not None:
            return super().attend(q, k, v, step)
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise LmsqueezeError("oracle_topk cannot run inside a CUDA graph; use generate(..., use_graph=False)")
        q = apply_rope(q, step.cos, step.sin)
        k = apply_rope(k, step.cos, step.sin)
        if step.slot is not None:  # static decode run eagerly: write at slot, the Python length is current
            self.k.index_copy_(2, step.slot, k)
            self.v.index_copy_(2, step.slot, v)
            n = self.length + 1
        else:
            self.append(k, v, step.valid)
            n = self.length
        valid = self.valid[:, :n]
        starts = (~valid).long().cumprod(dim=1).sum(dim=1)
        return oracle_decode(q[:, :, 0], self.k[:, :, :n], self.v[:, :, :n], starts, n, self.ratio, self.sinks,
                             self.window, step.scaling)[:, :, None]


def oracle_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, length: int,
                  ratio: float, sinks: int, window: int, scaling: float) -> torch.Tensor:
    """q: [B, Hq, D] (RoPE applied) over keys/values [B, Hkv, S, D] -> [B, Hq, D], oracle top-k per head."""
    _B, Hq, _D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    kf = keys.float().repeat_interleave(G, dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * scaling
    near, cand = candidate_mask(S, starts, length, sinks, window)
    kth = ((length - starts).double() * ratio).floor().long()
    mask = topk_mask(s, cand, kth) | near[:, None, :]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.einsum("bhs,bhsd->bhd", p, values.float().repeat_interleave(G, dim=1))
    return out.to(q.dtype)


@register_method
@dataclass(slots=True)
class OracleTopK(Method):
    """Exact top-k attention per query head (ratio x length tokens) plus sinks and window: the oracle bound."""

    name: ClassVar[str] = "oracle_topk"
    needs_calibration: ClassVar[bool] = False

    ratio: float = 0.03
    sinks: int = 8
    window: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise LmsqueezeError(f"oracle_topk ratio is a fraction in (0, 1]; got {self.ratio}")
        if self.sinks < 0 or self.window < 1:
            raise LmsqueezeError(f"oracle_topk needs sinks >= 0 and window >= 1; got {self.sinks}, {self.window}")

    def new_layer_state(self, layer_idx: int, artifact, max_length: int | None = None):
        return OracleTopKState(self.ratio, self.sinks, self.window, max_length)
