"""CHESS: channel-wise FFN thresholds and selective (q_proj / o_proj) attention sparsification.

    art = CHESS(sparsity=0.5).calibrate(model, batches)     # thresholds from the dense model
    with lmsqueeze.apply(model, art) as s: ...               # sparse MLP, q_proj, o_proj; attention dense

He et al., "CHESS: Optimizing LLM Inference via Channel-Wise Thresholding and Selective Sparsification"
(arXiv 2409.01366). The KV cache is the Dense one: CHESS changes which weights are read, not the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, model_fingerprint, register_method
from lmsqueeze.methods.chess.calibrate import as_batches, calibrate_thresholds
from lmsqueeze.methods.chess.install import install_thresholds
from lmsqueeze.methods.chess.kernels import MAX_KERNEL_BATCH
from lmsqueeze.methods.chess.thresholds import check_sparsity
from lmsqueeze.methods.dense import DenseState


def check_kernel_rows(n: int) -> int:
    """max_kernel_rows must be an int in [0, 16] (0 = always use the masked dense math)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_KERNEL_BATCH:
        raise LmsqueezeError(f"max_kernel_rows must be an integer in [0, {MAX_KERNEL_BATCH}], got {n!r}")
    return n


def sparsity_artifact(method: Method, model, batches, kind: str, sparsity: float,
                      attention_sparsity: float | None) -> Artifact:
    """Calibrate `kind` thresholds on `model` and wrap them in an Artifact of `method`."""
    data = as_batches(batches)
    tensors = calibrate_thresholds(model, [{"input_ids": ids, "attention_mask": mask} for ids, mask in data],
                                   kind, sparsity, attention_sparsity)
    tokens = sum(int(ids.numel() if mask is None else mask.sum()) for ids, mask in data)
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors,
                    meta={"calibration_tokens": tokens, "calibration_batches": len(data)})


@register_method
@dataclass(slots=True)
class CHESS(Method):
    """sparsity: fraction of FFN activations (a_g) zeroed on calibration data; attention: also sparsify the
    inputs of q_proj and o_proj (k_proj, v_proj stay dense) at `attention_sparsity` (None: = sparsity);
    max_kernel_rows: batch x tokens up to which the sparse kernels run (above: masked dense math)."""

    name: ClassVar[str] = "chess"
    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5
    attention: bool = True
    attention_sparsity: float | None = None
    max_kernel_rows: int = MAX_KERNEL_BATCH

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if not isinstance(self.attention, bool):
            raise LmsqueezeError(f"attention must be True or False, got {self.attention!r}")
        if self.attention_sparsity is not None:
            self.attention_sparsity = check_sparsity(self.attention_sparsity, "attention_sparsity")
        self.max_kernel_rows = check_kernel_rows(self.max_kernel_rows)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        return DenseState(max_length)

    def calibrate(self, model, batches) -> Artifact:
        att = (self.sparsity if self.attention_sparsity is None else self.attention_sparsity) if self.attention \
            else None
        return sparsity_artifact(self, model, batches, "chess", self.sparsity, att)

    def install(self, model, artifact: Artifact | None):
        if artifact is None:
            raise LmsqueezeError("CHESS needs calibration: artifact = CHESS(...).calibrate(model, batches)")
        return install_thresholds(model, artifact.tensors, self.max_kernel_rows)
