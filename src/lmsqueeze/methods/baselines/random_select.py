"""Random selection (a floor): each layer and KV head reads a fixed random subset of the fixed context,
drawn once at prepare time (seeded), as many rows as the budget allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.methods.base import Artifact, Method, register_method
from lmsqueeze.methods.squeezed.context import prepare_fixed_context
from lmsqueeze.methods.squeezed.fixed_budget import BaselineState, budget_tokens, check_budget, static_rows


@register_method
@dataclass(slots=True)
class RandomSelect(Method):
    """budget: fraction of the fixed context read per step; seed: of the draw."""

    name: ClassVar[str] = "random-select"
    needs_calibration: ClassVar[bool] = True
    budget: float = 0.125
    seed: int = 0

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)

    def prepare(self, model, fixed_context_ids, chunk_size: int = 2048, captured=None) -> Artifact:
        def rows(i, cap):
            Hkv, n, _ = cap.keys.shape
            g = torch.Generator().manual_seed(self.seed * 1000003 + i)
            k = budget_tokens(self.budget, n)
            pick = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(Hkv)])
            return {"rows": pick.sort(-1).values.to(torch.int32)}
        return prepare_fixed_context(self, model, fixed_context_ids, 0, rows, chunk_size, captured=captured)

    def calibrate(self, model, batches) -> Artifact:
        return self.prepare(model, batches)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        def select(q_rot, fixed, step):
            return static_rows(fixed.extra["rows"], q_rot.shape[0])
        return BaselineState(layer_idx, artifact, select, max_length)
