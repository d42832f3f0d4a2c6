"""Peers re-implemented in lmsqueeze's harness. Importing this package registers the KV-quantization
baselines ("int-uniform", "kivi"); the other baselines register when their modules are imported.

transformers' own `QuantizedCache` needs optimum-quanto or hqq as its backend; neither is installed in this
project's environments, so it is not offered as a baseline here.
"""

from lmsqueeze.methods.baselines.int_uniform import IntUniform
from lmsqueeze.methods.baselines.kivi import KIVI

__all__ = ["KIVI", "IntUniform"]
