import time

import pytest
import torch

from lmsqueeze.bench.timing import percentile, time_cpu, time_cuda, time_fn
from lmsqueeze.errors import LmsqueezeError


def _sleep(ms):
    def fn():
        time.sleep(ms / 1e3)
    return fn


def test_cpu_timing_is_sane():
    t = time_cpu(_sleep(2.0), warmup=1, iters=20)
    assert t.iters == 20 and t.graph is False and t.note == "cpu"
    assert 2.0 <= t.p10_ms <= t.median_ms <= t.p90_ms < 60.0


def test_calls_per_iter_divides():
    t = time_cpu(_sleep(4.0), warmup=0, iters=20, calls_per_iter=2)
    assert 2.0 <= t.median_ms < 30.0


def test_time_fn_dispatches_to_cpu():
    t = time_fn(_sleep(1.0), "cpu", warmup=0, iters=20, use_graph=True)
    assert t.graph is False and t.median_ms >= 1.0


def test_percentile_interpolates():
    v = [float(x) for x in range(11, 0, -1)]  # 11..1, unsorted on purpose
    assert percentile(v, 50) == 6.0 and percentile(v, 10) == 2.0 and percentile(v, 90) == 10.0
    assert percentile([1.0, 2.0], 50) == 1.5


def test_too_few_iters_or_bad_args_rejected():
    with pytest.raises(LmsqueezeError, match="iters"):
        time_cpu(_sleep(0.1), iters=19)
    with pytest.raises(LmsqueezeError, match="warmup"):
        time_cpu(_sleep(0.1), warmup=-1, iters=20)
    with pytest.raises(LmsqueezeError, match="calls_per_iter"):
        time_cpu(_sleep(0.1), iters=20, calls_per_iter=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_time_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(LmsqueezeError, match="CUDA"):
        time_cuda(_sleep(0.1), iters=20)
