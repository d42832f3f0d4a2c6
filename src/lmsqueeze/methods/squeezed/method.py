"""The Squeezed Attention method config: prepare a fixed context once, answer any number of queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, register_method

PREFILL_MODES = ("token", "token-budget", "chunk")


@register_method
@dataclass(slots=True)
class SqueezedAttention(Method):
    """Sparse attention over a prepared fixed context (arXiv 2411.09688), dense over user/generated tokens.

    centroids: K-means clusters per KV head as a fraction of the clustered keys (one-level lookup);
    sparsity: fraction of the clustered keys not read (decode: calibrated threshold; prefill: key budget);
    hierarchical: None, or (coarse, fine) cluster fractions for the two-level lookup (fine replaces
    `centroids`); coarse_sparsity: fraction of keys the coarse level prunes (at most `sparsity`); observation: the last tokens of
    the context used as calibration queries (always attended, never clustered); sinks: first tokens of the
    context always attended (attention sinks, never clustered); threshold: 'head' (a calibrated threshold per
    KV head) or 'layer' (one per layer, shared by its heads); kmeans_iters, seed: K-means;
    prefill: how a prefill chunk (the user input) selects: 'chunk' (default: one key set for the whole chunk,
    top mean estimated weight, up to the budget), 'token' (each token its own clusters by the calibrated
    threshold, as decode does: the paper's rule) or 'token-budget' (each token its top clusters up to the key
    budget). 'chunk' is the default for speed: on the zoo suite at 8K both rules answer the same 69 of 208
    questions at 90% (`squeezed_quality_8k_prefill_modes.json`), while 'token' prefill of 1K tokens against
    a 128K context on the H100 took 30.0 ms against 2.1 ms for 'chunk' and 3.5 ms dense, because the
    per-block union it must read covered 81% of the context (`squeezed_prefill_token_h100.json`).
    """

    name: ClassVar[str] = "squeezed"
    needs_calibration: ClassVar[bool] = True

    centroids: float = 0.05
    sparsity: float = 0.9
    hierarchical: tuple[float, float] | None = None
    coarse_sparsity: float = 0.5
    observation: int = 64
    sinks: int = 0
    threshold: str = "head"
    kmeans_iters: int = 16
    seed: int = 0
    prefill: str = "chunk"

    def __post_init__(self) -> None:
        if self.hierarchical is not None:
            if not isinstance(self.hierarchical, (list, tuple)) or len(self.hierarchical) != 2:
                raise LmsqueezeError(f"hierarchical must be None or (coarse, fine) fractions, got {self.hierarchical!r}")
            self.hierarchical = (float(self.hierarchical[0]), float(self.hierarchical[1]))
            c, f = self.hierarchical
            if not 0 < c < f <= 1:
                raise LmsqueezeError(f"hierarchical fractions need 0 < coarse < fine <= 1, got {self.hierarchical}")
        if not 0 < self.centroids <= 1:
            raise LmsqueezeError(f"centroids must be a fraction in (0, 1], got {self.centroids}")
        if not 0 <= self.sparsity < 1:
            raise LmsqueezeError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 <= self.coarse_sparsity < 1:
            raise LmsqueezeError(f"coarse_sparsity must be in [0, 1), got {self.coarse_sparsity}")
        if not isinstance(self.observation, int) or self.observation < 1:
            raise LmsqueezeError(f"observation must be a positive number of tokens, got {self.observation!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise LmsqueezeError(f"sinks must be a number of tokens >= 0, got {self.sinks!r}")
        if self.threshold not in ("head", "layer"):
            raise LmsqueezeError(f"threshold must be 'head' or 'layer', got {self.threshold!r}")
        if self.threshold == "layer" and self.hierarchical is not None:
            raise LmsqueezeError("threshold='layer' is for the one-level lookup; use threshold='head' with "
                                 "hierarchical")
        if self.prefill not in PREFILL_MODES:
            raise LmsqueezeError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {self.prefill!r}")
        if self.kmeans_iters < 0:
            raise LmsqueezeError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")

    @property
    def coarse_pruning(self) -> float:
        """The coarse level's pruned fraction: coarse_sparsity, never more than `sparsity` itself."""
        return min(self.coarse_sparsity, self.sparsity)

    def kv_budget(self) -> float:
        """Nominal fraction of the clustered context's K+V bytes one decode step reads: kept keys and values
        plus the centroids (keys only, so half a token each)."""
        cents = sum(self.hierarchical) if self.hierarchical else self.centroids
        return (1 - self.sparsity) + cents / 2  # (+ sinks and observation window: see eval_squeezed.py)

    def prepare(self, model, fixed_context_ids, chunk_size: int = 2048, captured=None,
                reuse: Artifact | None = None) -> Artifact:
        """Prepare `fixed_context_ids` ([S] or [1, S] token ids) for `model`; save it with `.save(dir)`.
        captured: a `context.capture_context` of the same context to reuse (skips the dense forward);
        reuse: a flat Squeezed artifact of the same context and clustering (e.g. another sparsity): its
        clusters are reused, only the thresholds are calibrated again (skips K-means)."""
        from lmsqueeze.methods.squeezed.prepare import prepare_squeezed

        return prepare_squeezed(self, model, fixed_context_ids, chunk_size, captured, reuse)

    def calibrate(self, model, batches) -> Artifact:
        """Same as `prepare`: `batches` holds the fixed context's token ids."""
        return self.prepare(model, batches)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        from lmsqueeze.methods.squeezed.attention import SqueezedState

        if artifact is None:
            raise LmsqueezeError("squeezed attention needs a prepared context: art = SqueezedAttention(...)"
                                 ".prepare(model, context_ids), then apply(model, art)")
        return SqueezedState(layer_idx, artifact, self.sparsity, self.coarse_pruning, max_length, self.prefill)
