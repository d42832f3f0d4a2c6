"""GPU check and benchmark of CHESS's Triton sparse GEMVs and of a CHESS decode step (H100).

    LMSQUEEZE_GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/scripts/bench_chess_gpu.py --out $OUT

1. correctness on the GPU vs the float32 references (bf16 / fp16 / fp32, batch 1 and 4, Llama-3-8B and odd
   shapes), with the weight rows that no surviving activation needs set to NaN: a finite output proves the
   kernels never read them;
2. GEMVs at Llama-3-8B MLP shapes (down_proj 14336 -> 4096, q/o 4096 -> 4096, fused gate+up 4096 -> 14336),
   batch 1 (and 4), against dense cuBLAS (F.linear) in the same run. Both sides are CUDA graphs of one call
   per weight copy, rotating copies so the 50 MB L2 cannot serve repeats; CUDA events, median of 30
   replays after warm-up; bytes moved / measured copy bandwidth gives each kernel's floor;
3. a decode step of a Llama-3-8B-shaped model (random weights, all 32 layers, bf16), lmsqueeze's static
   decode step (`lmsqueeze.apply` + SqueezeCache) replayed as one CUDA graph, Dense vs CHESS(0.5) calibrated
   on random tokens (dense timed before and after), with the logits of the sparse kernels checked against
   CHESS's masked dense math, and the activation sparsity actually reached in the timed step.
Writes chess_gpu_h100.json under --out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze  # noqa: E402
from lmsqueeze.bench.device import measure_copy_bandwidth  # noqa: E402
from lmsqueeze.bench.results import command_line, timing_row, write_result  # noqa: E402
from lmsqueeze.bench.timing import time_cuda  # noqa: E402
from lmsqueeze.methods.chess import CHESS, SparseLinear, SparseMLP  # noqa: E402
from lmsqueeze.methods.chess import kernels as K  # noqa: E402
from lmsqueeze.methods.chess.reference import gate_up_sparse_reference, input_sparse_matvec_reference  # noqa: E402

DEV = torch.device("cuda")
ROTATE_BYTES = 300e6
ITERS = 30
PRESET = "llama3-8b"
MLP = (4096, 14336)  # hidden, intermediate (Llama-3-8B)
ODD = (1000, 300)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sparse_x(B: int, n: int, s: float, dtype) -> torch.Tensor:
    """[B, n] random values with a fraction s of exact zeros (independent per row)."""
    x = torch.randn(B, n, device=DEV)
    return (x * (torch.rand(B, n, device=DEV) >= s)).to(dtype)


# 1. correctness ----------------------------------------------------------------------------------------
def check_kernels() -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for B in (1, 4):
            for (Kd, N) in ((MLP[1], MLP[0]), ODD):
                x = torch.randn(B, Kd, device=DEV).to(dtype)
                thr = 0.67  # ~50% of |N(0,1)| below
                w_t = (torch.randn(Kd, N, device=DEV) * 0.02).to(dtype)
                bias = torch.randn(N, device=DEV).to(dtype)
                ref = input_sparse_matvec_reference(x, w_t, thr, bias)
                dead = (x.float().abs() <= thr).all(0)
                w_t[dead] = float("nan")
                cfgs = (K.SPMV_CONFIGS_B1[0], K.SpmvConfig(128, 64, 4, 4, True), K.SPMV_CONFIGS_COMPACT[0],
                        *K.SPMV_CONFIGS_PIPE[:3], K.SpmvConfig(256, 16, 4, 4, pipe=2), *K.SPMV_CONFIGS_TILE_REDUCE,
                        K.SPMV_CONFIGS_B1[0], *K.SPMV_CONFIGS_FUSED_SWEEP[:3]) if B == 1 else K.SPMV_CONFIGS_DOT[:1]
                for cfg in cfgs:  # explicit configs: no tile search here
                    try:
                        y = K.input_sparse_matvec_triton(x, w_t, thr, bias, config=cfg)
                    except Exception as e:  # noqa: BLE001 - recorded as a failed check, the others still run
                        rows.append({"kernel": "input_sparse_matvec", "dtype": str(dtype), "batch": B, "K": Kd,
                                     "N": N, "config": str(cfg), "rel_err": float("nan"), "ok": False,
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                        continue
                    rows.append({"kernel": "input_sparse_matvec", "dtype": str(dtype), "batch": B, "K": Kd, "N": N,
                                 "config": str(cfg), "rel_err": rel(y, ref), "finite": bool(torch.isfinite(y).all()),
                                 "rows_skipped": float(dead.float().mean()),
                                 "ok": bool(torch.isfinite(y).all()) and rel(y, ref) < TOL[dtype]})
                del w_t
            for (H, I) in (MLP, ODD[::-1]):
                x = torch.randn(B, H, device=DEV).to(dtype)
                wg = (torch.randn(I, H, device=DEV) / H**0.5).to(dtype)
                wu = (torch.randn(I, H, device=DEV) * 0.02).to(dtype)
                a = F.silu(x.float() @ wg.float().t())
                t = a.abs().median(0).values.float() * (0.6 + 0.8 * torch.rand(I, device=DEV))
                near = ((a.abs() - t).abs() < 0.03 * t + 1e-3).any(0)
                t[near] = float("inf")  # no activation within rounding of its threshold
                ref = gate_up_sparse_reference(x, wg, wu, t)
                dead = (a.abs() <= t).all(0)
                wu[dead] = float("nan")
                cfg = (K.GATE_UP_CONFIGS_B1 if B == 1 else K.GATE_UP_CONFIGS_DOT)[0]
                h = K.gate_up_sparse_triton(x, wg, wu, t, config=cfg)
                rows.append({"kernel": "gate_up_sparse", "dtype": str(dtype), "batch": B, "H": H, "I": I,
                             "rel_err": rel(h, ref), "finite": bool(torch.isfinite(h).all()),
                             "rows_skipped": float(dead.float().mean()),
                             "ok": bool(torch.isfinite(h).all()) and rel(h, ref) < TOL[dtype]})
                del wg, wu
    torch.cuda.empty_cache()
    return rows


# 2. GEMVs ------------------------------------------------------------------------------------------------
def _copies(nbytes: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / nbytes))


def gemv_rows(bw: float) -> list[dict]:
    rows = []
    dt = torch.bfloat16
    H, I = MLP
    for name, Kd, N, B, s in (("down_proj", I, H, 1, 0.5), ("down_proj", I, H, 1, 0.0), ("down_proj", I, H, 1, 0.7),
                              ("down_proj", I, H, 4, 0.5), ("q_proj/o_proj", H, H, 1, 0.5)):
        n = _copies(Kd * N * 2)
        ws = [(torch.randn(N, Kd, device=DEV) * 0.02).to(dt) for _ in range(n)]
        wts = [w.t().contiguous() for w in ws]
        x = sparse_x(B, Kd, s, dt)
        outs = [None]

        def dense():
            for w in ws:
                outs[0] = F.linear(x, w)

        def sparse():
            for wt in wts:
                outs[0] = K.input_sparse_matvec_triton(x, wt)

        sparse()  # picks the tile config (timed candidates) outside any graph
        err = rel(K.input_sparse_matvec_triton(x, wts[0]), F.linear(x.float(), ws[0].float()))
        td = time_cuda(dense, warmup=5, iters=ITERS, calls_per_iter=n)
        ts = time_cuda(sparse, warmup=5, iters=ITERS, calls_per_iter=n)
        need = int((x != 0).any(0).sum())
        b_dense, b_sparse = Kd * N * 2, need * N * 2
        key = [k for k in K._CHOICE if k[0] == "spmv" and k[1] == Kd and k[2] == N and k[3] == (1 if B == 1 else 16)]
        rows.append(timing_row("chess-triton", ts, baseline="cublas-dense", baseline_timing=td, bytes_moved=b_sparse,
                               peak_tb_per_s=bw, kernel=name, K=Kd, N=N, batch=B, sparsity=s,
                               rows_read_frac=need / Kd, rel_err_vs_fp32=err,
                               dense_tb_per_s=b_dense / (td.median_ms * 1e-3) / 1e12,
                               dense_floor_ms=b_dense / (bw * 1e12) * 1e3,
                               config=str(K._CHOICE.get(key[0])) if key else None))
        ws = wts = None  # free before the next shape
        torch.cuda.empty_cache()

    # fused gate + threshold + up (CHESS's up_proj reads only surviving rows) vs two cuBLAS GEMVs + SiLU*mul,
    # and the whole MLP (+ input-sparse down) vs the dense MLP.
    n = _copies(3 * I * H * 2)
    mats = [tuple((torch.randn(I, H, device=DEV) * s_).to(dt) for s_ in (H**-0.5, 0.02)) + (
        (torch.randn(H, I, device=DEV) * 0.02).to(dt),) for _ in range(n)]
    wdts = [m[2].t().contiguous() for m in mats]
    x = torch.randn(1, H, device=DEV).to(dt)
    a = F.silu(x.float() @ mats[0][0].float().t())
    t = torch.full((I,), float(a.abs().median()), device=DEV)  # half of this row's channels survive
    outs = [None]

    def dense_gu():
        for wg, wu, _ in mats:
            outs[0] = F.silu(F.linear(x, wg)) * F.linear(x, wu)

    def sparse_gu():
        for wg, wu, _ in mats:
            outs[0] = K.gate_up_sparse_triton(x, wg, wu, t)

    def dense_mlp():
        for wg, wu, wd in mats:
            outs[0] = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def sparse_mlp():
        for (wg, wu, _), wdt in zip(mats, wdts):
            outs[0] = K.input_sparse_matvec_triton(K.gate_up_sparse_triton(x, wg, wu, t), wdt)

    sparse_gu()
    sparse_mlp()
    kept = int((a.abs() > t).sum())
    ref_mlp = gate_up_sparse_reference(x, mats[0][0], mats[0][1], t).float() @ mats[0][2].float().t()
    sp_mlp = K.input_sparse_matvec_triton(K.gate_up_sparse_triton(x, mats[0][0], mats[0][1], t), wdts[0])
    for name, fd, fs, b_dense, b_sparse, err in (
            ("gate+up", dense_gu, sparse_gu, 2 * I * H * 2, (I + kept) * H * 2,
             rel(K.gate_up_sparse_triton(x, mats[0][0], mats[0][1], t),
                 gate_up_sparse_reference(x, mats[0][0], mats[0][1], t))),
            ("mlp", dense_mlp, sparse_mlp, 3 * I * H * 2, (I + 2 * kept) * H * 2, rel(sp_mlp, ref_mlp))):
        td = time_cuda(fd, warmup=5, iters=ITERS, calls_per_iter=n)
        ts = time_cuda(fs, warmup=5, iters=ITERS, calls_per_iter=n)
        rows.append(timing_row("chess-triton", ts, baseline="cublas-dense", baseline_timing=td, bytes_moved=b_sparse,
                               peak_tb_per_s=bw, kernel=name, K=H, N=I, batch=1, sparsity=1 - kept / I,
                               rows_read_frac=kept / I, rel_err_vs_fp32=err,
                               dense_tb_per_s=b_dense / (td.median_ms * 1e-3) / 1e12,
                               dense_floor_ms=b_dense / (bw * 1e12) * 1e3))
    mats = wdts = None
    torch.cuda.empty_cache()
    return rows


# 2b. tile / variant sweep ------------------------------------------------------------------------------------
SWEEP_CONFIGS = (  # the default first, v3's next best (chess_gpu_h100_v3.json), one compact, the one-tile reduction,
    # and v4's three fastest pipelined variants (chess_gpu_h100_v4.json: all pipelined ones were slower than the default)
    K.SPMV_CONFIGS_B1[0], K.SpmvConfig(64, 64, 2, 8), K.SpmvConfig(64, 128, 4, 4, fused=True),
    K.SPMV_CONFIGS_COMPACT[0], *K.SPMV_CONFIGS_TILE_REDUCE, K.SpmvConfig(64, 32, 2, 8, pipe=2),
    K.SpmvConfig(128, 32, 4, 4, pipe=2), K.SpmvConfig(128, 16, 2, 8, pipe=2), K.SPMV_CONFIGS_B1[1], K.SPMV_CONFIGS_B1[2],
    *K.SPMV_CONFIGS_FUSED_SWEEP,
)


def sweep_rows(bw: float) -> list[dict]:
    """Every batch-1 candidate of SWEEP_CONFIGS, timed as a CUDA graph against cuBLAS in the same run, at
    down_proj (14336 -> 4096) and q/o (4096 -> 4096), 50% sparsity, bf16; each config's output is checked
    (rows no survivor needs are NaN: a finite output proves they were skipped). The graph-timed best config
    becomes the choice for that shape in the later parts (gemv, decode). At down_proj the default and the
    best are then timed again at 30% and 70% sparsity (same run, same cuBLAS baseline)."""
    rows = []
    dt = torch.bfloat16
    H, I = MLP
    for name, Kd, N in (("down_proj", I, H), ("q_proj/o_proj", H, H)):
        n = _copies(Kd * N * 2)
        ws = [(torch.randn(N, Kd, device=DEV) * 0.02).to(dt) for _ in range(n)]
        wts = [w.t().contiguous() for w in ws]
        outs = [None]

        def dense():
            for w in ws:
                outs[0] = F.linear(x, w)

        x = sparse_x(1, Kd, 0.5, dt)
        td = time_cuda(dense, warmup=5, iters=ITERS, calls_per_iter=n)
        best = (None, float("inf"))
        for s, cfgs in ((0.5, SWEEP_CONFIGS), (0.3, None), (0.7, None)):
            if cfgs is None:  # the default and the best of the 50% sweep, at another sparsity
                if name != "down_proj" or best[0] is None:
                    continue
                cfgs = tuple(dict.fromkeys((SWEEP_CONFIGS[0], best[0])))
                x = sparse_x(1, Kd, s, dt)
                td = time_cuda(dense, warmup=5, iters=ITERS, calls_per_iter=n)
            need = int((x != 0).any(0).sum())
            ref = F.linear(x.float(), ws[0].float())
            w_nan = wts[0].clone()
            w_nan[(x == 0).all(0)] = float("nan")
            for cfg in cfgs:
                try:
                    y = K.input_sparse_matvec_triton(x, w_nan, 0.0, None, config=cfg)
                    err, finite = rel(y, ref), bool(torch.isfinite(y).all())

                    def sparse(cfg=cfg):
                        for wt in wts:
                            outs[0] = K.input_sparse_matvec_triton(x, wt, 0.0, None, config=cfg)

                    ts = time_cuda(sparse, warmup=5, iters=ITERS, calls_per_iter=n)
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is recorded and skipped
                    rows.append({"kernel": name, "sparsity": s, "config": str(cfg),
                                 "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                ok = finite and err < TOL[dt]
                rows.append(timing_row("chess-triton", ts, baseline="cublas-dense", baseline_timing=td,
                                       bytes_moved=need * N * 2, peak_tb_per_s=bw, kernel=name, K=Kd, N=N, batch=1,
                                       sparsity=s, rows_read_frac=need / Kd, config=str(cfg), rel_err_vs_fp32=err,
                                       finite=finite, ok=ok, is_default=cfg == SWEEP_CONFIGS[0]))
                if s == 0.5 and ok and ts.median_ms < best[1]:
                    best = (cfg, ts.median_ms)
            if s == 0.5:
                if best[0] is not None:
                    K._CHOICE[("spmv", Kd, N, 1, dt, dt, x.device)] = best[0]
                print(f"[sweep] {name}: dense {td.median_ms * 1e3:.1f} us, best {best[0]} {best[1] * 1e3:.1f} us "
                      f"({td.median_ms / best[1]:.3f}x)", flush=True)
        ws = wts = w_nan = None
        torch.cuda.empty_cache()
    return rows


# 2c. repeated default-vs-cuBLAS measurement ------------------------------------------------------------------
def repeat_rows(bw: float, repeats: int = 9) -> list[dict]:
    """The batch-1 default config (SPMV_CONFIGS_B1[0]) at down_proj 50% against cuBLAS, `repeats` times with a
    fresh random input each time (a new 50% mask), each a same-run pair of graph timings (median of 30 replays);
    the spread of these ratios is the run-to-run noise of the headline number."""
    rows = []
    dt = torch.bfloat16
    H, I = MLP
    n = _copies(I * H * 2)
    ws = [(torch.randn(H, I, device=DEV) * 0.02).to(dt) for _ in range(n)]
    wts = [w.t().contiguous() for w in ws]
    cfg = K.SPMV_CONFIGS_B1[0]
    outs = [None]
    for r in range(repeats):
        x = sparse_x(1, I, 0.5, dt)

        def dense():
            for w in ws:
                outs[0] = F.linear(x, w)

        def sparse():
            for wt in wts:
                outs[0] = K.input_sparse_matvec_triton(x, wt, 0.0, None, config=cfg)

        err = rel(K.input_sparse_matvec_triton(x, wts[0], 0.0, None, config=cfg), F.linear(x.float(), ws[0].float()))
        td = time_cuda(dense, warmup=5, iters=ITERS, calls_per_iter=n)
        ts = time_cuda(sparse, warmup=5, iters=ITERS, calls_per_iter=n)
        need = int((x != 0).any(0).sum())
        rows.append(timing_row("chess-triton", ts, baseline="cublas-dense", baseline_timing=td, bytes_moved=need * H * 2,
                               peak_tb_per_s=bw, kernel="down_proj", K=I, N=H, batch=1, sparsity=0.5, repeat=r,
                               rows_read_frac=need / I, config=str(cfg), rel_err_vs_fp32=err, ok=err < TOL[dt]))
    ws = wts = None
    torch.cuda.empty_cache()
    ratios = sorted(r["speedup"] for r in rows)
    print(f"[repeat] down_proj 50% default vs cuBLAS, {repeats} pairs: median {ratios[len(ratios) // 2]:.3f}x, "
          f"min {ratios[0]:.3f}x, max {ratios[-1]:.3f}x", flush=True)
    return rows


# 3. decode step --------------------------------------------------------------------------------------------
def _sparsity_probe(model):
    """Hooks that record, for the next forward, the fraction of weight bytes each sparse module can skip."""
    stats = {"skipped_bytes": 0, "mlp_keep": [], "q_keep": [], "o_keep": []}
    handles = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if isinstance(mlp, SparseMLP):
            def pre_mlp(m, args):
                x = args[0].reshape(-1, args[0].shape[-1])
                a = m.act_fn(F.linear(x, m.gate_proj.weight))
                keep = (a.abs() > m.thresholds).any(0).float().mean().item()
                stats["mlp_keep"].append(keep)
                w = m.up_proj.weight
                stats["skipped_bytes"] += (1 - keep) * 2 * w.numel() * w.element_size()
            handles.append(mlp.register_forward_pre_hook(pre_mlp))
        for name in ("q_proj", "o_proj"):
            mod = getattr(layer.self_attn, name)
            if isinstance(mod, SparseLinear):
                def pre_lin(m, args, name=name):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    keep = (x.float().abs() > m.threshold).any(0).float().mean().item()
                    stats[name[0] + "_keep"].append(keep)
                    w = m.weight
                    stats["skipped_bytes"] += (1 - keep) * w.numel() * w.element_size()
                handles.append(mod.register_forward_pre_hook(pre_lin))
    return stats, handles


def _module_errors(model, step) -> dict:
    """Max over layers of rel. error between each sparse module's kernel path and its masked dense math, on the
    inputs the module sees in the decode step (bf16 rounding of the gate can flip channels at the threshold)."""
    inputs, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("mlp", layer.mlp), ("q_proj", layer.self_attn.q_proj), ("o_proj", layer.self_attn.o_proj)):
            if isinstance(mod, (SparseMLP, SparseLinear)):
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, key=(i, name): inputs.__setitem__(key, (m, args[0].clone()))))
    step()
    for h in handles:
        h.remove()
    worst: dict = {}
    for (i, name), (mod, x) in inputs.items():
        fast = mod(x)
        rows = mod.max_kernel_rows
        mod.max_kernel_rows = 0
        ref = mod(x)
        mod.max_kernel_rows = rows
        worst[name] = max(worst.get(name, 0.0), rel(fast, ref))
    return worst


def decode_rows(bw: float, num_layers: int, length: int) -> tuple[list[dict], dict]:
    from lmsqueeze.bench.model import decode_inputs, decode_step_bytes
    from lmsqueeze.bench.presets import build_random_model

    t0 = time.time()
    model = build_random_model(PRESET, torch.bfloat16, DEV, num_layers=num_layers)
    info = {"build_s": time.time() - t0, "num_layers": num_layers, "length": length,
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    gen = torch.Generator(device=DEV).manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (1, 512), generator=gen, device=DEV) for _ in range(4)]
    t0 = time.time()
    art = CHESS(sparsity=0.5).calibrate(model, batches)
    info["calibrate_s"] = time.time() - t0
    # The cache holds a prefill of `length` random tokens (same distribution as the calibration batches), so
    # the decode step's activations (the o_proj input especially) look like what the thresholds were fit on.
    with torch.no_grad(), lmsqueeze.apply(model) as session:
        cache = session.new_cache(batch_size=1, max_length=length + 1)
        prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=gen, device=DEV)
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.start_static(torch.zeros(1, dtype=torch.int32, device=DEV))
    ids, pos = decode_inputs(model, 1, length)

    def step() -> torch.Tensor:
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits

    rows = []
    with torch.no_grad():
        with lmsqueeze.apply(model):
            dense_logits = step().float().clone()
            td = time_cuda(step, warmup=5, iters=ITERS)
        mem0 = torch.cuda.memory_allocated()
        with lmsqueeze.apply(model, art):
            info["extra_bytes_after_install"] = torch.cuda.memory_allocated() - mem0
            stats, handles = _sparsity_probe(model)
            step()
            for h in handles:
                h.remove()
            info["module_rel_err_kernels_vs_masked"] = _module_errors(model, step)
            sparse_logits = step().float().clone()
            ts = time_cuda(step, warmup=5, iters=ITERS)
        art.method.max_kernel_rows = 0  # CHESS's masked dense math: the same function, every weight read
        with lmsqueeze.apply(model, art):
            masked_logits = step().float().clone()
        art.method.max_kernel_rows = K.MAX_KERNEL_BATCH
        with lmsqueeze.apply(model):
            td2 = time_cuda(step, warmup=5, iters=ITERS)
    dense_bytes = decode_step_bytes(model, 1, length)
    sparse_bytes = dense_bytes - int(stats["skipped_bytes"])
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    common = dict(preset=PRESET, num_layers=num_layers, batch=1, length=length, sparsity=0.5,
                  mlp_keep=mean(stats["mlp_keep"]), q_keep=mean(stats["q_keep"]), o_keep=mean(stats["o_keep"]),
                  logits_rel_err_vs_masked_dense=rel(sparse_logits, masked_logits),
                  logits_rel_change_vs_dense=rel(sparse_logits, dense_logits),
                  dense_bytes=dense_bytes, dense_floor_ms=dense_bytes / (bw * 1e12) * 1e3)
    rows.append(timing_row("chess-graph", ts, baseline="dense-graph", baseline_timing=td, bytes_moved=sparse_bytes,
                           peak_tb_per_s=bw, **common))
    rows.append(timing_row("dense-graph (again)", td2, baseline="dense-graph", baseline_timing=td,
                           bytes_moved=dense_bytes, peak_tb_per_s=bw, **{k: common[k] for k in
                                                                            ("preset", "num_layers", "batch", "length")}))
    model = cache = None
    torch.cuda.empty_cache()
    return rows, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: check,sweep,gemv,repeat,decode")
    ap.add_argument("--name", default="chess_gpu_h100.json", help="result file name under --out")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter): a dry run")
    args = ap.parse_args()
    if args.smoke:
        _smoke()
    skip = set(filter(None, args.skip.split(",")))
    bw = measure_copy_bandwidth(DEV) or 3.0
    print(f"copy bandwidth {bw:.2f} TB/s", flush=True)
    extra: dict = {"copy_tb_per_s": bw, "errors": {}}
    rows: list[dict] = []
    out = args.out / args.name

    def save():
        write_result(out, "chess_gpu", command_line(), rows, extra, device=DEV)

    parts = (("check", lambda: extra.__setitem__("checks", check_kernels())),
             ("sweep", lambda: extra.__setitem__("sweep", sweep_rows(bw))),
             ("gemv", lambda: rows.extend(gemv_rows(bw))),
             ("repeat", lambda: extra.__setitem__("repeat", repeat_rows(bw))),
             ("decode", lambda: _decode(rows, extra, bw, args.layers, args.length)))
    for name, fn in parts:
        if name in skip:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # keep the other parts' results
            traceback.print_exc()
            extra["errors"][name] = f"{type(e).__name__}: {e}"[:500]
        print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
        save()
    extra["tile_choices"] = {str(k[:-1]): str(v) for k, v in K._CHOICE.items()}
    save()

    checks = extra.get("checks", [])
    print(f"\ncorrectness: {sum(c['ok'] for c in checks)}/{len(checks)} ok; worst rel err "
          f"{max((c['rel_err'] for c in checks), default=float('nan')):.2e}")
    for c in checks:
        if not c["ok"]:
            print("  FAILED", c)
    print(f"\n{'kernel/step':<22}{'B':>3}{'s':>6}{'read':>7}{'dense ms':>11}{'sparse ms':>11}{'speedup':>9}"
          f"{'TB/s sp':>9}{'floor sp':>10}")
    for r in rows:
        name = r.get("kernel", r["method"])
        print(f"{name:<22}{r['batch']:>3}{r.get('sparsity', 0):>6.2f}{r.get('rows_read_frac', r.get('mlp_keep')) or 0:>7.2f}"
              f"{r.get('baseline_ms', float('nan')):>11.4f}{r['ms']:>11.4f}{r.get('speedup', float('nan')):>9.3f}"
              f"{r.get('tb_per_s', float('nan')):>9.2f}{r.get('floor_ms', float('nan')):>10.4f}")
    sweep = [r for r in extra.get("sweep", []) if "ms" in r]
    for kern in dict.fromkeys(r["kernel"] for r in sweep):
        for s in (0.5, 0.3, 0.7):
            mine = [r for r in sweep if r["kernel"] == kern and r["sparsity"] == s]
            top = sorted((r for r in mine if r["ok"]), key=lambda r: r["ms"])[:8]
            if not mine:
                continue
            print(f"\nsweep {kern} s={s} (top {len(top)} of {len(mine)}; cuBLAS {top[0]['baseline_ms']:.4f} ms)"
                  if top else f"\nsweep {kern} s={s}: no valid config")
            for r in top:
                print(f"  {r['ms']:.4f} ms  {r['speedup']:.3f}x  {r['tb_per_s']:.2f} TB/s  "
                      f"{'[default] ' if r['is_default'] else ''}{r['config'][10:]}")
    print("errors:", extra["errors"] or "none")


def _smoke() -> None:
    """Dry run on this CPU: tiny shapes, Triton interpreter, perf_counter timing (numbers meaningless)."""
    import os

    global DEV, ROTATE_BYTES, PRESET, MLP, ODD, time_cuda
    os.environ["TRITON_INTERPRET"] = "1"
    from lmsqueeze.bench.timing import time_cpu

    DEV, ROTATE_BYTES, PRESET, MLP, ODD = torch.device("cpu"), 1e4, "tiny", (64, 128), (40, 24)
    time_cuda = lambda fn, warmup, iters, calls_per_iter=1, use_graph=True: time_cpu(  # noqa: E731
        fn, 1, 20, calls_per_iter)


def _decode(rows, extra, bw, layers, length):
    r, info = decode_rows(bw, layers, length)
    rows.extend(r)
    extra["decode"] = info


if __name__ == "__main__":
    main()
