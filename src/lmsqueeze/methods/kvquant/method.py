"""The KVQuant method config: `KVQuant(bits=3, outliers=0.01)`, registered as "kvquant".

    art = KVQuant(bits=3).calibrate(model, batches)   # per-channel key ranges, per-layer datatypes
    art.save("runs/kvq3"); art = lmsqueeze.load_artifact("runs/kvq3")
    with lmsqueeze.apply(model, art) as s:
        out = model.generate(ids, past_key_values=s.new_cache(), max_new_tokens=32)

Quality on the zoo's default model (benchmarks/results/kvquant_quality_zoo_v3.json, H100 bf16, 16x8192
calibration tokens, candidates chosen on train-split validation): held-out perplexity nuq4-1% +0.87%, nuq3-1%
+2.75% (int3 per token +3.85%), nuq2-1% +7.98%, passkey 8K 0.82 for nuq3-1%, with two outlier entries per word
and key ranges at the 2% quantile (key_range_fraction=0.02); one entry and 1% ranges gave +2.1% / +4.4%
(kvquant_quality_zoo.json). The keys carry the loss. key_fit="lloyd" did not win on validation data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, Method, register_method
from lmsqueeze.methods.kvquant.cache import KVQuantState
from lmsqueeze.methods.kvquant.codebooks import Codebook
from lmsqueeze.methods.kvquant.quantizers import KeyQuantizer, ValueQuantizer, outlier_slots

DATATYPES = ("nuq", "int", "nf")
KEY_FITS = ("quantile", "lloyd")


@register_method
@dataclass(slots=True)
class KVQuant(Method):
    """Calibrated low-bit KV cache (Hooper et al., 2024).

    bits: 2, 3 or 4 (8 with datatype="int", reference path only); outliers: fraction of each (token, head)
    vector kept exactly (slots = round(outliers * head_dim), at least 1 when > 0); sink_tokens: first tokens
    of each sequence kept in full precision; datatype: "nuq" (Fisher-weighted k-means), "int" (uniform),
    "nf" (NormalFloat); window: recent tokens also kept in full precision; qnorm: Q-Norm of the datatype
    (None: on for 2-bit nuq); fisher: weight k-means by Fisher information (False: plain counts); key_fit: "quantile" (the paper's
    per-channel ranges: quantiles leaving out `key_range_fraction`) or "lloyd" (each channel's range refitted
    to minimise its Fisher-weighted error, clipping included; see calibrate.py);
    layers_per_pass: layers hooked per calibration pass; kernel: use the Triton decode kernel on CUDA;
    key_range_fraction: the fraction of each key channel's calibration values left outside its range (split
    between the two tails; None: `outliers`, as in the paper). A vector keeps `outlier_slots(outliers, D)`
    entries (whole words of two), which can hold more than `outliers` of its channels: a larger fraction
    then spends the levels on a narrower range at no storage cost; key_token_scale: also scale each key vector
    (one byte per token and head, beyond the paper: key = level * r * s + z, see quantizers.KeyQuantizer), so
    small vectors use the levels' full resolution and large ones are not clipped (not with key_fit="lloyd").
    """

    name: ClassVar[str] = "kvquant"
    needs_calibration: ClassVar[bool] = True

    bits: int = 3
    outliers: float = 0.01
    sink_tokens: int = 1
    datatype: str = "nuq"
    window: int = 0
    qnorm: bool | None = None
    fisher: bool = True
    key_fit: str = "quantile"
    layers_per_pass: int = 8
    kernel: bool = True
    key_range_fraction: float | None = None
    key_token_scale: bool = False

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise LmsqueezeError(f"kvquant datatype must be one of {DATATYPES}, got {self.datatype!r}")
        ok = (2, 3, 4, 8) if self.datatype == "int" else (2, 3, 4)
        if self.bits not in ok:
            raise LmsqueezeError(f"kvquant bits must be 2, 3 or 4 (8 only with datatype='int'), got {self.bits}")
        if not 0 <= self.outliers < 0.5:
            raise LmsqueezeError(f"kvquant outliers is a fraction in [0, 0.5), got {self.outliers}")
        if self.sink_tokens < 0 or self.window < 0:
            raise LmsqueezeError(f"sink_tokens and window must be >= 0, got {self.sink_tokens}, {self.window}")
        if self.key_fit not in KEY_FITS:
            raise LmsqueezeError(f"kvquant key_fit must be one of {KEY_FITS}, got {self.key_fit!r}")
        if self.key_range_fraction is not None and not 0 <= self.key_range_fraction < 0.5:
            raise LmsqueezeError(f"key_range_fraction is a fraction in [0, 0.5) or None, got {self.key_range_fraction}")
        if self.key_token_scale and self.key_fit == "lloyd":
            raise LmsqueezeError("key_token_scale works with key_fit='quantile' (the Lloyd range refit assumes "
                                 "no per-token scale); drop one of them")
        if self.layers_per_pass < 1:
            raise LmsqueezeError(f"layers_per_pass must be >= 1, got {self.layers_per_pass}")

    @property
    def range_fraction(self) -> float:
        """The fraction of key calibration values outside the per-channel ranges."""
        return self.outliers if self.key_range_fraction is None else self.key_range_fraction

    @property
    def use_qnorm(self) -> bool:
        return self.qnorm if self.qnorm is not None else (self.bits == 2 and self.datatype == "nuq")

    def calibrate(self, model, batches) -> Artifact:
        from lmsqueeze.methods.kvquant.calibrate import calibrate_kvquant

        return calibrate_kvquant(self, model, batches)

    def quantizers(self, artifact: Artifact, layer_idx: int) -> tuple[KeyQuantizer, ValueQuantizer]:
        """The layer's key and value quantizers from a calibration artifact."""
        t = artifact.tensors
        key = f"layer{layer_idx}.k_lower"
        if key not in t:
            raise LmsqueezeError(f"this kvquant artifact has no layer {layer_idx}; calibrate it on this model")
        lower = t[key].float()
        n_out = outlier_slots(self.outliers, lower.shape[-1])
        kcb = Codebook(t[f"layer{layer_idx}.k_levels"].float(), float(t[f"layer{layer_idx}.k_grid"]))
        vcb = Codebook(t[f"layer{layer_idx}.v_levels"].float(), float(t[f"layer{layer_idx}.v_grid"]))
        if kcb.levels.numel() != 2**self.bits or vcb.levels.numel() != 2**self.bits:
            raise LmsqueezeError(f"this artifact's datatypes do not have 2^{self.bits} values; calibrate again")
        kq = KeyQuantizer(kcb, lower, t[f"layer{layer_idx}.k_upper"].float(), n_out, self.key_token_scale)
        return kq, ValueQuantizer(vcb, n_out)

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        if artifact is None:
            raise LmsqueezeError("kvquant needs calibration: artifact = KVQuant(...).calibrate(model, batches)")
        kq, vq = self.quantizers(artifact, layer_idx)
        return KVQuantState(kq, vq, self.sink_tokens, self.window, max_length, kernel=self.kernel)


def uncalibrated_artifact(method: KVQuant, model, lower: torch.Tensor | None = None,
                          upper: torch.Tensor | None = None) -> Artifact:
    """An artifact with given (default: [-1, 1]) key ranges and uniform/NF datatypes, for tests and benchmarks."""
    from lmsqueeze.methods.base import model_fingerprint
    from lmsqueeze.methods.kvquant.codebooks import fit_codebook

    H, D = model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    dtype = method.datatype if method.datatype != "nuq" else "nf"
    cb = fit_codebook(dtype, method.bits, None)
    tensors = {}
    for i in range(len(model.model.layers)):
        tensors[f"layer{i}.k_lower"] = lower if lower is not None else -torch.ones(H, D)
        tensors[f"layer{i}.k_upper"] = upper if upper is not None else torch.ones(H, D)
        for kv in "kv":
            tensors[f"layer{i}.{kv}_levels"] = cb.levels
            tensors[f"layer{i}.{kv}_grid"] = torch.tensor([cb.grid])
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors)
