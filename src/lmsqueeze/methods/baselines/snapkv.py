"""SnapKV-style selection at prepare time (Li et al., 2024): the fixed context's last `window` tokens vote.

Their attention over the context (softmax over all earlier keys, summed over the window's queries, max over
the query heads of a KV head) is smoothed by a 1D max-pool of `kernel` and the top rows are kept per KV head,
plus the window itself, up to the budget. Static afterwards: the same rows for every question (query
agnostic, the weakness Squeezed Attention's per-query lookup addresses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, register_method
from lmsqueeze.methods.squeezed.context import CapturedLayer, prepare_fixed_context
from lmsqueeze.methods.squeezed.fixed_budget import BaselineState, budget_tokens, check_budget, static_rows


def snapkv_rows(cap: CapturedLayer, keep: int, kernel: int) -> torch.Tensor:
    """[Hkv, keep] int32 rows (ascending): the observation window plus the top voted earlier rows."""
    keys, q = cap.keys.float(), cap.q_obs.float()            # [Hkv, S, D], [Hq, W, D]
    Hkv, S, D = keys.shape
    Hq, W, _ = q.shape
    keep = min(keep, S)
    s = torch.einsum("hgwd,hsd->hgws", q.reshape(Hkv, Hq // Hkv, W, D), keys) * cap.scaling
    qpos = torch.arange(S - W, S, device=keys.device)[:, None]
    s = s.masked_fill(torch.arange(S, device=keys.device)[None, :] > qpos, float("-inf"))  # causal
    votes = torch.softmax(s, -1).sum(2).amax(1)[:, : S - W]  # [Hkv, S - W]
    if kernel > 1 and votes.shape[-1] > 0:
        votes = F.max_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0, : S - W]
    win = min(W, keep)
    top = min(keep - win, S - W)
    picked = torch.topk(votes, top, dim=-1).indices if top > 0 else votes.new_zeros(Hkv, 0, dtype=torch.long)
    window_rows = torch.arange(S - win, S, device=keys.device)[None].expand(Hkv, -1)
    return torch.cat([picked, window_rows], -1).sort(-1).values.to(torch.int32)


@register_method
@dataclass(slots=True)
class SnapKV(Method):
    """budget: fraction of the fixed context kept; window: observation window; kernel: pooling width."""

    name: ClassVar[str] = "snapkv"
    needs_calibration: ClassVar[bool] = True
    budget: float = 0.125
    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.window < 1 or self.kernel < 1:
            raise LmsqueezeError(f"window and kernel must be >= 1, got {self.window} and {self.kernel}")

    def prepare(self, model, fixed_context_ids, chunk_size: int = 2048, captured=None) -> Artifact:
        def rows(i, cap):
            return {"rows": snapkv_rows(cap, budget_tokens(self.budget, cap.keys.shape[1]), self.kernel)}
        return prepare_fixed_context(self, model, fixed_context_ids, self.window, rows, chunk_size, captured=captured)

    def calibrate(self, model, batches) -> Artifact:
        return self.prepare(model, batches)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        def select(q_rot, fixed, step):
            return static_rows(fixed.extra["rows"], q_rot.shape[0])
        return BaselineState(layer_idx, artifact, select, max_length)
