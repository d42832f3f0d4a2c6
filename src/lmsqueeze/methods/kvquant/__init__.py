"""KVQuant: calibrated 2/3/4-bit KV cache (per-channel pre-RoPE keys, per-token values, non-uniform
datatypes, dense-and-sparse outliers, fp16 sinks) with a fused Triton decode kernel.

Files: pack.py (bit packing), codebooks.py (nuq / int / nf datatypes), quantizers.py (K/V quantizers),
fisher.py + calibrate.py (calibration), layout.py (cache buffers), cache.py (the LayerState),
reference.py / kernels.py (decode attention in PyTorch / Triton), rope.py, method.py (the config),
bench_variant.py (kvquant-nuq2/3/4 rows of `lmsqueeze bench attention`).
"""

from lmsqueeze.methods.kvquant import bench_variant  # noqa: F401 - registers the `bench attention` rows
from lmsqueeze.methods.kvquant.cache import KVQuantState
from lmsqueeze.methods.kvquant.method import KVQuant

__all__ = ["KVQuant", "KVQuantState"]
