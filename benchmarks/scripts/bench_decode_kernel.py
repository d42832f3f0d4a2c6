"""GPU check and benchmark of lmsqueeze's Triton decode attention against torch SDPA.

    python benchmarks/scripts/bench_decode_kernel.py --out $OUT [--commit HASH] [--sweep]

1. correctness vs the float32 reference on fresh random inputs (bf16/fp16/fp32, GQA 1/4, D 64/128,
   batch 3 with different lengths/starts, window, LSE), and a CUDA-graph replay after changing `lengths`;
2. optional sweep of kernel configs (BLOCK_N, warps, stages, programs per SM) at batch 1;
3. timing at the Llama-3-8B attention shape (Hq=32, Hkv=8, D=128, bf16), batch 1 and 8, 8K/32K/128K:
   ours (S_max = L, and S_max = 2L) vs F.scaled_dot_product_attention(enable_gqa=True) over exactly the
   valid length. Everything is timed inside CUDA graphs (20 calls per graph, CUDA events, median of 30
   replays after warm-up), rotating input sets so the L2 cache never holds the data.
Writes decode_kernel_h100.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

da = importlib.import_module("lmsqueeze.kernels.decode_attention")  # the module, not the re-exported function
from lmsqueeze.kernels.reference import decode_attention_reference

PEAK_TBPS = 3.0
CALLS_PER_GRAPH = 20
REPLAYS = 30
ROTATE_BYTES = 200e6  # enough distinct input bytes per graph that the 50 MB L2 cannot serve repeats


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def git_commit() -> str:
    """The commit of the code that runs ($LMSQUEEZE_GIT_COMMIT on a copied tree, else git)."""
    from lmsqueeze.bench.results import git_state

    return git_state()[0]


def time_graph(calls: list) -> dict:
    """Capture CALLS_PER_GRAPH calls (cycling through `calls`) in one graph; ms per call, median of replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            calls[i % len(calls)]()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GRAPH)
    times.sort()
    del graph
    return {"ms": statistics.median(times), "ms_p10": times[len(times) // 10], "ms_p90": times[-len(times) // 10]}


def copy_tbps() -> float:
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_graph([lambda: dst.copy_(src)])["ms"]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------- checks
def correctness() -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    cases = [  # (dtype, G, D, window, S_max, num_splits)
        (torch.bfloat16, 4, 128, None, 5003, None),
        (torch.bfloat16, 4, 128, 777, 5003, 7),
        (torch.bfloat16, 1, 64, None, 3001, None),
        (torch.bfloat16, 8, 128, 100, 2049, 3),
        (torch.float16, 4, 64, None, 4099, None),
        (torch.float32, 4, 128, 300, 3001, None),
        (torch.bfloat16, 2, 256, None, 1500, None),
        (torch.bfloat16, 4, 96, 64, 1500, None),
    ]
    for dtype, G, D, window, s_max, splits in cases:
        B, Hkv = 3, 2
        q = torch.randn(B, Hkv * G, D, device="cuda", generator=g).to(dtype)
        big = torch.randn(B, Hkv, s_max + 5, D, device="cuda", generator=g).to(dtype)
        k = big[:, :, :s_max]  # strided view of a larger buffer
        v = torch.randn(B, Hkv, s_max, D, device="cuda", generator=g).to(dtype)
        lengths = torch.tensor([s_max, 1, s_max // 2 + 1], dtype=torch.int32, device="cuda")
        starts = torch.tensor([0, 0, 17], dtype=torch.int32, device="cuda")
        out, lse = da.decode_attention(q, k, v, lengths, D ** -0.5, starts, window, splits, return_lse=True)
        ref, ref_lse = decode_attention_reference(q, k, v, lengths, D ** -0.5, starts, window, return_lse=True)
        err = rel_err(out, ref)
        lse_err = (lse - ref_lse).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = bool(torch.isfinite(out).all()) and err < tol and lse_err < 1e-2
        rows.append({"check": "vs_reference", "dtype": str(dtype).split(".")[-1], "G": G, "D": D,
                     "window": window, "s_max": s_max, "num_splits": splits, "rel_err": err,
                     "lse_max_abs_err": lse_err, "ok": ok})
    rows.append(graph_replay_check(g))
    return rows


def graph_replay_check(g: torch.Generator) -> dict:
    """Capture once at one set of lengths, change `lengths` in place, replay: result follows the new lengths."""
    B, Hkv, G, D, s_max = 2, 8, 4, 128, 8192
    q = torch.randn(B, Hkv * G, D, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(B, Hkv, s_max, D, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(B, Hkv, s_max, D, device="cuda", generator=g).to(torch.bfloat16)
    lengths = torch.tensor([100, 8000], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        da.decode_attention(q, k, v, lengths, D ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k, v, lengths, D ** -0.5)
    errs = []
    for new in ([100, 8000], [8192, 1], [3333, 4097]):
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))  # poison: the replay must rewrite every element
        graph.replay()
        errs.append(rel_err(out, decode_attention_reference(q, k, v, lengths, D ** -0.5)))
    return {"check": "cuda_graph_replay_new_lengths", "rel_errs": errs, "ok": max(errs) < 2e-2}


# ----------------------------------------------------------------------------------------------- timing
def make_sets(B: int, L: int, s_max_factor: int, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16):
    per_set = 2 * B * Hkv * L * D * 2
    n = max(1, min(8, math.ceil(ROTATE_BYTES / per_set)))
    sets = []
    for _ in range(n):
        q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Hkv, s_max_factor * L, D, device="cuda", dtype=dtype)
        v = torch.randn(B, Hkv, s_max_factor * L, D, device="cuda", dtype=dtype)
        sets.append((q, k, v))
    return sets


def bytes_moved(B: int, L: int, Hq=32, Hkv=8, D=128, elem=2) -> int:
    return 2 * B * Hkv * L * D * elem + 2 * B * Hq * D * elem


def row(name: str, B: int, L: int, s_max: int, t: dict, **extra) -> dict:
    nbytes = bytes_moved(B, L)
    tbps = nbytes / (t["ms"] * 1e-3) / 1e12
    return {"impl": name, "batch": B, "length": L, "s_max": s_max, **t, "bytes": nbytes, "tbps": tbps,
            "frac_of_3tbps": tbps / PEAK_TBPS, **extra}


def time_ours(sets, B, L, **kw) -> dict:
    lengths = torch.full((B,), L, dtype=torch.int32, device="cuda")
    calls = [lambda q=q, k=k, v=v: da.decode_attention_triton(q, k, v, lengths, 128 ** -0.5, **kw)
             for q, k, v in sets]
    return time_graph(calls)


def time_sdpa(sets, L) -> dict:
    calls = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
             for q, k, v in ((q, k[:, :, :L].contiguous(), v[:, :, :L].contiguous()) for q, k, v in sets)]
    return time_graph(calls)


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    found = {}
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
               SDPBackend.MATH):
        try:
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
            found[be.name] = True
        except Exception as e:  # noqa: BLE001
            found[be.name] = f"no: {type(e).__name__}"
    return found


SWEEP = [  # (block_n, num_warps, num_stages, programs_per_sm); the first is the library default
    (64, 4, 3, 2), (64, 4, 2, 2), (64, 4, 4, 2), (32, 4, 3, 2), (32, 4, 4, 2), (128, 4, 2, 2),
    (128, 8, 3, 2), (64, 4, 2, 4), (64, 4, 3, 4), (64, 4, 3, 1), (64, 4, 3, 3), (32, 4, 4, 4),
]


def sweep(sms: int) -> list[dict]:
    rows = []
    for L in (8192, 32768, 131072):
        sets = make_sets(1, L, 1)
        lengths = torch.full((1,), L, dtype=torch.int32, device="cuda")
        q, k, v = sets[0]
        ref = decode_attention_reference(q, k, v, lengths, 128 ** -0.5)
        for bn, nw, ns, pps in SWEEP:
            kw = {"block_n": bn, "num_warps": nw, "num_stages": ns,
                      "num_splits": da.default_num_splits(1, 8, L, bn, sms, pps)}
            err = rel_err(da.decode_attention_triton(q, k, v, lengths, 128 ** -0.5, **kw), ref)
            t = time_ours(sets, 1, L, **kw)
            rows.append(row("ours_sweep", 1, L, L, t, block_n=bn, num_warps=nw, num_stages=ns,
                            programs_per_sm=pps, num_splits=kw["num_splits"], rel_err=err))
            print(f"sweep L={L:6d} bn={bn:3d} w={nw} st={ns} pps={pps} splits={kw['num_splits']:3d} "
                  f"{t['ms'] * 1e3:8.1f} us {rows[-1]['tbps']:.2f} TB/s err={err:.1e}", flush=True)
        del sets, ref
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    import transformers
    import triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git_commit": args.commit or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "sm_count": sms,
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "shape": {"Hq": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16"},
        "timing": f"CUDA graph of {CALLS_PER_GRAPH} calls, CUDA events, median of {REPLAYS} replays / "
                  f"{CALLS_PER_GRAPH} after 3 warm-up replays; inputs rotated over >= {ROTATE_BYTES / 1e6:.0f} MB",
        "bytes": "K+V of the valid length + q + out (bf16); ours' fp32 partials not counted",
        "defaults": {"block_n": da.default_block_n(128, torch.bfloat16), "programs_per_sm": da.PROGRAMS_PER_SM},
    }
    result["copy_tbps_measured"] = copy_tbps()  # torch copy_ of 1 GiB fp32, read + write
    result["sdpa_backends_gqa"] = sdpa_backends()
    result["correctness"] = correctness()
    for c in result["correctness"]:
        print("check", json.dumps(c), flush=True)
    if args.sweep:
        result["sweep"] = sweep(sms)
    rows = []
    for B in (1, 8):
        for L in (8192, 32768, 131072):
            sets = make_sets(B, L, 2)  # S_max = 2L buffers; the exact case uses views [:, :, :L]
            t_sdpa = time_sdpa(sets, L)
            torch.cuda.empty_cache()
            exact = [(q, k[:, :, :L], v[:, :, :L]) for q, k, v in sets]
            t_ours = time_ours(exact, B, L)
            t_ours2 = time_ours(sets, B, L)
            r_sdpa = row("sdpa_gqa", B, L, L, t_sdpa)
            r_ours = row("ours", B, L, L, t_ours, speedup_vs_sdpa=t_sdpa["ms"] / t_ours["ms"],
                         num_splits=da.default_num_splits(B, 8, L, 64, sms))
            r_ours2 = row("ours_smax_2x", B, L, 2 * L, t_ours2, speedup_vs_sdpa=t_sdpa["ms"] / t_ours2["ms"],
                          num_splits=da.default_num_splits(B, 8, 2 * L, 64, sms))
            rows += [r_sdpa, r_ours, r_ours2]
            del sets, exact
            torch.cuda.empty_cache()
    result["rows"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_kernel_h100.json").write_text(json.dumps(result, indent=1))
    print(f"copy {result['copy_tbps_measured']:.2f} TB/s; sdpa backends {result['sdpa_backends_gqa']}")
    print("all checks ok:", all(c["ok"] for c in result["correctness"]))
    print(f"{'impl':14s} {'B':>2s} {'L':>7s} {'S_max':>7s} {'us':>8s} {'TB/s':>6s} {'frac':>5s} {'vs sdpa':>7s}")
    for r in rows:
        print(f"{r['impl']:14s} {r['batch']:2d} {r['length']:7d} {r['s_max']:7d} {r['ms'] * 1e3:8.1f} "
              f"{r['tbps']:6.2f} {r['frac_of_3tbps']:5.2f} {r.get('speedup_vs_sdpa', 1.0):7.2f}")


if __name__ == "__main__":
    main()
