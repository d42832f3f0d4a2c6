"""Tile / occupancy sweep of the Squeezed decode kernels at the decode bench shape (Llama-3-8B attention, batch 1,
fixed context 32K / 128K + 256 local tokens, 90% sparsity, 5% centroids; inputs from bench_squeezed.decode_case),
all against dense fp16 SDPA in the same run:

- centroid scoring alone per (chunk, warps);
- the attention kernels alone (no scoring, no selection launch, partials only) per config: the block decode
  (warps, stages, sub-splits, tile rows) and the listed decode (programs, warps, stages, tile rows);
- the whole step (scores + selection + attention + merge, one CUDA graph) for the defaults and the best
  attention-only configs of each path, each checked against the reference (output, kept rows) first.

    python benchmarks/scripts/sweep_squeezed_decode.py --out $OUT/squeezed_sweep_h100.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import time_cuda

# _v1 (commit 57d107c) swept warps 2/4, stages 1-3, sub-splits 1/2, tile rows 16/32 (block) and programs 64/96/128,
# warps 2/4, stages 2/3, tile rows 16/32/64 (listed), and timed int8 centroids (one float32 scale each) in the
# scoring kernel; _v2 (commit bec4d37) added 8 warps, list entries per request and cluster block sizes: no config
# beat the defaults by more than noise (int8 centroids: see kernels.py). _v3 (commit 8d2dd46) capped the registers
# so that more programs fit on an SM (96 now: 5 per SM; 80: 6, 64: 8; 2 stages keep shared memory from limiting first):
# no faster either (128K listed attention 26.58-27.42 vs 26.17 us in _v2; whole step 40.25 vs 40.26 us at defaults).
# _v4 (commit cbe1c7e): the local (user + generated) slots over 2-16 programs per KV head: no change. _v5 (this
# grid at commit b7d9d16): K / V tiles loaded evict-first: no change, removed. This grid: programs / sub-splits
# with 2 or 4 local-slot programs
BLOCK_GRID = [{"sub_splits": u, "local_splits": ls} for u in (1, 2) for ls in (2, 4)]
LISTED_GRID = [{"programs": p, "local_splits": ls} for p in (96, 128) for ls in (2, 4)]
SCORE_GRID = [(64, 4), (128, 4), (256, 4), (256, 8), (512, 8)]


def sweep(N: int, dev, iters: int, deadline: float, log: list, scores: bool = True) -> list[dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.listed import select_list_triton, squeezed_decode_listed_triton

    rows = []
    sc = 1 / bs.math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    sel = (64, 4) if N <= 40000 else (256, 8)
    C = idx.num_clusters
    base = case.time_sdpa(iters)
    common = {"baseline": "dense_sdpa_fp16", "baseline_timing": base, "peak_tb_per_s": bs.PEAK_TB_S, "context": N,
              "batch": 1}
    dense_bytes = 2 * bs.HKV * (N + bs.LOCAL) * bs.D * 2
    rows.append(timing_row("dense_sdpa_fp16", base, bytes_moved=dense_bytes, **common))

    def say(r):
        if "ms" in r:
            log.append(f"N={N} {r['method']:58s} {r['ms'] * 1e3:8.2f} us x{r['speedup']:5.2f}")
            print(log[-1], flush=True)

    # scoring alone
    for ch, w in SCORE_GRID if scores else []:
        t = time_cuda(lambda ch=ch, w=w: [K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, ch, w)
                                          for ix in idxs], iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(f"scores_c{ch}w{w}", t, bytes_moved=bs.HKV * C * bs.D * 2, **common))
        say(rows[-1])

    sl = [K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel) for ix in idxs]
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, *sl[0], idx.log_threshold,
                                                 lk, lv, lengths, sc)
    kept_rows = int(kept_r.sum())
    attn_bytes = kept_rows * bs.D * 4 + bs.HKV * bs.LOCAL * bs.D * 4
    lists = [select_list_triton(s_, e_, ix.log_threshold, ix.offsets) for ix, (s_, e_) in zip(idxs, sl)]

    def block(kw, partial):
        return lambda ix, s_, e_, li: K.squeezed_decode_triton(
            q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths, sc, count_kept=False,
            partials_only=partial, **kw)

    def listed(kw, partial):
        return lambda ix, s_, e_, li: squeezed_decode_listed_triton(
            q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths, sc, count_kept=False,
            partials_only=partial, listed=li, **kw)

    att = {"block": [], "listed": []}
    for kind, grid, mk in (("block", BLOCK_GRID, block), ("listed", LISTED_GRID, listed)):
        for kw in grid:
            if time.time() > deadline:
                log.append(f"N={N} deadline: {kind} {kw} and later skipped")
                break
            name = f"{kind}_attention_only_" + "_".join(f"{k}{v}" for k, v in kw.items())
            try:
                f = mk(kw, True)
                t = time_cuda(lambda f=f: [f(ix, s_, e_, li) for ix, (s_, e_), li in zip(idxs, sl, lists)],
                              iters=iters, calls_per_iter=ncopy)
            except Exception as ex:  # noqa: BLE001
                rows.append({"method": name, "context": N, "error": repr(ex)[:300]})
                log.append(f"N={N} {name} raised {repr(ex)[:300]}")
                continue
            rows.append(timing_row(name, t, bytes_moved=attn_bytes, config=kw, **common))
            att[kind].append((rows[-1]["ms"], kw))
            say(rows[-1])

    # whole step: defaults + the 4 best attention-only configs of each path
    def step(fn_decode):
        def fn():
            for ix in idxs:
                s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, *sel)
                fn_decode(ix, s_, e_, None)
        return fn
    cands = [("block", {}), ("listed", {})]
    for kind in ("block", "listed"):
        cands += [(kind, kw) for _, kw in sorted(att[kind], key=lambda x: x[0])[:4]]
    for kind, kw in cands:
        if time.time() > deadline and kw:
            continue
        name = f"step_{kind}_" + ("_".join(f"{k}{v}" for k, v in kw.items()) or "default")
        mk = block if kind == "block" else listed
        try:
            o, _, kk = (K.squeezed_decode_triton if kind == "block" else squeezed_decode_listed_triton)(
                q, idx.keys, idx.values, idx.offsets, *sl[0], idx.log_threshold, lk, lv, lengths, sc, **kw)
            err, same = bs.rel(o, o_r), bool(torch.equal(kk, kept_r))
            t = time_cuda(step(mk(kw, False)), iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            rows.append({"method": name, "context": N, "error": repr(ex)[:300]})
            log.append(f"N={N} {name} raised {repr(ex)[:300]}")
            continue
        rows.append(timing_row(name, t, config=kw, rel_err_vs_reference=err, kept_equal_reference=same, **common))
        say(rows[-1])
    return rows


def main() -> int:
    ap = bs.probe_parser(__doc__, 40)
    ap.add_argument("--max-seconds", type=float, default=480)
    ap.add_argument("--no-scores", action="store_true", help="skip the scoring sweep")
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.time()
    rows, log = [], []
    ctxs = [int(x) for x in args.contexts.split(",")]
    for i, N in enumerate(ctxs):
        share = (args.max_seconds - (time.time() - t0)) / (len(ctxs) - i)
        rows += sweep(N, dev, args.iters, time.time() + share * 0.8, log, not args.no_scores)
        write_result(args.out, "squeezed_decode_sweep", command_line(), rows, {"log": log}, device=dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
