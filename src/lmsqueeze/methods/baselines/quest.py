"""Quest (Tang et al., ICML 2024): query-aware selection of key pages by an upper bound of q·k.

Each page of `page_size` keys keeps its per-channel min and max key; a query's bound for the page is
sum_d max(q_d min_d, q_d max_d) >= q·k for every key of the page. The pages of highest bound are read.
Here the fixed context is paged once at prepare time; GQA: the bound is maximised over the query heads of a
KV head (and over a prefill chunk's queries), so each KV head reads one page set. The page bounds count in
the budget (two key vectors per page: 1/page_size of the K+V bytes).
`quest_select` is usable on its own (e.g. by A2ATS's comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, register_method
from lmsqueeze.methods.squeezed.context import prepare_fixed_context
from lmsqueeze.methods.squeezed.fixed_budget import BaselineState, budget_tokens, check_budget
from lmsqueeze.methods.squeezed.lookup import mask_to_index


def page_bounds(keys: torch.Tensor, page_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """keys: [..., N, D] -> (page_min, page_max): [..., ceil(N / page_size), D] (a partial last page uses its
    own keys only)."""
    N, D = keys.shape[-2:]
    P = -(-N // page_size)
    pad = P * page_size - N
    k = keys.float()
    if pad:
        last = k[..., -1:, :].expand(*k.shape[:-2], pad, D)
        k = torch.cat([k, last], -2)
    k = k.reshape(*k.shape[:-2], P, page_size, D)
    return k.amin(-2), k.amax(-2)


def quest_scores(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Upper bounds of q·k per page. q: [B, Hq, D] or [B, Hq, T, D]; page_min/max: [Hkv, P, D] or
    [B, Hkv, P, D]. Returns [B, Hkv, P] float32, maximised over the group's query heads (and queries)."""
    if q.dim() == 3:
        q = q[:, :, None]
    B, Hq, T, D = q.shape
    pmin = page_min.float() if page_min.dim() == 4 else page_min.float()[None]
    pmax = page_max.float() if page_max.dim() == 4 else page_max.float()[None]
    Hkv = pmin.shape[1]
    qg = q.float().reshape(B, Hkv, (Hq // Hkv) * T, D)
    bound = torch.maximum(qg[:, :, :, None, :] * pmin[:, :, None], qg[:, :, :, None, :] * pmax[:, :, None]).sum(-1)
    return bound.amax(2)


def quest_select(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, budget_pages: int) -> torch.Tensor:
    """Indices of the `budget_pages` pages of highest bound: [B, Hkv, budget_pages] int64 (fixed size: no host
    sync, graph-capturable). Shapes as in `quest_scores`."""
    s = quest_scores(q, page_min, page_max)
    k = min(budget_pages, s.shape[-1])
    if k < 1:
        raise LmsqueezeError(f"Quest needs at least one page, got budget_pages={budget_pages}")
    return torch.topk(s, k, dim=-1).indices


def pages_to_rows(pages: torch.Tensor, page_size: int, n: int) -> torch.Tensor:
    """Page indices [B, H, K] -> row mask [B, H, n] bool."""
    B, H, _ = pages.shape
    P = -(-n // page_size)
    pm = torch.zeros(B, H, P, dtype=torch.bool, device=pages.device).scatter_(-1, pages, True)
    return pm.repeat_interleave(page_size, -1)[..., :n]


@register_method
@dataclass(slots=True)
class Quest(Method):
    """budget: fraction of the fixed context's K+V read per step (page bounds included); page_size: keys per page."""

    name: ClassVar[str] = "quest"
    needs_calibration: ClassVar[bool] = True
    budget: float = 0.125
    page_size: int = 16

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.page_size < 1:
            raise LmsqueezeError(f"page_size must be >= 1, got {self.page_size}")

    def budget_pages(self, tokens: int) -> int:
        pages = -(-tokens // self.page_size)
        # the bounds are two key vectors per page: one K+V token equivalent each page
        return max(1, budget_tokens(self.budget, tokens, pages) // self.page_size)

    def prepare(self, model, fixed_context_ids, chunk_size: int = 2048, captured=None) -> Artifact:
        def bounds(i, cap):
            lo, hi = page_bounds(cap.keys, self.page_size)
            return {"page_min": lo, "page_max": hi}
        return prepare_fixed_context(self, model, fixed_context_ids, 0, bounds, chunk_size, captured=captured)

    def calibrate(self, model, batches) -> Artifact:
        return self.prepare(model, batches)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        page_size = self.page_size

        def select(q_rot, fixed, step):
            n = fixed.keys.shape[1]
            pages = quest_select(q_rot, fixed.extra["page_min"], fixed.extra["page_max"], self.budget_pages(n))
            return mask_to_index(pages_to_rows(pages, page_size, n), width=pages.shape[-1] * page_size)
        return BaselineState(layer_idx, artifact, select, max_length)
