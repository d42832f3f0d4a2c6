"""CATS (Lee et al., 2024): one threshold per layer on |SiLU(W_gate x)|; FFN only.

Same code path as CHESS (`lmsqueeze.methods.chess`): the layer's scalar becomes a constant per-channel
threshold vector, so the sparse MLP, kernels and install are shared; only the calibration differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmsqueeze.methods.base import register_method
from lmsqueeze.methods.baselines.thresholded import ThresholdBaseline


@register_method
@dataclass(slots=True)
class CATS(ThresholdBaseline):
    """sparsity: fraction of |SiLU(gate)| entries zeroed on calibration data (one threshold per layer)."""

    name: ClassVar[str] = "cats"
    label: ClassVar[str] = "CATS"
