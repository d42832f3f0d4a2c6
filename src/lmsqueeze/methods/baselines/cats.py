"""CATS (Lee et al., 2024): one threshold per layer on |SiLU(W_gate x)|; FFN only.

Same code path as CHESS (`lmsqueeze.methods.chess`): the layer's scalar becomes a constant per-channel
threshold vector, so the sparse MLP, kernels and install are shared; only the calibration differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, register_method
from lmsqueeze.methods.chess.install import install_thresholds
from lmsqueeze.methods.chess.kernels import MAX_KERNEL_BATCH
from lmsqueeze.methods.chess.method import check_kernel_rows, sparsity_artifact
from lmsqueeze.methods.chess.thresholds import check_sparsity
from lmsqueeze.methods.dense import DenseState


@register_method
@dataclass(slots=True)
class CATS(Method):
    """sparsity: fraction of |SiLU(gate)| entries zeroed on calibration data (one threshold per layer)."""

    name: ClassVar[str] = "cats"
    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5
    max_kernel_rows: int = MAX_KERNEL_BATCH

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        self.max_kernel_rows = check_kernel_rows(self.max_kernel_rows)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        return DenseState(max_length)

    def calibrate(self, model, batches) -> Artifact:
        return sparsity_artifact(self, model, batches, "cats", self.sparsity, None)

    def install(self, model, artifact: Artifact | None):
        if artifact is None:
            raise LmsqueezeError("CATS needs calibration: artifact = CATS(...).calibrate(model, batches)")
        return install_thresholds(model, artifact.tensors, self.max_kernel_rows)
