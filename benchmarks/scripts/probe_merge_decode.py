"""The split merge inside the Squeezed decode kernels (the last M programs of each KV head to finish merge a slice
of the head dim each: kernels._merge_tail) against the merge launch, block and listed decodes, and dense fp16 SDPA,
all in one run: Llama-3-8B attention shape, batch 1, fixed context 32K / 128K + 256 local tokens, 90% sparsity, 5%
centroids (bench_squeezed.decode_case). Each variant is checked against the reference (output, kept rows) and its
CUDA-graph replay against eager (3 replays), then the whole step is timed in a CUDA graph with rotated index copies.

    python benchmarks/scripts/probe_merge_decode.py --out $OUT/squeezed_probe_merge_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import capture_graph, time_cuda

# (path, keywords of its decode function)
VARIANTS = [("block", {}), ("listed", {})]
VARIANTS += [(p, {"fused_merge": True, "merge_m": m}) for p in ("block", "listed") for m in (None, 8, 4, 2, 1)]


def probe(N: int, dev, iters: int, log: list) -> list[dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.listed import squeezed_decode_listed_triton

    sc = 1 / bs.math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    sel = (64, 4) if N <= 40000 else (256, 8)
    s, e = K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, *sel)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold,
                                                     lk, lv, lengths, sc)
    base = case.time_sdpa(iters)
    common = {"baseline": "dense_sdpa_fp16", "baseline_timing": base, "peak_tb_per_s": bs.PEAK_TB_S, "context": N,
              "batch": 1}
    rows = [timing_row("dense_sdpa_fp16", base, bytes_moved=2 * bs.HKV * (N + bs.LOCAL) * bs.D * 2, **common)]
    for path, kw in VARIANTS:
        fn_dec = K.squeezed_decode_triton if path == "block" else squeezed_decode_listed_triton
        name = f"{path}_" + ("_".join(f"{k}{v}" for k, v in kw.items()) or "default")

        def step(ix, count=False, fn_dec=fn_dec, kw=kw):
            s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel)
            return fn_dec(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths, sc,
                          count_kept=count, **kw)
        try:
            o, lse, kk = step(idx, True)
            extra = {"kept_equal_reference": bool(torch.equal(kk, kept_r)), "rel_err_vs_reference": bs.rel(o, o_r),
                     "lse_err_vs_reference": float((lse - lse_r).abs().max())}
            g_out = {}
            graph = capture_graph(lambda step=step, g_out=g_out: g_out.__setitem__("o", step(idx)[0]))
            same = True
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                same &= bool(torch.equal(g_out["o"], step(idx)[0]))
            extra["graph_equal_eager"] = same
            if kw.get("fused_merge"):
                extra["merge_programs"] = kw["merge_m"] or K.merge_programs(bs.HKV, bs.D, dev)
            t = time_cuda(lambda step=step: [step(ix) for ix in idxs], iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            log.append(f"N={N} {name} raised {repr(ex)[:300]}")
            print(log[-1], flush=True)
            rows.append({"method": f"squeezed_decode_{name}", "context": N, "error": repr(ex)[:300]})
            continue
        rows.append(timing_row(f"squeezed_decode_{name}", t, config=kw, **extra, **common))
        r = rows[-1]
        log.append(f"N={N} {r['method']:52s} {r['ms'] * 1e3:7.2f} us x{r['speedup']:5.2f} err {extra['rel_err_vs_reference']:.1e} "
                   f"kept_eq {extra['kept_equal_reference']} graph_eq {same}")
        print(log[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows, log = [], []
    for N in (int(x) for x in args.contexts.split(",")):
        rows += probe(N, dev, args.iters, log)
        write_result(args.out, "squeezed_probe_merge", command_line(), rows, {"log": log}, device=dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
