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
from lmsqueeze.methods.chess.allocate import allocation_levels, combine_levels, greedy_allocation
from lmsqueeze.methods.chess.calibrate import as_batches, calibrate_threshold_sweep, calibrate_thresholds
from lmsqueeze.methods.chess.install import install_thresholds
from lmsqueeze.methods.chess.kernels import MAX_KERNEL_BATCH
from lmsqueeze.methods.chess.thresholds import check_rule, check_sparsity
from lmsqueeze.methods.dense import DenseState

ALLOCATIONS = ("uniform", "greedy")


def check_kernel_rows(n: int) -> int:
    """max_kernel_rows must be an int in [0, 16] (0 = always use the masked dense math)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_KERNEL_BATCH:
        raise LmsqueezeError(f"max_kernel_rows must be an integer in [0, {MAX_KERNEL_BATCH}], got {n!r}")
    return n


def sparsity_artifact(method: Method, model, batches, kind: str, sparsity: float,
                      attention_sparsity: float | None, rule: str = "paper", allocation: str = "uniform",
                      allocation_step: float = 0.05) -> Artifact:
    """Calibrate `kind` thresholds on `model` and wrap them in an Artifact of `method`.

    allocation 'greedy' (FFN gate thresholds only): per-layer sparsities at the same mean, chosen on the
    calibration loss of `batches` (`allocate.greedy_allocation`); recorded in the artifact's meta.
    """
    data = as_batches(batches)
    dicts = [{"input_ids": ids, "attention_mask": mask} for ids, mask in data]
    meta: dict = {}
    if allocation == "uniform":
        tensors = calibrate_thresholds(model, dicts, kind, sparsity, attention_sparsity, rule)
    else:
        levels = allocation_levels(allocation_step)
        att = None if attention_sparsity is None else [attention_sparsity] * len(levels)
        sweep = calibrate_threshold_sweep(model, dicts, kind, levels, att, rule)
        chosen = greedy_allocation(model, data, sweep, levels, [sparsity])[sparsity]
        tensors = combine_levels(sweep, chosen["levels"])
        meta["layer_sparsities"] = chosen["sparsities"]
        meta["allocation_calibration_loss"] = chosen["loss"]
    tokens = sum(int(ids.numel() if mask is None else mask.sum()) for ids, mask in data)
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors,
                    meta={"calibration_tokens": tokens, "calibration_batches": len(data), **meta})


@register_method
@dataclass(slots=True)
class CHESS(Method):
    """sparsity: fraction of FFN activations (a_g) zeroed on calibration data; attention: also sparsify the
    inputs of q_proj and o_proj (k_proj, v_proj stay dense) at `attention_sparsity` (None: = sparsity);
    max_kernel_rows: batch x tokens up to which the sparse kernels run (above: masked dense math);
    rule: channel importance, 'paper' (a_g^2 E[a_u^2]) or 'wdown' (x ||W_down[:, i]||^2, `thresholds.py`);
    allocation: 'uniform' (every layer at `sparsity`, the paper) or 'greedy' (per-layer sparsities with mean
    `sparsity`, chosen on the calibration loss in steps of `allocation_step`, `allocate.py`)."""

    name: ClassVar[str] = "chess"
    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5
    attention: bool = True
    attention_sparsity: float | None = None
    max_kernel_rows: int = MAX_KERNEL_BATCH
    rule: str = "paper"
    allocation: str = "uniform"
    allocation_step: float = 0.05

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        self.rule = check_rule(self.rule)
        if self.allocation not in ALLOCATIONS:
            raise LmsqueezeError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if isinstance(self.allocation_step, bool) or not isinstance(self.allocation_step, (int, float)) or not (
                0 < self.allocation_step <= 0.5):
            raise LmsqueezeError(f"allocation_step must be in (0, 0.5], got {self.allocation_step!r}; use 0.05")
        if self.allocation == "greedy" and abs(round(self.sparsity / self.allocation_step) * self.allocation_step
                                               - self.sparsity) > 1e-6:
            raise LmsqueezeError(f"greedy allocation needs sparsity ({self.sparsity}) to be a multiple of "
                                 f"allocation_step ({self.allocation_step})")
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
        return sparsity_artifact(self, model, batches, "chess", self.sparsity, att, self.rule, self.allocation,
                                 self.allocation_step)

    def install(self, model, artifact: Artifact | None):
        if artifact is None:
            raise LmsqueezeError("CHESS needs calibration: artifact = CHESS(...).calibrate(model, batches)")
        return install_thresholds(model, artifact.tensors, self.max_kernel_rows)
