"""The A²ATS method config: `A2ATS(ratio=0.03, codebook=4096, ...)`, registered as "a2ats".

    art = A2ATS(codebook=4096).calibrate(model, batches)    # per layer and KV head: query-aware codebook
    art.save("runs/a2ats"); art = lmsqueeze.load_artifact("runs/a2ats")
    with lmsqueeze.apply(model, art) as s:
        out = model.generate(ids, past_key_values=s.new_cache(), max_new_tokens=32)

Ablations in the same code: `query_aware=False` (plain K-means VQ of the keys) and `windowed_rope=False`
(codes of post-RoPE keys scored against the query at its true position). `with_settings(art, ratio=...)`
changes the retrieval settings of a calibrated artifact without calibrating again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.a2ats.offload import OFFLOAD_ATTENTION
from lmsqueeze.methods.a2ats.state import A2ATSState, Codebooks, Settings
from lmsqueeze.methods.base import Artifact, Method, model_fingerprint, register_method

MAX_CODEBOOK = 32768  # codes are int16
RUNTIME_FIELDS = ("ratio", "sinks", "window", "offload", "offload_attention")


@register_method
@dataclass(slots=True)
class A2ATS(Method):
    """Top-k retrieval of tokens by query-aware VQ codes of position-free keys (He et al., 2025).

    ratio: tokens kept per query head, as a fraction of the sequence length (1.0 = dense); codebook:
    centroids per layer and KV head (<= 32768); sinks / window: first and most recent tokens, always
    attended; distance: the fixed relative position of windowed RoPE when `bands` is empty (the paper's
    form); bands: inner edges of the distance bands [window, e1), [e1, e2), ..., [e_last, inf), each scored
    at its own distance (windowed_rope.py; same codes, NB x larger lookup table and histogram); query_aware: weight the K-means by
    the queries' second moment (False: plain VQ); shrink: the metric is (1 - shrink) H / mean(diag H) + shrink I
    (0: the paper's H; 1: plain VQ; in between, H shrunk toward the identity, vq.shrink_metric); windowed_rope: code pre-RoPE keys and rotate the query to
    `distance` (False: code post-RoPE keys); offload: after prefill keep K/V in pinned host memory;
    offload_attention: "gpu" (zero-copy reads of the selected rows) or "cpu" (CPU threads, eager only).
    Calibration: kmeans_iters / kmeans_tol, at most max_keys keys per layer, calib_chunk tokens per forward,
    kmeans_device ("auto" = the model's device), seed.
    """

    name: ClassVar[str] = "a2ats"
    needs_calibration: ClassVar[bool] = True

    ratio: float = 0.03
    codebook: int = 4096
    sinks: int = 8
    window: int = 64
    distance: int = 2048
    bands: tuple[int, ...] = (256, 1024, 4096)
    query_aware: bool = True
    shrink: float = 0.0
    windowed_rope: bool = True
    offload: bool = True
    offload_attention: str = "gpu"
    kmeans_iters: int = 25
    kmeans_tol: float = 1e-4
    max_keys: int = 81920
    calib_chunk: int = 2048
    kmeans_device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise LmsqueezeError(f"a2ats ratio is the fraction of tokens kept, in (0, 1]; got {self.ratio}")
        if not 2 <= self.codebook <= MAX_CODEBOOK:
            raise LmsqueezeError(f"a2ats codebook must be in 2..{MAX_CODEBOOK} (int16 codes); got {self.codebook}")
        if self.sinks < 0 or self.window < 1:
            raise LmsqueezeError(f"a2ats needs sinks >= 0 and window >= 1; got {self.sinks}, {self.window}")
        self.bands = tuple(int(e) for e in self.bands)
        if any(b <= a for a, b in zip((self.window, *self.bands), self.bands)):
            raise LmsqueezeError(f"a2ats bands must be increasing distances above the window ({self.window}); "
                                 f"got {self.bands}")
        if not 0.0 <= self.shrink <= 1.0:
            raise LmsqueezeError(f"a2ats shrink blends the query metric with the identity, in [0, 1]; got {self.shrink}")
        if self.distance < 0:
            raise LmsqueezeError(f"a2ats distance must be >= 0, got {self.distance}")
        if self.offload_attention not in OFFLOAD_ATTENTION:
            raise LmsqueezeError(f"a2ats offload_attention must be one of {OFFLOAD_ATTENTION}, "
                                 f"got {self.offload_attention!r}")
        if self.kmeans_iters < 0 or self.kmeans_tol < 0 or self.max_keys < 1 or self.calib_chunk < 1:
            raise LmsqueezeError("a2ats kmeans_iters, kmeans_tol must be >= 0 and max_keys, calib_chunk >= 1")

    def settings(self) -> Settings:
        bands = self.bands if self.windowed_rope else ()
        return Settings(self.ratio, self.sinks, self.window, self.distance, self.windowed_rope, self.offload,
                        self.offload_attention, bands)

    def calibrate(self, model, batches) -> Artifact:
        from lmsqueeze.methods.a2ats.calibrate import calibrate_a2ats

        return calibrate_a2ats(self, model, batches)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        if artifact is None:
            raise LmsqueezeError("a2ats needs calibration: artifact = A2ATS(...).calibrate(model, batches)")
        return A2ATSState(self.settings(), layer_codebooks(artifact, layer_idx), max_length)


def layer_codebooks(artifact: Artifact, layer_idx: int) -> Codebooks:
    """The codebooks of one layer from an a2ats artifact."""
    t = artifact.tensors
    names = [f"layer{layer_idx}.{n}" for n in ("assign", "score", "half_norms")]
    if any(n not in t for n in names):
        raise LmsqueezeError(f"this a2ats artifact has no codebooks for layer {layer_idx}; calibrate on this model")
    books = Codebooks(*(t[n] for n in names))
    if books.score.shape != books.assign.shape or books.half_norms.shape != books.assign.shape[:2]:
        raise LmsqueezeError(f"layer {layer_idx} codebooks have inconsistent shapes; calibrate again")
    if books.size != artifact.method.codebook:
        raise LmsqueezeError(f"layer {layer_idx} has {books.size} codewords but the config says "
                             f"{artifact.method.codebook}; calibrate again")
    return books


def with_settings(artifact: Artifact, **changes) -> Artifact:
    """The same calibrated codebooks with other retrieval settings (ratio, sinks, window, offload, ...)."""
    bad = sorted(set(changes) - set(RUNTIME_FIELDS))
    if bad:
        raise LmsqueezeError(f"only {', '.join(RUNTIME_FIELDS)} can change without calibrating again; got {bad}")
    method = dataclasses.replace(artifact.method, **changes)
    return Artifact(method=method, fingerprint=artifact.fingerprint, tensors=artifact.tensors, meta=artifact.meta)


def random_artifact(method: A2ATS, model, seed: int = 0) -> Artifact:
    """Uncalibrated codebooks (Gaussian centroids, L = I) of the model's shapes, for speed benchmarks only.

    Every layer shares one random codebook tensor (speed does not depend on the centroids' values).
    """
    cfg = model.config
    Hkv = cfg.num_key_value_heads
    D = model.model.layers[0].self_attn.head_dim
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(Hkv, method.codebook, D, generator=gen)
    hn = 0.5 * c.pow(2).sum(-1)
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        tensors.update({f"layer{i}.assign": c, f"layer{i}.score": c, f"layer{i}.half_norms": hn})
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors, meta={"random": True})
