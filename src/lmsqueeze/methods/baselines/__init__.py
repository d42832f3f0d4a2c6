"""Peers re-implemented in lmsqueeze's harness. Importing this package registers the KV-quantization
baselines and the fixed-context / retrieval baselines (CATS and TEAL register with `lmsqueeze.methods`).

transformers' own `QuantizedCache` needs optimum-quanto or hqq as its backend; neither is installed in this
project's environments, so it is not offered as a baseline here.
"""

from lmsqueeze.methods.baselines.int_uniform import IntUniform
from lmsqueeze.methods.baselines.kivi import KIVI
from lmsqueeze.methods.baselines.oracle_topk import OracleTopK
from lmsqueeze.methods.baselines.quest import Quest, quest_select
from lmsqueeze.methods.baselines.random_select import RandomSelect
from lmsqueeze.methods.baselines.snapkv import SnapKV
from lmsqueeze.methods.baselines.streaming import StreamingLLM

__all__ = ["KIVI", "IntUniform", "OracleTopK", "Quest", "RandomSelect", "SnapKV", "StreamingLLM", "quest_select"]
