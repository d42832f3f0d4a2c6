"""Token selection that never synchronises with the host (so it can live inside a CUDA graph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError


@dataclass(frozen=True, slots=True)
class Sampling:
    """temperature 0 = greedy; top_p in (0, 1] keeps the smallest set of tokens whose mass reaches top_p."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise LmsqueezeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LmsqueezeError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def select_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits: [B, V] -> token ids [B] (int64). Sampling uses the exponential-race trick (no multinomial)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > sampling.top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1)
