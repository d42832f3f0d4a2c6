"""The listed Squeezed decode (kept clusters listed on the GPU and dealt out evenly: listed.py) against the block
decode (the default before it) and dense fp16 SDPA, all in one run: Llama-3-8B attention shape, batch 1, fixed
context 32K / 128K + 256 local tokens, 90% sparsity, 5% centroids, synthetic clustered keys as in
bench_squeezed.py. Each variant is checked against the reference (output, kept rows), then the whole step
(centroid scores + selection + attention + merge) is timed in a CUDA graph with rotated index copies.

    python benchmarks/scripts/probe_listed_decode.py --out $OUT/squeezed_probe_listed_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import time_cuda

# name -> squeezed_decode_listed_triton keywords; select = (clusters per selection program, warps)
LISTED = {
    "listed_p32": {"programs": 32}, "listed_p128": {"programs": 128},
    "listed_p128_sel8192w16": {"programs": 128, "select_block": 8192, "select_warps": 16},
    "listed_p32_s4": {"programs": 32, "num_stages": 4}, "listed_p64_s3": {"programs": 64, "num_stages": 3},
    "listed_p128_s3": {"programs": 128, "num_stages": 3}, "listed_p16_s4": {"programs": 16, "num_stages": 4},
    "listed_p32_bn64w8s3": {"programs": 32, "block_n": 64, "num_warps": 8, "num_stages": 3},
    "listed_p32_bn16s4": {"programs": 32, "block_n": 16, "num_stages": 4},
}


def probe(N: int, dev, iters: int, log: list) -> tuple[list[dict], dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.listed import select_list_triton, squeezed_decode_listed_triton

    rows, extra = [], {}
    sc = 1 / bs.math.sqrt(bs.D)
    keys, values, queries = bs.synthetic_context(N, dev, seed=N)
    idx, stats = bs.build_index(keys, values, queries(64))
    extra["index_stats"] = stats
    q = queries(1).reshape(1, bs.HQ, bs.D).to(torch.bfloat16)
    lk = torch.randn(1, bs.HKV, 1024, bs.D, device=dev, dtype=torch.bfloat16)
    lv = torch.randn(1, bs.HKV, 1024, bs.D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([bs.LOCAL], dtype=torch.int32, device=dev)
    ncopy = 6 if N <= 40000 else 3
    idxs = [idx] + [bs.clone_index(idx) for _ in range(ncopy - 1)]
    sel = (64, 4) if N <= 40000 else (256, 8)            # the decode defaults' selection (bench_squeezed _v7)

    def scores(ix):
        return K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, chunk=sel[0], num_warps=sel[1])
    s, e = scores(idx)
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    kept_rows = int(kept_r.sum())
    C = idx.num_clusters
    extra["kept_fraction"] = ((kept_r.float() - 64) / idx.clustered).mean().item()
    kall = torch.cat([keys, lk[0, :, :bs.LOCAL]], 1)[None].half()
    vall = torch.cat([values, lv[0, :, :bs.LOCAL]], 1)[None].half()
    kalls, valls = [kall, kall.clone()], [vall, vall.clone()]
    q16 = q[:, :, None].half()
    base = time_cuda(lambda: [F.scaled_dot_product_attention(q16, k, v, scale=sc, enable_gqa=True)
                              for k, v in zip(kalls, valls)], iters=iters, calls_per_iter=2)
    dense_bytes = 2 * bs.HKV * (N + bs.LOCAL) * bs.D * 2
    step_bytes = (bs.HKV * C * bs.D * 2 + bs.HQ * C * 4 + kept_rows * bs.D * 4 + bs.HKV * bs.LOCAL * bs.D * 4)
    common = {"baseline": "dense_sdpa_fp16", "baseline_timing": base, "peak_tb_per_s": bs.PEAK_TB_S, "context": N,
              "batch": 1}
    rows.append(timing_row("dense_sdpa_fp16", base, bytes_moved=dense_bytes, **common))

    def step(fn_decode):
        def fn():
            for ix in idxs:
                s_, e_ = scores(ix)
                fn_decode(ix, s_, e_)
        return fn

    def block(ix, s_, e_):
        return K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                        sc, count_kept=False)
    variants = [("block_default", None, block)]
    for name, kw in LISTED.items():
        def fn(ix, s_, e_, kw=kw):
            return squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv,
                                                 lengths, sc, count_kept=False, **kw)
        variants.append((name, kw, fn))
    for name, kw, fn in variants:
        try:
            if kw is None:
                o, _, kk = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold,
                                                    lk, lv, lengths, sc)
            else:
                o, _, kk = squeezed_decode_listed_triton(q, idx.keys, idx.values, idx.offsets, s, e,
                                                         idx.log_threshold, lk, lv, lengths, sc, **kw)
            err, same = bs.rel(o, o_r), bool(torch.equal(kk, kept_r))
            t = time_cuda(step(fn), iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            log.append(f"N={N} {name} raised {repr(ex)[:400]}")
            rows.append({"method": f"squeezed_decode_{name}", "context": N, "error": repr(ex)[:400]})
            continue
        rows.append(timing_row(f"squeezed_decode_{name}", t, bytes_moved=step_bytes, config=kw or {},
                               rel_err_vs_reference=err, kept_equal_reference=same, kept_fraction=extra["kept_fraction"],
                               **common))
    # the parts: selection alone, each attention alone (no selection launch), and the dense Triton decode kernel
    from lmsqueeze.kernels.decode_attention import decode_attention
    sl = [scores(ix) for ix in idxs]
    t_sc = time_cuda(lambda: [scores(ix) for ix in idxs], iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("centroid_scores_only", t_sc, bytes_moved=bs.HKV * C * bs.D * 2, **common))
    attn_bytes = kept_rows * bs.D * 4 + bs.HKV * bs.LOCAL * bs.D * 4
    for P, kw in ((128, {"select_block": 8192, "select_warps": 16}), (32, {})):
        t_sel = time_cuda(lambda P=P, kw=kw: [select_list_triton(s_, e_, ix.log_threshold, ix.offsets, P,
                                                                 kw.get("select_block"), kw.get("select_warps"))
                                              for ix, (s_, e_) in zip(idxs, sl)], iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(f"list_select_only_p{P}", t_sel, config=kw, **common))
        lists = [select_list_triton(s_, e_, ix.log_threshold, ix.offsets, P, kw.get("select_block"),
                                    kw.get("select_warps")) for ix, (s_, e_) in zip(idxs, sl)]
        for st in (2, 3):
            t_at = time_cuda(lambda P=P, st=st, lists=lists: [
                squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv,
                                              lengths, sc, programs=P, num_stages=st, listed=li, partials_only=True)
                for ix, (s_, e_), li in zip(idxs, sl, lists)], iters=iters, calls_per_iter=ncopy)
            rows.append(timing_row(f"listed_attention_only_p{P}_s{st}", t_at, bytes_moved=attn_bytes, **common))
    t_blk = time_cuda(lambda: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold,
                                                        lk, lv, lengths, sc, count_kept=False, partials_only=True)
                               for ix, (s_, e_) in zip(idxs, sl)], iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("block_attention_only", t_blk, bytes_moved=attn_bytes, **common))
    kb, vb = kall.bfloat16(), vall.bfloat16()
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=50)
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
