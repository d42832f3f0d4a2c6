"""Where the Squeezed decode step's time goes: per-program %globaltimer traces of the split kernel and graph timings
of kernel variants (Llama-3-8B attention shape, batch 1, fixed context 32K / 128K + 256 local tokens, 90% sparsity,
5% centroids; synthetic clustered keys as in bench_squeezed.py).

For each variant of `_squeezed_decode_kernel` (EARLY: work before the PDL wait; LOCAL_FIRST: local-slot programs
first; HOIST_V: V tiles requested with K tiles; plus tile/local-split options) it checks the output against the
reference, times the whole step (centroid scores + split kernel + merge) in a CUDA graph with rotated index copies
(so replays do not hit L2), against dense fp16 SDPA timed in the same run, and records one traced replay: when
the split programs start, pass the dependency wait and end, and which programs are the last to finish
("kept_rows" in the trace: the program's kept rows; its tiles for v2-v5's balanced variant).

    python benchmarks/scripts/trace_squeezed_decode.py --out $OUT/squeezed_decode_trace_h100.json
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
from lmsqueeze.bench.timing import capture_graph, time_cuda

# name -> squeezed_decode_triton keywords on top of the v6 best tiles (32 clusters, 32 keys, 4 warps, 2 stages).
# v1-v6 timed the variants of their commits (see each file's commit): v2-v5 a balanced variant
# (squeezed_decode_balanced_triton at commit 8afcd0c: slower, removed), v6 a cluster numbering that spreads similar
# clusters over blocks (index.spread_order at commit 7563fbd: no change, reverted), v7 programs per block and
# block sizes; v8 is this list
VARIANTS = {
    "fused": {},
    "fused_v6_defaults": {"early": False, "local_first": False, "maxnreg": None},
    "w2": {"num_warps": 2},
    "w2_regs128": {"num_warps": 2, "maxnreg": 128},
    "w2_nsub1": {"num_warps": 2, "sub_splits": 1},
    "w2_nsub3": {"num_warps": 2, "sub_splits": 3},
    "w2_bn16": {"num_warps": 2, "block_n": 16},
    "w2_stages3": {"num_warps": 2, "num_stages": 3},
    "w1": {"num_warps": 1},
    "w1_bn16": {"num_warps": 1, "block_n": 16},
}


def _corr(x: torch.Tensor, y: torch.Tensor):
    c = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if x.numel() > 1 else float("nan")
    return round(c, 3) if math.isfinite(c) else None


def summarize(trace: torch.Tensor, n_bh: int, nloc: int, local_first: bool) -> dict:
    """trace [splits * n_bh, 4] int64 (start, after wait, end ns, kept rows) -> a timeline summary (us)."""
    t = trace.double().cpu()
    t0 = t[:, 0].min()
    start, wait, end, kept = (t[:, 0] - t0) / 1e3, (t[:, 1] - t0) / 1e3, (t[:, 2] - t0) / 1e3, t[:, 3]
    splits = t.shape[0] // n_bh
    split = torch.arange(t.shape[0]) // n_bh
    local = split < nloc if local_first else split >= splits - nloc
    dur = end - start
    after = end - wait

    def pct(x, p):
        return round(float(torch.quantile(x, p)), 3) if x.numel() else None

    last = torch.argsort(end, descending=True)[:12]
    return {
        "programs": int(t.shape[0]), "span_us": round(float(end.max()), 3),
        "first_wait_us": round(float(wait.min()), 3), "last_start_us": round(float(start.max()), 3),
        "block_after_wait_us": {"p50": pct(after[~local], 0.5), "p90": pct(after[~local], 0.9),
                                "p99": pct(after[~local], 0.99), "max": pct(after[~local], 1.0)},
        "block_duration_us": {"p50": pct(dur[~local], 0.5), "max": pct(dur[~local], 1.0)},
        "local_duration_us": {"p50": pct(dur[local], 0.5), "max": pct(dur[local], 1.0)},
        "local_end_us_max": pct(end[local], 1.0),
        "kept_rows": {"p50": pct(kept[~local], 0.5), "p99": pct(kept[~local], 0.99), "max": pct(kept[~local], 1.0)},
        "end_us": {"p50": pct(end, 0.5), "p90": pct(end, 0.9), "p99": pct(end, 0.99)},
        "last_programs": [{"split": int(split[i]), "local": bool(local[i]), "start": round(float(start[i]), 3),
                           "wait": round(float(wait[i]), 3), "end": round(float(end[i]), 3), "kept": int(kept[i])}
                          for i in last],
        "corr_after_wait_vs_kept": _corr(after[~local], kept[~local]),
    }


def run_context(N: int, dev, iters: int) -> dict:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R

    sc = 1 / math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    chunk = 128 if N <= 40000 else 64               # the v6 selection sweep's best
    sub = 2 if N <= 40000 else 1
    s, e = K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, chunk=chunk)
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    t_dense = case.time_sdpa(iters)
    out = {"context": N, "kept_fraction": float(((kept_r.float() - 64) / idx.clustered).mean()),
           "clusters": idx.num_clusters, "dense_sdpa_fp16_ms": t_dense.median_ms, "variants": {}}
    fn = K.squeezed_decode_triton
    for name, kw in VARIANTS.items():
        kw = {"block_c": 32, "block_n": 32, "num_warps": 4, "sub_splits": sub, "num_stages": 2, **kw}
        row = {"kw": kw}
        try:
            o, _, kept = fn(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk, lv, lengths, sc, **kw)
            row["rel_err_vs_reference"] = bs.rel(o, o_r)
            row["kept_equal_reference"] = bool(torch.equal(kept, kept_r))
            kern = K._LAST_KERNEL.get("decode")
            row["n_regs"], row["n_spills"] = getattr(kern, "n_regs", None), getattr(kern, "n_spills", None)

            def step(kw=kw):
                for ix in idxs:
                    s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, chunk=chunk)
                    fn(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths, sc,
                       count_kept=False, **kw)
            t = time_cuda(step, iters=iters, calls_per_iter=ncopy)
            row["step_ms"] = t.median_ms
            row["step_p10_ms"], row["step_p90_ms"] = t.p10_ms, t.p90_ms
            row["speedup_vs_sdpa"] = t_dense.median_ms / t.median_ms
            # one traced step (graph replay of copy 0 after the others, so its reads come from HBM)
            nloc = kw.get("local_splits") or K.default_local_splits(lk.shape[2])
            splits = -(-(idx.num_clusters + 1) // kw["block_c"]) * kw["sub_splits"] + nloc
            trace = torch.zeros(splits * bs.HKV, 4, dtype=torch.int64, device=dev)

            def traced(kw=kw, trace=trace):
                for ix in idxs[1:] + idxs[:1]:
                    s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, chunk=chunk)
                    fn(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths, sc,
                       count_kept=False, trace=trace if ix is idx else None, **kw)
            traced()
            g = capture_graph(traced)
            sums = []
            for _ in range(5):
                g.replay()
                torch.cuda.synchronize()
                local_first = K.DECODE_LOCAL_FIRST if kw.get("local_first") is None else kw["local_first"]
                sums.append(summarize(trace, bs.HKV, nloc, local_first))
            row["trace"] = sorted(sums, key=lambda r: r["span_us"])[2]     # the median replay by span
        except Exception as ex:  # noqa: BLE001
            row["error"] = repr(ex)[:400]
        out["variants"][name] = row
        bs.say(f"N={N} {name:34s} step {row.get('step_ms', float('nan')) * 1e3:6.2f} us "
               f"x{row.get('speedup_vs_sdpa', float('nan')):.2f} span "
               f"{row.get('trace', {}).get('span_us')} err {row.get('rel_err_vs_reference')} {row.get('error', '')}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"schema": "lmsqueeze.bench/1", "kind": "squeezed_decode_trace", "command": command_line(),
           **environment(), "results": []}
    for N in (int(x) for x in args.contexts.split(",")):
        res["results"].append(run_context(N, dev, args.iters))
    res["log"] = bs.LOG
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\ncontext variant                         step_us x_sdpa span_us wait_us blk_after_p50/max last_start regs spills")
    for r in res["results"]:
        for name, v in r["variants"].items():
            tr = v.get("trace", {})
            print(f"{r['context']:7d} {name:36s} {v.get('step_ms', float('nan')) * 1e3:7.2f} "
                  f"{v.get('speedup_vs_sdpa', float('nan')):6.2f} {tr.get('span_us')} {tr.get('first_wait_us')} "
                  f"{tr.get('block_after_wait_us', {}).get('p50')}/{tr.get('block_after_wait_us', {}).get('max')} "
                  f"{tr.get('last_start_us')} {v.get('n_regs')} {v.get('n_spills')}")


if __name__ == "__main__":
    main()
