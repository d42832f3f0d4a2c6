"""CHESS sparse GEMVs (Triton under TRITON_INTERPRET=1, and the CPU torch-ops path) against the references.

Weight rows that no surviving activation needs are filled with NaN: a kernel that reads them returns NaN,
so these tests fail if the kernels read more than the sparse rows. bf16 is not run through the Triton
interpreter (its bf16 tl.dot is wrong on CPU); bf16 is checked on the GPU by bench_chess_gpu.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported (lazily, at first call)

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.chess import cpu_native
from lmsqueeze.methods.chess.cpu import gate_up_sparse_cpu, input_sparse_matvec_cpu, sparse_mlp_cpu
from lmsqueeze.methods.chess.kernels import (
    GateUpConfig,
    SpmvConfig,
    gate_up_sparse_triton,
    input_sparse_matvec_triton,
)
from lmsqueeze.methods.chess.reference import gate_up_sparse_reference, input_sparse_matvec_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _spmv_inputs(B, K, N, dtype, threshold):
    x = torch.randn(B, K).to(dtype)
    x[:, torch.randperm(K)[: K // 5]] = 0  # some inputs zero in every row
    w_t = torch.randn(K, N).to(dtype)
    dead = (x.float().abs() <= threshold).all(0)
    w_poisoned = w_t.clone()
    w_poisoned[dead] = float("nan")
    bias = torch.randn(N).to(dtype)
    return x, w_t, w_poisoned, bias


def _gate_up_inputs(B, H, I, dtype):
    x = torch.randn(B, H).to(dtype)
    w_gate = (torch.randn(I, H) / H**0.5).to(dtype)
    w_up = torch.randn(I, H).to(dtype)
    t = torch.rand(I) * 0.6
    t[: I // 7] = float("inf")  # channels that never survive
    a = torch.nn.functional.silu(x.float() @ w_gate.float().t())
    near = ((a.abs() - t).abs() < 0.03 * t + 1e-2).any(0)
    t[near] = float("inf")  # no activation within rounding of its threshold: every path decides alike
    dead = (a.abs() < 0.8 * t).all(0)  # clearly dropped in every row (a margin for rounding of the gate)
    w_up_poisoned = w_up.clone()
    w_up_poisoned[dead] = float("nan")
    return x, w_gate, w_up, w_up_poisoned, t


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("B, K, N, dtype, threshold, cfg", [
    (1, 100, 70, torch.float32, 0.0, SpmvConfig(32, 16, 4, 4)),
    (1, 257, 33, torch.float16, 0.6, SpmvConfig(64, 32, 4, 1)),
    (1, 301, 1100, torch.float32, 0.5, SpmvConfig(64, 16, 4, 1, prefetch=True)),  # 8 steps per split
    (1, 40, 24, torch.float16, 0.0, SpmvConfig(32, 16, 2, 1, prefetch=True)),
    (3, 96, 130, torch.float32, 0.3, SpmvConfig(64, 16, 4, 4)),
    (16, 64, 48, torch.float16, 0.5, SpmvConfig(32, 32, 4, 2)),
    (1, 301, 130, torch.float32, 0.5, SpmvConfig(64, 16, 2, 8, fused=True)),  # one launch, last program reduces
    (1, 128, 64, torch.float16, 0.0, SpmvConfig(64, 64, 2, 8, fused=True)),
    (1, 301, 130, torch.float32, 0.5, SpmvConfig(64, 16, 2, 8, compact=True)),  # compacted survivor list
    (1, 3000, 40, torch.float16, 0.0, SpmvConfig(16, 2048, 2, 1, compact=True)),  # 2 scan tiles per split
    (1, 77, 24, torch.float32, 5.0, SpmvConfig(32, 16, 2, 4, compact=True)),  # nothing survives: bias only
])
def test_triton_input_sparse_matches_reference_and_skips_rows(B, K, N, dtype, threshold, cfg):
    x, w_t, w_poisoned, bias = _spmv_inputs(B, K, N, dtype, threshold)
    ref = input_sparse_matvec_reference(x, w_t, threshold, bias)
    out = input_sparse_matvec_triton(x, w_poisoned, threshold, bias, config=cfg)
    assert out.shape == (B, N) and out.dtype == dtype
    assert torch.isfinite(out).all(), "the kernel read weight rows of dropped inputs"
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("B, H, I, dtype, cfg", [
    (1, 48, 90, torch.float32, GateUpConfig(16, 16, 4)),
    (1, 70, 33, torch.float16, GateUpConfig(8, 32, 2)),
    (5, 64, 40, torch.float32, GateUpConfig(16, 32, 4)),
    (16, 32, 50, torch.float16, GateUpConfig(16, 16, 4)),
])
def test_triton_gate_up_matches_reference_and_skips_rows(B, H, I, dtype, cfg):
    x, w_gate, w_up, w_up_poisoned, t = _gate_up_inputs(B, H, I, dtype)
    ref = gate_up_sparse_reference(x, w_gate, w_up, t)
    out = gate_up_sparse_triton(x, w_gate, w_up_poisoned, t, config=cfg)
    assert out.shape == (B, I) and out.dtype == dtype
    assert torch.isfinite(out).all(), "the kernel read up rows of dropped channels"
    assert (ref != 0).float().mean() < 0.9  # some channels were dropped
    assert _rel(out, ref) < TOL[dtype]


def test_triton_rejects_bad_shapes():
    x = torch.randn(17, 8)
    with pytest.raises(LmsqueezeError, match="at most 16"):
        input_sparse_matvec_triton(x, torch.randn(8, 4))
    with pytest.raises(LmsqueezeError, match="rows"):
        input_sparse_matvec_triton(torch.randn(1, 8), torch.randn(9, 4))
    with pytest.raises(LmsqueezeError, match="threshold"):
        input_sparse_matvec_triton(torch.randn(1, 8), torch.randn(8, 4), threshold=-1.0)
    with pytest.raises(LmsqueezeError, match="contiguous rows"):
        input_sparse_matvec_triton(torch.randn(1, 8), torch.randn(4, 8).t())


@pytest.fixture(params=["native", "torch-ops"])
def cpu_impl(request, monkeypatch):
    """Run a CPU test with the compiled kernels (skipped where no C compiler works) or the torch-ops path."""
    if request.param == "native":
        if cpu_native.library() is None:
            pytest.skip("no C compiler: the native CPU kernels are not built here")
    else:
        monkeypatch.setitem(cpu_native._STATE, "tried", True)
        monkeypatch.setitem(cpu_native._STATE, "lib", None)
    return request.param


@pytest.mark.parametrize("B, dtype", [(1, torch.float32), (4, torch.float32), (1, torch.bfloat16),
                                      (3, torch.bfloat16)])
def test_cpu_paths_match_reference_and_skip_rows(B, dtype, cpu_impl):
    x, w_t, w_poisoned, bias = _spmv_inputs(B, 300, 77, dtype, 0.4)
    out = input_sparse_matvec_cpu(x, w_poisoned, 0.4, bias)
    assert torch.isfinite(out).all() and out.dtype == dtype
    assert _rel(out, input_sparse_matvec_reference(x, w_t, 0.4, bias)) < TOL[dtype]

    x, w_gate, w_up, w_up_poisoned, t = _gate_up_inputs(B, 64, 150, dtype)
    h = gate_up_sparse_cpu(x, w_gate, w_up_poisoned, t)
    assert torch.isfinite(h).all() and h.dtype == dtype
    ref_h = gate_up_sparse_reference(x, w_gate, w_up, t)
    assert _rel(h, ref_h) < TOL[dtype]

    w_down_t = torch.randn(150, 64).to(dtype)
    w_down_t[torch.isnan(w_up_poisoned[:, 0])] = float("nan")  # rows of channels dropped everywhere
    y = sparse_mlp_cpu(x, w_gate, w_up_poisoned, w_down_t, t)
    assert torch.isfinite(y).all()
    ref_y = ref_h.float() @ torch.nan_to_num(w_down_t.float())
    assert _rel(y, ref_y) < 2 * TOL[dtype]


def test_cpu_path_all_dropped_gives_zeros_or_bias(cpu_impl):
    x = torch.randn(2, 16) * 0.01
    bias = torch.randn(5)
    out = input_sparse_matvec_cpu(x, torch.full((16, 5), float("nan")), 1.0, bias)
    torch.testing.assert_close(out, bias.expand(2, 5))


@pytest.mark.parametrize("cfg", [SpmvConfig(32, 16, 2, 8, fused=True), SpmvConfig(32, 16, 2, 8, compact=True)])
def test_fused_kernel_leaves_tickets_at_zero_across_calls(cfg):
    from lmsqueeze.methods.chess import kernels

    x, w_t, w_poisoned, bias = _spmv_inputs(1, 200, 72, torch.float32, 0.4)
    ref = input_sparse_matvec_reference(x, w_t, 0.4, bias)
    for _ in range(2):  # a second call would mis-reduce if the first left a ticket behind
        out = input_sparse_matvec_triton(x, w_poisoned, 0.4, bias, config=cfg)
        assert torch.isfinite(out).all() and _rel(out, ref) < TOL[torch.float32]
    assert int(kernels._TICKETS[x.device].abs().sum()) == 0


@pytest.mark.parametrize("K, N, dtype, threshold, cfg", [
    (301, 130, torch.float32, 0.5, SpmvConfig(64, 16, 2, 8, pipe=1)),  # odd sizes, ragged last split
    (301, 130, torch.float16, 0.5, SpmvConfig(32, 16, 2, 8, pipe=2)),
    (1000, 70, torch.float32, 0.3, SpmvConfig(64, 16, 2, 1, pipe=2)),  # one split: 63 steps through the pipeline
    (40, 24, torch.float32, 0.0, SpmvConfig(32, 16, 2, 1, pipe=2)),  # 3 steps: fewer than the pipeline is deep
    (10, 24, torch.float16, 0.4, SpmvConfig(32, 16, 2, 8, pipe=2)),  # a single, partial step
    (77, 24, torch.float32, 5.0, SpmvConfig(32, 16, 2, 4, pipe=1)),  # nothing survives: bias only
])
def test_pipelined_kernel_matches_reference_and_skips_rows(K, N, dtype, threshold, cfg):
    x, w_t, w_poisoned, bias = _spmv_inputs(1, K, N, dtype, threshold)
    ref = input_sparse_matvec_reference(x, w_t, threshold, bias)
    for _ in range(2):  # the second call checks that the tickets were left at 0
        out = input_sparse_matvec_triton(x, w_poisoned, threshold, bias, config=cfg)
        assert out.shape == (1, N) and out.dtype == dtype
        assert torch.isfinite(out).all(), "the kernel read weight rows of dropped inputs"
        assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("pipe", [1, 2])
def test_pipelined_kernel_dense_input_equals_dense_and_zero_input_gives_zero(pipe):
    K, N = 203, 96
    w_t = torch.randn(K, N)
    x = torch.randn(1, K)
    x[x == 0] = 1.0  # sparsity 0: every row is read
    cfg = SpmvConfig(32, 16, 2, 8, pipe=pipe)
    torch.testing.assert_close(input_sparse_matvec_triton(x, w_t, 0.0, None, config=cfg), x @ w_t,
                               rtol=1e-4, atol=1e-4)
    zero = input_sparse_matvec_triton(torch.zeros(1, K), torch.full((K, N), float("nan")), 0.0, None, config=cfg)
    assert torch.equal(zero, torch.zeros(1, N))


def test_pipe_depth_is_validated():
    with pytest.raises(LmsqueezeError, match="pipe"):
        input_sparse_matvec_triton(torch.randn(1, 8), torch.randn(8, 4), config=SpmvConfig(32, 16, 2, 1, pipe=3))


@pytest.mark.parametrize("K, N, dtype, threshold, cfg", [
    (301, 130, torch.float32, 0.5, SpmvConfig(64, 16, 2, 8, fused=True, tile_reduce=True)),  # 19 splits -> tile of 32
    (1000, 70, torch.float16, 0.3, SpmvConfig(32, 16, 2, 4, fused=True, tile_reduce=True)),
    (40, 24, torch.float32, 0.0, SpmvConfig(32, 16, 2, 1, fused=True, tile_reduce=True)),  # one split
    (301, 130, torch.float32, 0.5, SpmvConfig(32, 16, 2, 8, pipe=2, tile_reduce=True)),
    (77, 24, torch.float32, 5.0, SpmvConfig(32, 16, 2, 4, fused=True, tile_reduce=True)),  # nothing survives
    (1000, 70, torch.float16, 0.3, SpmvConfig(32, 16, 2, 4, fused=True, tile_reduce=True, evict=True)),
    (301, 512, torch.float32, 0.5, SpmvConfig(16, 16, 2, 1, fused=True, evict=True)),  # 4 splits of 5 steps
    (301, 512, torch.float32, 0.5, SpmvConfig(16, 16, 2, 1, fused=True, tile_reduce=True, xnext=True)),
    (333, 256, torch.float16, 0.3, SpmvConfig(16, 32, 2, 1, fused=True, evict=True, xnext=True)),  # 6 steps, odd K
])
def test_tile_reduce_matches_reference(K, N, dtype, threshold, cfg):
    from lmsqueeze.methods.chess import kernels

    x, w_t, w_poisoned, bias = _spmv_inputs(1, K, N, dtype, threshold)
    ref = input_sparse_matvec_reference(x, w_t, threshold, bias)
    for _ in range(2):
        out = input_sparse_matvec_triton(x, w_poisoned, threshold, bias, config=cfg)
        assert torch.isfinite(out).all(), "the kernel read weight rows of dropped inputs"
        assert _rel(out, ref) < TOL[dtype]
    assert int(kernels._TICKETS[x.device].abs().sum()) == 0


def test_tile_reduce_falls_back_to_the_loop_when_the_tile_is_too_large():
    from lmsqueeze.methods.chess.kernels import _red_splits

    assert _red_splits(SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True), 16) == 16
    assert _red_splits(SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True), 17) == 32
    assert _red_splits(SpmvConfig(64, 64, 2, 8, fused=True, tile_reduce=True), 200) == 0
    assert _red_splits(SpmvConfig(64, 64, 2, 8, fused=True), 16) == 0
