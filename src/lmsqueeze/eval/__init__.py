"""lmsqueeze.eval: perplexity, the synthetic long-context suite, fixed-context QA, LongBench, results, reports.

Every evaluation runs the model inside `lmsqueeze.apply(model, method)` and feeds tokens through
`eval.decoding` (chunked prefill, greedy decode), so Dense (method None) and every method share one path.
"""

from lmsqueeze.eval.fixed_context import FixedContextConfig, run_fixed_context
from lmsqueeze.eval.longbench_eval import LongBenchConfig, run_longbench
from lmsqueeze.eval.perplexity import PerplexityConfig, PerplexityResult, perplexity, sliding_windows
from lmsqueeze.eval.suite import SuiteConfig, run_samples, run_suite

__all__ = ["FixedContextConfig", "LongBenchConfig", "PerplexityConfig", "PerplexityResult", "SuiteConfig",
           "perplexity", "run_fixed_context", "run_longbench", "run_samples", "run_suite", "sliding_windows"]
