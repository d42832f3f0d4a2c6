"""What the fixed-context baselines (methods/baselines: quest, streaming, snapkv, random-select) share.

Each baseline prepares a fixed context into an artifact (context.py: its KV at relative positions, in context
order, plus the method's own tensors) and reads a fixed number of its rows per step: `budget` is the
fraction of the context's K+V bytes read per step, metadata included (Quest's page bounds count), so the
baselines and Squeezed Attention (whose centroids count) compare at equal KV budgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.cache import Step
from lmsqueeze.methods.squeezed.context import FixedKV
from lmsqueeze.methods.squeezed.state import FixedContextState, cached_layer


def check_budget(budget: float) -> float:
    if not 0 < budget <= 1:
        raise LmsqueezeError(f"budget must be a fraction of the fixed context in (0, 1], got {budget}")
    return float(budget)


def budget_tokens(budget: float, tokens: int, metadata_tokens: float = 0.0) -> int:
    """Rows a step may read: budget * tokens minus the metadata (in K+V token equivalents), at least 1."""
    return max(1, min(tokens, math.floor(budget * tokens - metadata_tokens)))


def static_rows(rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: [Hkv, K] int -> (idx [B, Hkv, K] int32, counts [B, Hkv] int32) for every sequence."""
    idx = rows.to(torch.int32)[None].expand(batch, -1, -1).contiguous()
    counts = torch.full(idx.shape[:2], idx.shape[-1], dtype=torch.int32, device=rows.device)
    return idx, counts


Selector = Callable[[torch.Tensor, FixedKV, Step], tuple[torch.Tensor, torch.Tensor]]


class BaselineState(FixedContextState):
    """A baseline's layer state: the prepared context (FixedKV) and a selection function
    select(q_rot [B, Hq, T, D], fixed, step) -> (idx [B, Hkv, M] int32, counts [B, Hkv] int32)."""

    def __init__(self, layer_idx: int, artifact, select: Selector, max_length: int | None = None) -> None:
        super().__init__(layer_idx, max_length)
        if artifact is None:
            raise LmsqueezeError("this method needs a prepared fixed context: art = method.prepare(model, "
                                 "context_ids), then apply(model, art)")
        self.artifact = artifact
        self._select = select

    def fixed(self, q: torch.Tensor) -> FixedKV:
        return cached_layer(self.artifact, self.layer_idx, q.device, q.dtype, FixedKV.from_tensors)

    def select(self, q_rot: torch.Tensor, fixed: FixedKV, step: Step):
        return self._select(q_rot, fixed, step)
