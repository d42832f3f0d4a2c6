"""Where the listed Squeezed decode's attention kernel spends its time: per-program %globaltimer traces (start,
after the dependency wait, counts read, first list entries read, end; rows attended) of one traced replay of the
whole step (centroid scores + list selection + listed attention + merge, CUDA graph) and of the attention kernel
alone, for several program counts and list pieces (rows per list entry; 0: one entry per cluster), with the block
decode's whole step timed in the same run. Llama-3-8B attention shape, batch 1, fixed context 32K / 128K + 256 local
tokens, 90% sparsity, 5% centroids (bench_squeezed.decode_case).

    python benchmarks/scripts/trace_listed_decode.py --out $OUT/squeezed_listed_trace_h100.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, write_result
from lmsqueeze.bench.timing import capture_graph, time_cuda

# (programs per KV head, rows per list entry); _v1 (commit 5b5ae9a): programs 64 / 128, one entry per cluster
# _v2 (commit 4b54c59): pieces 0 / 16 / 32, programs 64-192 (rows per program still p50 70, max 252-270 at 128K: the
# KV heads keep very different numbers of rows); (programs, rows per entry, balanced over the heads)
# _v3 (commit 5ee5bdb): programs shared out over the heads by kept rows (removed); now (programs, rows per entry,
# persistent: programs in all over all groups' entries, not traced)
# _v4 (commit 1442a8c): persistent with 132-528 programs, pieces 0 / 16 / 32: no faster (the attention stays at
# ~1.7 TB/s whatever the programs); now per-head programs with K and V of a row side by side in memory (views
# into one [Hkv, N, 2, D] tensor) against the separate tensors
VARIANTS = [(128, 32, False, False), (128, 32, False, True), (96, 32, False, True), (264, 32, True, True)]


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
    c = ~loc & (t[:, 4] > 0) & (t[:, 2] > 0)                         # cluster programs that attended (not idle)
    return {"programs": int(t.shape[0]), "span_us": round(float(end.max()), 3),
            "start_us": q(start[c]), "wait_done_us": q(wait[c]), "end_us": q(end[c]),
            "wait_minus_start_us": q((wait - start)[c]), "counts_read_us": q((cnt - wait)[c]),
            "entries_read_us": q((ent - cnt)[c]), "tiles_us": q((end - ent)[c]),
            "rows": q(rows[c]), "local_end_us": q(end[loc]),
            "end_vs_rows_corr": _corr(end[c] - ent[c], rows[c])}


def _corr(x: torch.Tensor, y: torch.Tensor):
    v = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if x.numel() > 1 else float("nan")
    return round(v, 3) if math.isfinite(v) else None


def run(N: int, dev, iters: int, log: list) -> list[dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.listed import select_list_triton, squeezed_decode_listed_triton

    sc = 1 / bs.math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    sel = (64, 4) if N <= 40000 else (256, 8)
    nloc = K.default_local_splits(lk.shape[2])
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets,
                                                 *K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, *sel),
                                                 idx.log_threshold, lk, lv, lengths, sc)

    def block(ix):
        s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel)
        return K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                        sc, count_kept=False)
    t = time_cuda(lambda: [block(ix) for ix in idxs], iters=iters, calls_per_iter=ncopy)
    sdpa_ms = case.time_sdpa(iters).median_ms
    rows = [{"method": "block_step", "context": N, "ms": t.median_ms, "speedup_vs_sdpa": sdpa_ms / t.median_ms}]
    log.append(f"N={N} block step {t.median_ms * 1e3:.2f} us, x{rows[0]['speedup_vs_sdpa']:.2f} vs SDPA")
    print(log[-1], flush=True)
    for P, piece, pers, kvi in VARIANTS:
        trace = torch.zeros((P + nloc) * bs.HKV, 6, dtype=torch.int64, device=dev)
        pre = {id(ix): K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel) for ix in idxs}
        kv = {id(ix): (torch.stack([ix.keys, ix.values], 2).unbind(2) if kvi else (ix.keys, ix.values))
              for ix in idxs}
        lists = {id(ix): select_list_triton(*pre[id(ix)], ix.log_threshold, ix.offsets, rows=ix.keys.shape[1],
                                            piece=piece) for ix in idxs}
        kwv = {"programs": P, "piece": piece, "persistent": pers}
        o, _, kk = squeezed_decode_listed_triton(q, *kv[id(idx)], idx.offsets, *pre[id(idx)],
                                                 idx.log_threshold, lk, lv, lengths, sc, **kwv)
        check = {"rel_err_vs_reference": bs.rel(o, o_r), "kept_equal_reference": bool(torch.equal(kk, kept_r))}
        for mode in ("step", "attention_only"):

            def one(ix, traced, mode=mode, kwv=kwv, trace=trace, pre=pre, lists=lists, pers=pers, kv=kv):
                s_, e_ = (K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel) if mode == "step"
                          else pre[id(ix)])
                return squeezed_decode_listed_triton(q, *kv[id(ix)], ix.offsets, s_, e_, ix.log_threshold, lk,
                                                     lv, lengths, sc, count_kept=False, **kwv,
                                                     listed=None if mode == "step" else lists[id(ix)],
                                                     partials_only=mode != "step",
                                                     trace=trace if traced and not pers else None)
            for ix in idxs:
                one(ix, False)
            t = time_cuda(lambda one=one: [one(ix, False) for ix in idxs], iters=iters, calls_per_iter=ncopy)
            if pers:
                rows.append({"method": f"listed_persistent_p{P}_piece{piece}{'_kv_interleaved' if kvi else ''}_{mode}",
                             "context": N, **kwv,
                             "mode": mode, "ms": t.median_ms, "speedup_vs_sdpa": sdpa_ms / t.median_ms, **check})
                log.append(f"N={N} persistent P={P} piece={piece} kvi={kvi} {mode}: {t.median_ms * 1e3:.2f} us "
                           f"x{sdpa_ms / t.median_ms:.2f}, err {check['rel_err_vs_reference']:.1e} kept_eq "
                           f"{check['kept_equal_reference']}")
                print(log[-1], flush=True)
                continue
            g = capture_graph(lambda one=one: [one(ix, ix is idx) for ix in idxs[1:] + idxs[:1]])
            sums = []
            for _ in range(5):
                trace.zero_()
                g.replay()
                torch.cuda.synchronize()
                sums.append(summarize(trace, bs.HKV, nloc))
            tr = sorted(sums, key=lambda r: r["span_us"])[2]
            rows.append({"method": f"listed_p{P}_piece{piece}_per_head{'_kv_interleaved' if kvi else ''}_{mode}",
                         "context": N, **kwv, "mode": mode, "ms": t.median_ms, "trace": tr, **check})
            log.append(f"N={N} P={P} piece={piece} kvi={kvi} {mode}: {t.median_ms * 1e3:.2f} us, span "
                       f"{tr['span_us']} us, "
                       f"err {check['rel_err_vs_reference']:.1e} kept_eq {check['kept_equal_reference']}, "
                       f"wait done p50 {tr['wait_done_us']['p50']}, counts {tr['counts_read_us']['p50']}, "
                       f"entries {tr['entries_read_us']['p50']}, tiles p50/max {tr['tiles_us']['p50']}/"
                       f"{tr['tiles_us']['max']}, start max {tr['start_us']['max']}, rows p50/max "
                       f"{tr['rows']['p50']}/{tr['rows']['max']}, end p50/max {tr['end_us']['p50']}/{tr['end_us']['max']}")
            print(log[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows, log = [], []
    for N in (int(x) for x in args.contexts.split(",")):
        rows += run(N, dev, args.iters, log)
        write_result(args.out, "squeezed_listed_trace", command_line(), rows, {"log": log}, device=dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
