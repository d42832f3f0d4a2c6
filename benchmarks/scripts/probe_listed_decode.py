"""The listed Squeezed decode (kept clusters listed on the GPU and dealt out evenly: listed.py) against the block
decode (the default before it) and dense fp16 SDPA, all in one run: Llama-3-8B attention shape, batch 1, fixed
context 32K / 128K + 256 local tokens, 90% sparsity, 5% centroids, synthetic clustered keys as in
bench_squeezed.py. Each variant is checked against the reference (output, kept rows), then the whole step
(centroid scores + selection + attention + merge) is timed in a CUDA graph with rotated index copies.

    python benchmarks/scripts/probe_listed_decode.py --out $OUT/squeezed_probe_listed_h100.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import time_cuda

# scoring variants: centroid_scores_triton keywords (None: the decode defaults' selection of bench_squeezed _v7).
# _v4 (commit d9b82aa) also timed a looping form (P programs per KV head, each over every P-th chunk, pipelined):
# whole step no faster (32K 19.45-19.79 vs 19.11 us, 128K 44.10-46.65 vs 43.10 us, block decode), removed.
SCORES = {"tile": None}
# decode variants: (name, scoring variant, "block" | "listed", squeezed_decode_listed_triton keywords)
VARIANTS = [
    ("block_default", "tile", "block", {}),
    ("listed_p128", "tile", "listed", {"programs": 128}),
    ("listed_p128_sel512", "tile", "listed", {"programs": 128, "select_block": 512}),
    ("listed_p128_sel256", "tile", "listed", {"programs": 128, "select_block": 256}),
    ("listed_p64_sel512", "tile", "listed", {"programs": 64, "select_block": 512}),
    ("listed_p256_sel512", "tile", "listed", {"programs": 256, "select_block": 512}),
    ("listed_p128_sel512_s3", "tile", "listed", {"programs": 128, "select_block": 512, "num_stages": 3}),
] + [(f"block_scores_{k}", k, "block", {}) for k in SCORES if k != "tile"] + [
    (f"listed_p128_sel512_scores_{k}", k, "listed", {"programs": 128, "select_block": 512}) for k in SCORES
    if k != "tile"]


def probe(N: int, dev, iters: int, log: list) -> tuple[list[dict], dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.listed import select_list_triton, squeezed_decode_listed_triton

    rows, extra = [], {}
    sc = 1 / bs.math.sqrt(bs.D)
    case = bs.decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    extra["index_stats"] = case.stats
    sel = (64, 4) if N <= 40000 else (256, 8)            # the decode defaults' selection (bench_squeezed _v7)

    def scores(ix, variant="tile"):
        kw = SCORES[variant] or {"chunk": sel[0], "num_warps": sel[1]}
        return K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, **kw)
    s, e = scores(idx)
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    kept_rows = int(kept_r.sum())
    C = idx.num_clusters
    extra["kept_fraction"] = ((kept_r.float() - 64) / idx.clustered).mean().item()
    base = case.time_sdpa(iters)
    dense_bytes = 2 * bs.HKV * (N + bs.LOCAL) * bs.D * 2
    step_bytes = (bs.HKV * C * bs.D * 2 + bs.HQ * C * 4 + kept_rows * bs.D * 4 + bs.HKV * bs.LOCAL * bs.D * 4)
    common = {"baseline": "dense_sdpa_fp16", "baseline_timing": base, "peak_tb_per_s": bs.PEAK_TB_S, "context": N,
              "batch": 1}
    rows.append(timing_row("dense_sdpa_fp16", base, bytes_moved=dense_bytes, **common))

    def step(fn_decode, variant):
        def fn():
            for ix in idxs:
                s_, e_ = scores(ix, variant)
                fn_decode(ix, s_, e_)
        return fn

    def block(ix, s_, e_):
        return K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                        sc, count_kept=False)

    def listed(kw):
        def fn(ix, s_, e_):
            return squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv,
                                                 lengths, sc, count_kept=False, **kw)
        return fn
    for name, variant, kind, kw in VARIANTS:
        try:
            s_v, e_v = scores(idx, variant)
            if kind == "block":
                o, _, kk = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s_v, e_v,
                                                    idx.log_threshold, lk, lv, lengths, sc)
            else:
                o, _, kk = squeezed_decode_listed_triton(q, idx.keys, idx.values, idx.offsets, s_v, e_v,
                                                         idx.log_threshold, lk, lv, lengths, sc, **kw)
            err, same = bs.rel(o, o_r), bool(torch.equal(kk, kept_r))
            t = time_cuda(step(block if kind == "block" else listed(kw), variant), iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            log.append(f"N={N} {name} raised {repr(ex)[:400]}")
            rows.append({"method": f"squeezed_decode_{name}", "context": N, "error": repr(ex)[:400]})
            continue
        rows.append(timing_row(f"squeezed_decode_{name}", t, bytes_moved=step_bytes,
                               config={"scores": SCORES[variant] or {"chunk": sel[0], "num_warps": sel[1]}, **kw},
                               rel_err_vs_reference=err, kept_equal_reference=same, kept_fraction=extra["kept_fraction"],
                               **common))
    # the parts: each scoring alone, selection alone, each attention alone (no selection launch), and the dense
    # Triton decode kernel
    from lmsqueeze.kernels.decode_attention import decode_attention
    for variant, skw in SCORES.items():
        t_sc = time_cuda(lambda v=variant: [scores(ix, v) for ix in idxs], iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(f"centroid_scores_only_{variant}", t_sc, bytes_moved=bs.HKV * C * bs.D * 2,
                               config=skw, **common))
    sl = [scores(ix) for ix in idxs]
    attn_bytes = kept_rows * bs.D * 4 + bs.HKV * bs.LOCAL * bs.D * 4
    for sb in (256, 512, 1024):
        t_sel = time_cuda(lambda sb=sb: [select_list_triton(s_, e_, ix.log_threshold, ix.offsets, sb)
                                         for ix, (s_, e_) in zip(idxs, sl)], iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(f"list_select_only_{sb}", t_sel, **common))
    lists = [select_list_triton(s_, e_, ix.log_threshold, ix.offsets, 512) for ix, (s_, e_) in zip(idxs, sl)]
    for P, st in ((128, 2), (128, 3), (256, 2)):
        t_at = time_cuda(lambda P=P, st=st: [
            squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv,
                                          lengths, sc, programs=P, num_stages=st, listed=li, partials_only=True)
            for ix, (s_, e_), li in zip(idxs, sl, lists)], iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(f"listed_attention_only_p{P}_s{st}", t_at, bytes_moved=attn_bytes, **common))
    t_blk = time_cuda(lambda: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold,
                                                        lk, lv, lengths, sc, count_kept=False, partials_only=True)
                               for ix, (s_, e_) in zip(idxs, sl)], iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("block_attention_only", t_blk, bytes_moved=attn_bytes, **common))
    kb = torch.cat([case.keys, lk[0, :, :bs.LOCAL]], 1)[None]
    vb = torch.cat([case.values, lv[0, :, :bs.LOCAL]], 1)[None]
    lens_all = torch.tensor([kb.shape[2]], dtype=torch.int32, device=dev)
    t_tri = time_cuda(lambda: decode_attention(q, kb, vb, lens_all, sc), iters=iters)
    rows.append(timing_row("dense_triton_decode", t_tri, bytes_moved=dense_bytes, **common))
    for r in rows:
        if "ms" in r:
            log.append(f"N={N} {r['method']:40s} {r['ms'] * 1e3:8.2f} us x{r['speedup']:5.2f} "
                       f"err {r.get('rel_err_vs_reference', 0):.1e} kept_eq {r.get('kept_equal_reference')}")
            print(log[-1], flush=True)
    return rows, extra


def main() -> int:
    ap = bs.probe_parser(__doc__, 50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows, extra, log = [], {}, []
    for N in (int(x) for x in args.contexts.split(",")):
        r, x = probe(N, dev, args.iters, log)
        rows += r
        extra[f"decode_{N}"] = x
        extra["log"] = log
        write_result(args.out, "squeezed_probe_listed", command_line(), rows, extra, device=dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
