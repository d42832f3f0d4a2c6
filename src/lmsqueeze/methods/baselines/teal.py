"""TEAL (Liu et al., ICLR 2025): magnitude thresholds on the inputs of all seven linears of each layer.

One threshold per (layer, input): q/k/v share theirs (they share the input), gate/up share theirs, o_proj
and down_proj have their own. This is TEAL's uniform allocation (the same sparsity for every input);
TEAL's greedy block-wise allocation of per-layer sparsities is not implemented. Same code path as CHESS:
every linear becomes an input-sparse `SparseLinear` (kernels in `lmsqueeze.methods.chess.kernels`).
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
class TEAL(Method):
    """sparsity: fraction of each linear's input entries zeroed on calibration data."""

    name: ClassVar[str] = "teal"
    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5
    max_kernel_rows: int = MAX_KERNEL_BATCH

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        self.max_kernel_rows = check_kernel_rows(self.max_kernel_rows)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        return DenseState(max_length)

    def calibrate(self, model, batches) -> Artifact:
        return sparsity_artifact(self, model, batches, "teal", self.sparsity, None)

    def install(self, model, artifact: Artifact | None):
        if artifact is None:
            raise LmsqueezeError("TEAL needs calibration: artifact = TEAL(...).calibrate(model, batches)")
        return install_thresholds(model, artifact.tensors, self.max_kernel_rows)
