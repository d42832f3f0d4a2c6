"""Per-kernel GPU time of the Squeezed 'chunk' prefill selection (1K-token chunk against a 128K fixed context,
Llama-3-8B attention shape), from torch.profiler over eager calls: where the selection's time goes.

    python benchmarks/scripts/profile_squeezed_prefill.py --out $OUT/squeezed_prefill_profile_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, environment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed.attention import prefill_rows

    dev = torch.device("cuda")
    N, T = args.context, args.tokens
    keys, values, queries = bs.synthetic_context(N, dev, seed=N + 7)
    idx, _ = bs.build_index(keys, values, queries(64))
    q = queries(T).reshape(1, bs.HQ, T, bs.D).to(torch.bfloat16)
    lk = torch.randn(1, bs.HKV, T, bs.D, device=dev, dtype=torch.bfloat16)
    lv = torch.randn(1, bs.HKV, T, bs.D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([T], dtype=torch.int32, device=dev)
    sc = 1 / math.sqrt(bs.D)

    def step():
        ix, cnt = prefill_rows(q, idx, sc, 0.9, 0.5)
        return K.indexed_attention(q, idx.keys, idx.values, ix, cnt, lk, lv, lengths, sc)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:160], "calls_per_step": e.count / args.reps, "us_per_step": t / args.reps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} us  x{r['calls_per_step']:4.1f}  {r['name'][:110]}")
    print(f"total kernel time per step {total:.1f} us over {len(rows)} kernels")
    # the selection kernels alone at other warp counts (CUDA graph, CUDA events; median of 30)
    from lmsqueeze.bench.timing import time_cuda

    psum = K.prefill_scores(q, idx.centroids, idx.log_sizes[None], sc)
    budget = math.ceil(0.1 * idx.clustered)
    want = K.chunk_rows_triton(psum, idx.offsets, idx.row_cluster, budget)
    select_warps = []
    for w in (2, 4, 8, 16):
        got = K.chunk_rows_triton(psum, idx.offsets, idx.row_cluster, budget, num_warps=w)
        t = time_cuda(lambda w=w: K.chunk_rows_triton(psum, idx.offsets, idx.row_cluster, budget, num_warps=w),
                      iters=30, use_graph=True)
        select_warps.append({"num_warps": w, "us": t.median_ms * 1e3,
                             "equal_default": bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))})
        print(f"chunk_rows_triton num_warps={w}: {t.median_ms * 1e3:.1f} us", select_warps[-1]["equal_default"])
    Path(args.out).write_text(json.dumps({"kind": "squeezed.prefill_profile", "command": command_line(),
                                          **environment(dev), "context": N, "user_tokens": T, "reps": args.reps,
                                          "total_kernel_us_per_step": total, "kernels": rows,
                                          "chunk_rows_warps": select_warps}, indent=1) + "\n")


if __name__ == "__main__":
    main()
