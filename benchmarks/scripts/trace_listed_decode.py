"""Where the listed Squeezed decode's attention kernel spends its time: per-program %globaltimer traces (start,
after the dependency wait, counts read, first list entries read, end; rows attended) of one traced replay of the
whole step (centroid scores + list selection + listed attention + merge, CUDA graph) and of the attention kernel
alone, for several program counts. Llama-3-8B attention shape, batch 1, fixed context 32K / 128K + 256 local
tokens, 90% sparsity, 5% centroids (bench_squeezed.decode_case).

    python benchmarks/scripts/trace_listed_decode.py --out $OUT/squeezed_listed_trace_h100.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, write_result
from lmsqueeze.bench.timing import capture_graph, time_cuda


def summarize(trace: torch.Tensor, n_bh: int, nloc: int) -> dict:
    """trace [splits * n_bh, 6] -> timeline quantiles (us from the first program's start)."""
    t = trace.double().cpu()
    t0 = t[:, 0].min()
    start, wait, cnt, ent, end = [(t[:, i] - t0) / 1e3 for i in range(5)]
    rows = t[:, 5]
    split = torch.arange(t.shape[0]) // n_bh
    loc = split < nloc

    def q(x):
        return {p: round(float(torch.quantile(x, v)), 3) for p, v in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9),
                                                                      ("max", 1.0))} if x.numel() else None
    c = ~loc
    return {"programs": int(t.shape[0]), "span_us": round(float(end.max()), 3),
            "start_us": q(start[c]), "wait_done_us": q(wait[c]), "end_us": q(end[c]),
            "wait_minus_start_us": q((wait - start)[c]), "counts_read_us": q((cnt - wait)[c]),
            "entries_read_us": q((ent - cnt)[c]), "tiles_us": q((end - ent)[c]),
            "rows": q(rows[c]), "local_end_us": q(end[loc]),
            "end_vs_rows_corr": round(float(torch.corrcoef(torch.stack([end[c] - ent[c], rows[c]]))[0, 1]), 3)}


def run(N: int, dev, iters: int, log: list) -> list[dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed.listed import select_list_triton, squeezed_decode_listed_triton

    sc = 1 / bs.math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    sel = (64, 4) if N <= 40000 else (256, 8)
    nloc = K.default_local_splits(lk.shape[2])
    rows = []
    for P in (64, 128):
        trace = torch.zeros((P + nloc) * bs.HKV, 6, dtype=torch.int64, device=dev)
        pre = {id(ix): K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel) for ix in idxs}
        lists = {id(ix): select_list_triton(*pre[id(ix)], ix.log_threshold, ix.offsets) for ix in idxs}
        for mode in ("step", "attention_only"):

            def one(ix, traced, mode=mode, P=P, trace=trace, pre=pre, lists=lists):
                s_, e_ = (K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel) if mode == "step"
                          else pre[id(ix)])
                return squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk,
                                                     lv, lengths, sc, programs=P, count_kept=False,
                                                     listed=None if mode == "step" else lists[id(ix)],
                                                     partials_only=mode != "step", trace=trace if traced else None)
            for ix in idxs:
                one(ix, False)
            t = time_cuda(lambda one=one: [one(ix, False) for ix in idxs], iters=iters, calls_per_iter=ncopy)
            g = capture_graph(lambda one=one: [one(ix, ix is idx) for ix in idxs[1:] + idxs[:1]])
            sums = []
            for _ in range(5):
                trace.zero_()
                g.replay()
                torch.cuda.synchronize()
                sums.append(summarize(trace, bs.HKV, nloc))
            tr = sorted(sums, key=lambda r: r["span_us"])[2]
            rows.append({"method": f"listed_p{P}_{mode}", "context": N, "programs": P, "mode": mode,
                         "ms": t.median_ms, "trace": tr})
            log.append(f"N={N} P={P} {mode}: {t.median_ms * 1e3:.2f} us, span {tr['span_us']} us, "
                       f"wait done p50 {tr['wait_done_us']['p50']}, counts {tr['counts_read_us']['p50']}, "
                       f"entries {tr['entries_read_us']['p50']}, tiles p50/max {tr['tiles_us']['p50']}/"
                       f"{tr['tiles_us']['max']}, start max {tr['start_us']['max']}, rows p50/max "
                       f"{tr['rows']['p50']}/{tr['rows']['max']}, end p50/max {tr['end_us']['p50']}/{tr['end_us']['max']}")
            print(log[-1], flush=True)
    return rows


def main() -> int:
    ap = bs.probe_parser(__doc__, 30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows, log = [], []
    for N in (int(x) for x in args.contexts.split(",")):
        rows += run(N, dev, args.iters, log)
        write_result(args.out, "squeezed_listed_trace", command_line(), rows, {"log": log}, device=dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
