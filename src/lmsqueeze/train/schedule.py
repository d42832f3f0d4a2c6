"""Learning-rate schedule (linear warm-up, cosine decay) and the sequence-length curriculum."""

from __future__ import annotations

import math


def lr_at(step: int, progress: float, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from `peak` down to `peak * min_ratio` at progress 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    p = min(max(progress, 0.0), 1.0)
    return peak * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def seq_len_at(progress: float, curriculum: list[tuple[float, int]], final: int) -> int:
    """The sequence length at `progress`: the last (start, length) entry with start <= progress, else final."""
    length = final
    for start, n in sorted(curriculum):
        if progress >= start:
            length = n
    return length
