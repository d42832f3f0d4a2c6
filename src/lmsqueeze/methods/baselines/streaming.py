"""StreamingLLM (Xiao et al., ICLR 2024) over a fixed context: the first `sinks` tokens and the most recent
ones, up to the budget. Static: the same rows for every query (the user's own tokens are always dense)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, register_method
from lmsqueeze.methods.squeezed.context import prepare_fixed_context
from lmsqueeze.methods.squeezed.fixed_budget import BaselineState, budget_tokens, check_budget, static_rows


def streaming_rows(n: int, keep: int, sinks: int) -> torch.Tensor:
    """Rows [keep] int64: the first min(sinks, keep) rows and the last ones, in order."""
    keep = min(keep, n)
    s = min(sinks, keep)
    return torch.cat([torch.arange(s), torch.arange(n - (keep - s), n)])


@register_method
@dataclass(slots=True)
class StreamingLLM(Method):
    """budget: fraction of the fixed context read per step; sinks: attention-sink tokens kept at its start."""

    name: ClassVar[str] = "streaming"
    needs_calibration: ClassVar[bool] = True
    budget: float = 0.125
    sinks: int = 4

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.sinks < 0:
            raise LmsqueezeError(f"sinks must be >= 0, got {self.sinks}")

    def prepare(self, model, fixed_context_ids, chunk_size: int = 2048, captured=None) -> Artifact:
        return prepare_fixed_context(self, model, fixed_context_ids, 0, None, chunk_size, captured=captured)

    def calibrate(self, model, batches) -> Artifact:
        return self.prepare(model, batches)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        budget, sinks = self.budget, self.sinks

        def select(q_rot, fixed, step):
            Hkv, n = fixed.positions.shape
            rows = streaming_rows(n, budget_tokens(budget, n), sinks).to(q_rot.device)
            return static_rows(rows[None].expand(Hkv, -1), q_rot.shape[0])
        return BaselineState(layer_idx, artifact, select, max_length)
