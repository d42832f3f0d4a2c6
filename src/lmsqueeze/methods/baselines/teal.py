"""TEAL (Liu et al., ICLR 2025): magnitude thresholds on the inputs of all seven linears of each layer.

One threshold per (layer, input): q/k/v share theirs (they share the input), gate/up share theirs, o_proj
and down_proj have their own. This is TEAL's uniform allocation (the same sparsity for every input);
TEAL's greedy block-wise allocation of per-layer sparsities is not implemented. Same code path as CHESS:
every linear becomes an input-sparse `SparseLinear` (kernels in `lmsqueeze.methods.chess.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmsqueeze.methods.base import register_method
from lmsqueeze.methods.baselines.thresholded import ThresholdBaseline


@register_method
@dataclass(slots=True)
class TEAL(ThresholdBaseline):
    """sparsity: fraction of each linear's input entries zeroed on calibration data."""

    name: ClassVar[str] = "teal"
    label: ClassVar[str] = "TEAL"
