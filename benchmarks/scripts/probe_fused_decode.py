"""The one-launch Squeezed decode (fused.py: scores, keep decision, listing and attention in one kernel, the
programs of a KV head meeting at barriers) against the block and listed decodes and dense fp16 SDPA in the same
run: Llama-3-8B attention shape, batch 1, fixed context 32K / 128K + 256 local tokens, 90% sparsity, 5% centroids
(bench_squeezed.decode_case). Each variant is checked against the reference (output, kept rows; graph replay =
eager), then the whole step is timed in a CUDA graph with rotated index copies.

    python benchmarks/scripts/probe_fused_decode.py --out $OUT/squeezed_probe_fused_h100.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import capture_graph, time_cuda

FUSED = [{"programs": p, "num_stages": s, "block_n": n} for p, s, n in
         ((64, 3, 32), (48, 3, 32), (32, 3, 32), (80, 3, 32), (64, 2, 32), (128, 3, 32))]
THREE = [{"programs": p, "one_launch": False} for p in (64, 128)]


def probe(N: int, dev, iters: int, log: list) -> list[dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.fused import squeezed_decode_fused_triton
    from lmsqueeze.methods.squeezed.listed import squeezed_decode_listed_triton

    sc = 1 / bs.math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    sel = (64, 4) if N <= 40000 else (256, 8)
    s, e = K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, *sel)
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    base = case.time_sdpa(iters)
    common = {"baseline": "dense_sdpa_fp16", "baseline_timing": base, "peak_tb_per_s": bs.PEAK_TB_S, "context": N,
              "batch": 1}
    rows = [timing_row("dense_sdpa_fp16", base, bytes_moved=2 * bs.HKV * (N + bs.LOCAL) * bs.D * 2, **common)]

    def say(r):
        msg = (f"N={N} {r['method']:44s} {r['ms'] * 1e3:8.2f} us x{r['speedup']:5.2f} "
               f"err {r.get('rel_err_vs_reference', 0):.1e} kept_eq {r.get('kept_equal_reference')} "
               f"graph_eq {r.get('graph_equal_eager')}")
        log.append(msg)
        print(msg, flush=True)

    def block(ix, count=False):
        s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel)
        return K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                        sc, count_kept=count)

    def listed(ix, count=False):
        s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel)
        return squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv,
                                             lengths, sc, count_kept=count)

    def fused(kw):
        return lambda ix, count=False: squeezed_decode_fused_triton(
            q, ix.centroids, ix.log_sizes, ix.keys, ix.values, ix.offsets, ix.log_threshold, lk, lv, lengths, sc,
            count_kept=count, **kw)

    variants = [("block_default", block, {}), ("listed_default", listed, {})]
    variants += [("fused_" + "_".join(f"{k}{v}" for k, v in kw.items()), fused(kw), kw) for kw in FUSED]
    variants += [(f"fused_three_launches_programs{kw['programs']}", fused(kw), kw) for kw in THREE]
    for name, fn, kw in variants:
        try:
            o, _, kk = fn(idx, True)
            torch.cuda.synchronize()
            extra = {"kept_equal_reference": bool(torch.equal(kk, kept_r)),
                     "kept_rows_diff": int((kk - kept_r).abs().sum()), "rel_err_vs_reference": bs.rel(o, o_r)}
            g_out = {}
            graph = capture_graph(lambda fn=fn, g_out=g_out: g_out.__setitem__("o", fn(idx)[0]))
            graph.replay()
            torch.cuda.synchronize()
            extra["graph_equal_eager"] = bool(torch.equal(g_out["o"], fn(idx)[0]))
            t = time_cuda(lambda fn=fn: [fn(ix) for ix in idxs], iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            log.append(f"N={N} {name} raised {repr(ex)[:300]}")
            print(log[-1], flush=True)
            rows.append({"method": f"squeezed_decode_{name}", "context": N, "error": repr(ex)[:300]})
            continue
        rows.append(timing_row(f"squeezed_decode_{name}", t, config=kw, **extra, **common))
        say(rows[-1])
    # the phases of the three-launch form, each alone (inputs of the later ones left by a full call)
    for kw in THREE:
        f = fused(kw)
        for ix in idxs:
            f(ix)
        for ph in ((1,), (2,), (3,)):
            t = time_cuda(lambda kw=kw, ph=ph: [squeezed_decode_fused_triton(
                q, ix.centroids, ix.log_sizes, ix.keys, ix.values, ix.offsets, ix.log_threshold, lk, lv, lengths, sc,
                partials_only=True, phases=ph, **kw) for ix in idxs], iters=iters, calls_per_iter=ncopy)
            rows.append(timing_row(f"fused_programs{kw['programs']}_phase{ph[0]}_only", t, **common))
            say(rows[-1])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows, log = [], []
    t0 = time.time()
    for N in (int(x) for x in args.contexts.split(",")):
        rows += probe(N, dev, args.iters, log)
        log.append(f"{time.time() - t0:.0f} s")
        write_result(args.out, "squeezed_probe_fused", command_line(), rows, {"log": log}, device=dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
