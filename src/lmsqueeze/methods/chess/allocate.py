"""Per-layer FFN sparsity at a fixed average, allocated greedily on the calibration LM loss (TEAL-style).

CHESS (and CATS) give every layer the same target sparsity. Layers differ in how much dropping FFN channels
costs, so at the same average sparsity some allocations lose less. With one calibration sweep giving every
layer's thresholds at each level of a grid (0, step, 2*step, ...), `greedy_allocation` starts from all layers
dense and repeatedly raises by one level the layer whose raise increases the calibration loss least; the
allocation in force when the mean sparsity first reaches a target is that target's allocation. All layers have
the same FFN width, so the mean over layers is the fraction of FFN channels dropped.

Only calibration batches (the corpus train split) are used: the held-out text never picks an allocation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.chess.install import install_thresholds

log = logging.getLogger(__name__)


def allocation_levels(step: float, top: float = 0.95) -> list[float]:
    """The grid 0, step, 2*step, ... <= top (rounded to 6 digits)."""
    if not 0 < step <= 0.5:
        raise LmsqueezeError(f"allocation_step must be in (0, 0.5], got {step!r}; use e.g. 0.05")
    return [round(j * step, 6) for j in range(math.floor(top / step + 1e-9) + 1)]


def combine_levels(level_tensors: Sequence[dict[str, torch.Tensor]], alloc: Sequence[int]) -> dict[str, torch.Tensor]:
    """Artifact tensors with layer i's gate thresholds from level alloc[i]; other sites from level 0's dict.

    level_tensors: [L_levels] dicts of `layers.{i}.{site}` tensors (one calibration sweep); alloc: [layers].
    """
    out = dict(level_tensors[0])
    for i, j in enumerate(alloc):
        out[f"layers.{i}.gate"] = level_tensors[j][f"layers.{i}.gate"]
    return dict(sorted(out.items()))


@torch.no_grad()
def calibration_loss(model, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                     tensors: dict[str, torch.Tensor]) -> float:
    """Mean next-token loss over `batches` ([(ids [B, T], mask [B, T] | None)]) with `tensors` installed
    (masked dense math: the exact function of the sparse kernels, any batch shape)."""
    device = next(model.parameters()).device
    undo = install_thresholds(model, tensors, 0)
    total, count = 0.0, 0
    try:
        for ids, mask in batches:
            ids = ids.to(device)
            labels = ids if mask is None else ids.masked_fill(~mask.to(device), -100)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    finally:
        undo()
    if count == 0:
        raise LmsqueezeError("calibration batches hold no scored tokens; pass batches longer than one token")
    return total / count


def greedy_allocation(model, batches, level_tensors: Sequence[dict[str, torch.Tensor]], levels: Sequence[float],
                      targets: Sequence[float]) -> dict[float, dict]:
    """Greedy per-layer levels for each target mean sparsity (see the module docstring).

    batches: [(ids, mask)]; level_tensors[j]: every layer's thresholds at sparsity levels[j] (levels[0] = 0).
    Returns {target: {"sparsities": [layers] floats, "levels": [layers] ints, "loss": calibration loss}}.
    """
    n = len(model.model.layers)
    if not levels or levels[0] != 0 or len(level_tensors) != len(levels):
        raise LmsqueezeError("levels must start at 0 and pair with one threshold dict each")
    step = levels[1] - levels[0] if len(levels) > 1 else 0.0
    goals = sorted({float(t) for t in targets})
    if goals and (goals[-1] > levels[-1] or goals[0] < 0):
        raise LmsqueezeError(f"targets must lie in [0, {levels[-1]}], got {goals}")
    need = {t: round(t * n / step) if step else 0 for t in goals}  # total level increments per target
    alloc = [0] * n
    loss = calibration_loss(model, batches, combine_levels(level_tensors, alloc))
    out: dict[float, dict] = {}
    done = 0
    for t in goals:
        while done < need[t]:
            best = None
            for i in range(n):
                if alloc[i] + 1 >= len(levels):
                    continue
                trial = alloc.copy()
                trial[i] += 1
                cand = calibration_loss(model, batches, combine_levels(level_tensors, trial))
                if best is None or cand < best[1]:
                    best = (i, cand)
            if best is None:
                raise LmsqueezeError("every layer is at the top level; use a larger top level or a lower target")
            alloc[best[0]] += 1
            loss = best[1]
            done += 1
        out[t] = {"sparsities": [levels[j] for j in alloc], "levels": alloc.copy(), "loss": loss}
        log.info("greedy allocation at mean sparsity %.3f: %s (calibration loss %.4f)", t, out[t]["sparsities"], loss)
    return out
