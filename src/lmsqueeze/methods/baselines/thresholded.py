"""Threshold baselines (CATS, TEAL) share one config shape: a sparsity, calibrated thresholds, CHESS's install."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method
from lmsqueeze.methods.chess.install import install_thresholds
from lmsqueeze.methods.chess.kernels import MAX_KERNEL_BATCH
from lmsqueeze.methods.chess.method import check_kernel_rows, sparsity_artifact
from lmsqueeze.methods.chess.thresholds import check_sparsity
from lmsqueeze.methods.dense import DenseState


@dataclass(slots=True)
class ThresholdBaseline(Method):
    """sparsity: target fraction of zeroed activations on calibration data; subclasses set `name`/`label`."""

    label: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5
    max_kernel_rows: int = MAX_KERNEL_BATCH

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        self.max_kernel_rows = check_kernel_rows(self.max_kernel_rows)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        return DenseState(max_length)

    def calibrate(self, model, batches) -> Artifact:
        return sparsity_artifact(self, model, batches, self.name, self.sparsity, None)

    def install(self, model, artifact: Artifact | None):
        if artifact is None:
            raise LmsqueezeError(
                f"{self.label} needs calibration: artifact = {self.label}(...).calibrate(model, batches)")
        return install_thresholds(model, artifact.tensors, self.max_kernel_rows)
