"""Squeezed Attention on the GPU: correctness against the references, then decode and prefill attention timings.

One call does everything (GPU time is scarce):
1. kernels vs references on fresh random inputs (GQA 1 and 4, head dims 64 and 128, fp32 and bf16, batch 2,
   odd lengths), and a tiny model end to end: sparsity 0 equals Dense logits; `lmsqueeze.generate` with the
   captured CUDA-graph decode step equals the eager step token for token;
2. decode attention at the Llama-3-8B attention shape (32 query heads, 8 KV heads, D=128, bf16), batch 1,
   fixed context 32K and 128K + 256 user tokens, 90% sparsity, 5% centroids (and hierarchical 1% / 5%), against
   dense SDPA (bf16 and fp16) and lmsqueeze's dense Triton decode kernel over the same tokens, all in CUDA
   graphs (events, median of >= 20 after warm-up, input copies rotated so repeated runs do not hit L2);
   selection (centroid scoring) and attention are also timed alone, with bytes moved and achieved TB/s;
3. prefill of a 1024-token user input against a 128K fixed context vs dense SDPA (flash) over the same keys.

Synthetic keys are drawn around 1024 random directions per KV head (so they cluster) and queries near some of
them (so attention is peaked, as in real models); speed does not depend on trained weights, the kept fraction
does, so it is measured and reported with every row, and a second row fixes each head's threshold so that
this query keeps exactly 10% of the keys.

    python benchmarks/scripts/bench_squeezed.py --out benchmarks/results/squeezed_decode_h100.json
    python benchmarks/scripts/bench_squeezed.py --plot-from benchmarks/results/squeezed_decode_h100.json \
        --plot benchmarks/plots/squeezed_decode_h100.png
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import time_cuda

PEAK_TB_S = 3.0
HQ, HKV, D = 32, 8, 128
LOCAL = 256
T0 = time.time()
LOG: list[str] = []
QUICK = False   # --quick: decode sweeps only (no checks, one compact config, no prefill)
PREFILL_SHORT = False   # --prefill-sweep short: the prefill attention configs that won earlier sweeps only


def say(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    LOG.append(line)
    print(line, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# --- 1. correctness --------------------------------------------------------------------------------------------

def _toy_index(B, Hkv, G, D, C, W, dtype, dev, gen):
    sizes = torch.randint(0, 9, (Hkv, C), generator=gen, device="cpu")
    n = int(sizes.sum(-1).max()) + W
    offs = torch.zeros(Hkv, C + 2, dtype=torch.int32)
    offs[:, 1:C + 1] = torch.cumsum(sizes, -1).to(torch.int32)
    offs[:, C + 1] = n
    keys = torch.randn(Hkv, n, D, generator=gen).to(dev, dtype)
    vals = torch.randn(Hkv, n, D, generator=gen).to(dev, dtype)
    cents = torch.randn(Hkv, C, D, generator=gen).to(dev, dtype)
    return sizes.to(dev), offs.to(dev), keys, vals, cents


def check_kernels(dev) -> list[dict]:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.lookup import log_sizes, mask_to_index

    out = []
    gen = torch.Generator().manual_seed(int(time.time()))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2.5e-2)):
        for G, Dh in ((1, 64), (4, 128)):
            B, Hkv, C, W, L, T = 2, 2, 301, 7, 77, 37
            sizes, offs, keys, vals, cents = _toy_index(B, Hkv, G, Dh, C, W, dtype, dev, gen)
            ls = log_sizes(sizes)
            q = torch.randn(B, Hkv * G, Dh, generator=gen).to(dev, dtype)
            sc = 1 / math.sqrt(Dh)
            case = {"dtype": str(dtype).split(".")[-1], "G": G, "D": Dh}
            s, _ = K.centroid_scores(q, cents, ls, sc)
            s_r, e_r = R.centroid_scores_reference(q, cents, ls, sc, K.BLOCK_C)
            out.append({**case, "kernel": "centroid_scores", "rel_err": rel(s, s_r), "tol": tol})
            lk = torch.randn(B, Hkv, L, Dh, generator=gen).to(dev, dtype)
            lv = torch.randn(B, Hkv, L, Dh, generator=gen).to(dev, dtype)
            lengths = torch.tensor([L - 11, L], dtype=torch.int32, device=dev)
            starts = torch.tensor([0, 5], dtype=torch.int32, device=dev)
            a = (s_r - torch.logsumexp(e_r, -1, keepdim=True)).reshape(B, Hkv, G, C).amax(2)
            fin = a[0][torch.isfinite(a[0])]
            tau = torch.quantile(fin.float(), 0.8).repeat(Hkv).to(dev)
            o, lse, kept = K.squeezed_decode(q, keys, vals, offs, s_r, e_r, tau, lk, lv, lengths, sc, starts)
            o_r, lse_r, kept_r = R.squeezed_decode_reference(q, keys, vals, offs, s_r, e_r, tau, lk, lv, lengths, sc,
                                                             starts)
            out.append({**case, "kernel": "squeezed_decode", "rel_err": rel(o, o_r), "lse_err": rel(lse, lse_r),
                        "kept_equal": bool(torch.equal(kept, kept_r)), "tol": tol})
            for impl in (K.squeezed_decode_triton, K.squeezed_decode_compact_triton):
                o, lse, kept = impl(q, keys, vals, offs, s_r, e_r, tau, lk, lv, lengths, sc, starts, local_splits=2)
                out.append({**case, "kernel": impl.__name__, "rel_err": rel(o, o_r), "lse_err": rel(lse, lse_r),
                            "kept_equal": bool(torch.equal(kept, kept_r)), "tol": tol})
            qq = torch.randn(B, Hkv * G, T, Dh, generator=gen).to(dev, dtype)
            mask = torch.rand(B, Hkv, keys.shape[1], generator=gen).to(dev) < 0.3
            idx, cnt = mask_to_index(mask)
            lengths2 = torch.tensor([T + 3, L], dtype=torch.int32, device=dev)
            o = K.indexed_attention(qq, keys, vals, idx, cnt, lk, lv, lengths2, sc, starts)
            o_r, _ = R.indexed_attention_reference(qq, keys, vals, idx, cnt, lk, lv, lengths2, sc, starts)
            out.append({**case, "kernel": "indexed_attention", "rel_err": rel(o, o_r), "tol": tol})
            keep = torch.rand(B, Hkv, T, C + 1, generator=gen).to(dev) < 0.3
            offs_l = offs.long()
            rc = torch.repeat_interleave(torch.arange(C + 1, device=dev).repeat(Hkv),
                                         (offs_l[:, 1:] - offs_l[:, :-1]).flatten()).reshape(Hkv, -1)
            o = K.token_select_attention(qq, keys, vals, keep, rc, lk, lv, lengths2, sc, starts)
            o_r, _ = R.token_select_attention_reference(qq, keys, vals, keep, rc, lk, lv, lengths2, sc, starts)
            out.append({**case, "kernel": "token_select_attention", "rel_err": rel(o, o_r), "tol": tol})
            for bd in (32, None):
                mo = torch.randn(B, Hkv * G, 45, Dh, generator=gen).to(dev)
                ml = torch.randn(B, Hkv * G, 45, generator=gen).to(dev)
                mo_, _ = K.merge_splits(mo, ml, dtype, bd)
                ref_m = (torch.softmax(ml, -1)[..., None] * mo).sum(-2)
                out.append({**case, "kernel": f"merge_splits_{bd}", "rel_err": rel(mo_, ref_m), "tol": tol})
            p = K.prefill_scores(qq, cents, ls[None], sc)
            p_r = R.prefill_scores_reference(qq, cents, ls[None], sc)
            out.append({**case, "kernel": "prefill_scores", "rel_err": rel(p, p_r), "tol": tol})
            C1 = 37
            parent = torch.sort(torch.randint(0, C1, (Hkv, C), generator=gen), -1).values.to(dev, torch.int32)
            csz = torch.zeros(Hkv, C1, dtype=torch.long, device=dev).scatter_add_(1, parent.long(), sizes)
            coarse = torch.randn(Hkv, C1, Dh, generator=gen).to(dev, dtype)
            s1, e1 = R.centroid_scores_reference(q, coarse, log_sizes(csz), sc, K.BLOCK_C)
            a1 = (s1 - torch.logsumexp(e1, -1, keepdim=True)).reshape(B, Hkv, G, C1).amax(2)
            tau1 = torch.nan_to_num(a1[0], neginf=-1e30).median(-1).values.float()
            f = K.fine_scores(q, cents, ls, parent, s1, e1, tau1, sc, count=True)
            f_r = R.fine_scores_reference(q, cents, ls, parent, s1, e1, tau1, sc, K.BLOCK_C)
            fin = torch.isfinite(f_r[0])
            out.append({**case, "kernel": "fine_scores", "rel_err": rel(f[0][fin], f_r[0][fin]),
                        "same_pruned": bool(torch.equal(torch.isfinite(f[0]), fin)),
                        "scored_equal": bool(torch.equal(f[2], f_r[2])), "tol": tol})
    for r in out:
        r["ok"] = bool(r["rel_err"] <= r["tol"]) and r.get("kept_equal", True) and r.get("same_pruned", True) \
            and r.get("scored_equal", True)
    return out


def check_model(dev) -> list[dict]:
    import lmsqueeze
    from lmsqueeze.generation import clear_runners, generate
    from lmsqueeze.methods.squeezed import SqueezedAttention
    from lmsqueeze.models.tiny import tiny_model

    out = []
    m = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to(dev)
    g = torch.Generator().manual_seed(1)
    S, T = 300, 11
    ids = torch.randint(0, 256, (1, S + T), generator=g).to(dev)
    with torch.no_grad():
        ref = m(ids).logits[0, S:]
    for hier, mode in ((None, "token"), ((0.02, 0.1), "token"), (None, "chunk"), (None, "token-budget")):
        art0 = SqueezedAttention(centroids=0.1, sparsity=0.0, coarse_sparsity=0.0, hierarchical=hier,
                                 observation=16, prefill=mode).prepare(m, ids[:, :S])
        with lmsqueeze.apply(m, art0) as sess, torch.no_grad():
            c = sess.new_cache()
            logits = [m(ids[:, S:S + 6], past_key_values=c).logits[0]]
            logits += [m(ids[:, i:i + 1], past_key_values=c).logits[0] for i in range(S + 6, S + T)]
        err = (torch.cat(logits) - ref).abs().max().item()
        out.append({"check": f"sparsity0_equals_dense{'_hier' if hier else ''}_{mode}", "max_abs_logit_err": err,
                    "ok": err < 1e-3})
    dense_tok = generate(m, ids, max_new_tokens=12, use_graph=True).new_tokens
    for sp, hier in ((0.0, None), (0.9, None), (0.9, (0.02, 0.1))):
        art = SqueezedAttention(centroids=0.1, sparsity=sp, coarse_sparsity=0.0 if sp == 0 else 0.5,
                                hierarchical=hier, observation=16).prepare(m, ids[:, :S])
        clear_runners(m)
        eager = generate(m, ids[:, S:], max_new_tokens=12, method=art, use_graph=False)
        clear_runners(m)
        graph = generate(m, ids[:, S:], max_new_tokens=12, method=art, use_graph=True)
        row = {"check": f"graph_decode_equals_eager_s{sp}{'_hier' if hier else ''}", "graph": graph.graph,
               "ok": bool(torch.equal(eager.new_tokens, graph.new_tokens)) and graph.graph}
        if sp == 0:
            row["equals_dense_tokens"] = bool(torch.equal(graph.new_tokens, dense_tok))
            row["ok"] = row["ok"] and row["equals_dense_tokens"]
        out.append(row)
    return out


# --- 2. decode --------------------------------------------------------------------------------------------------

def synthetic_context(N: int, dev, seed: int, dtype=torch.bfloat16):
    """keys around 1024 directions per head, values random, 64 observation queries near random keys."""
    g = torch.Generator(device=dev).manual_seed(seed)
    dirs = F.normalize(torch.randn(HKV, 1024, D, device=dev, generator=g), dim=-1) * math.sqrt(D)
    which = torch.randint(0, 1024, (HKV, N), device=dev, generator=g)
    keys = dirs.gather(1, which[..., None].expand(-1, -1, D)) + 0.6 * torch.randn(HKV, N, D, device=dev, generator=g)
    values = torch.randn(HKV, N, D, device=dev, generator=g)

    def queries(n):
        pick = torch.randint(0, N, (HKV, 4 * n), device=dev, generator=g)
        near = keys.gather(1, pick[..., None].expand(-1, -1, D)).reshape(HKV, 4, n, D).reshape(HQ, n, D)
        return near + 0.5 * torch.randn(HQ, n, D, device=dev, generator=g)
    return keys.to(dtype), values.to(dtype), queries


def build_index(keys, values, q_obs, hierarchical=None):
    from lmsqueeze.methods.squeezed.index import SqueezedIndex, build_layer_index

    N = keys.shape[1]
    t, stats = build_layer_index(keys, values, torch.arange(N, device=keys.device) - N, q_obs, 1 / math.sqrt(D),
                                 centroids=0.05, sparsity=0.9, observation=64, hierarchical=hierarchical, iters=8)
    return SqueezedIndex.from_tensors(t, keys.device, keys.dtype), stats


def clone_index(idx):
    return dataclasses.replace(idx, **{f.name: getattr(idx, f.name).clone() for f in dataclasses.fields(idx)
                                       if isinstance(getattr(idx, f.name), torch.Tensor)})


def bench_decode(N: int, dev, iters: int) -> tuple[list[dict], dict]:
    from lmsqueeze.kernels.decode_attention import decode_attention
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.attention import decode_scores

    rows, extra = [], {}
    sc = 1 / math.sqrt(D)
    t0 = time.time()
    keys, values, queries = synthetic_context(N, dev, seed=N)
    q_obs = queries(64)
    idx, stats = build_index(keys, values, q_obs)
    hidx, hstats = build_index(keys, values, q_obs, hierarchical=(0.01, 0.05))
    extra["prepare_s"] = round(time.time() - t0, 2)
    extra["index_stats"], extra["hier_index_stats"] = stats, hstats
    say(f"N={N}: indexes built in {extra['prepare_s']} s (C={idx.num_clusters}, hier C1={hidx.coarse_centroids.shape[1]})")
    q = queries(1).reshape(1, HQ, D).to(torch.bfloat16)
    cap = 1024
    lk = torch.randn(1, HKV, cap, D, device=dev, dtype=torch.bfloat16)
    lv = torch.randn(1, HKV, cap, D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([LOCAL], dtype=torch.int32, device=dev)

    # correctness at this shape
    s, e, _ = decode_scores(q, idx, sc)
    o, _, kept = K.squeezed_decode(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk, lv, lengths, sc)
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    Nc = idx.clustered
    kept_frac = ((kept.float() - 64) / Nc).mean().item()
    extra["decode_rel_err_vs_reference"] = rel(o, o_r)
    extra["kept_equal_reference"] = bool(torch.equal(kept, kept_r))
    extra["kept_fraction_calibrated"] = kept_frac
    hs, he, scored = decode_scores(q, hidx, sc, count=True)
    _, _, hkept = K.squeezed_decode(q, hidx.keys, hidx.values, hidx.offsets, hs, he, hidx.log_threshold, lk, lv,
                                     lengths, sc)
    extra["hier_kept_fraction"] = ((hkept.float() - 64) / Nc).mean().item()
    extra["hier_fine_scored_fraction"] = (scored.float() / hidx.num_clusters).mean().item()
    # full-precision dense answer: how far is the sparse output from exact attention
    kall = torch.cat([keys, lk[0, :, :LOCAL]], 1)[None]
    vall = torch.cat([values, lv[0, :, :LOCAL]], 1)[None]
    dense = F.scaled_dot_product_attention(q[:, :, None].float(), kall.float(), vall.float(), scale=sc,
                                           enable_gqa=True)[:, :, 0]
    extra["sparse_vs_dense_rel_err"] = rel(o, dense)
    say(f"N={N}: rel err vs reference {extra['decode_rel_err_vs_reference']:.2e}, kept {kept_frac:.3f} "
        f"(hier {extra['hier_kept_fraction']:.3f}, fine scored {extra['hier_fine_scored_fraction']:.2f}), "
        f"vs dense {extra['sparse_vs_dense_rel_err']:.3f}")
    # a per-head threshold that keeps exactly 10% for this query (controls for the synthetic data)
    a = (s - torch.logsumexp(e, -1, keepdim=True)).reshape(1, HKV, HQ // HKV, -1).amax(2)[0]  # [Hkv, C]
    tau10 = torch.empty(HKV, device=dev)
    for h in range(HKV):
        order = torch.argsort(a[h], descending=True)
        cum = torch.cumsum(idx.sizes[h][order], 0)
        j = int(torch.searchsorted(cum, torch.tensor(int(0.1 * Nc), device=dev)))
        tau10[h] = a[h][order[min(j, len(order) - 1)]]
    _, _, kept10 = K.squeezed_decode(q, idx.keys, idx.values, idx.offsets, s, e, tau10, lk, lv, lengths, sc)
    extra["kept_fraction_fixed10"] = ((kept10.float() - 64) / Nc).mean().item()

    # rotation copies so replays do not read from L2
    ncopy = 6 if N <= 40000 else 3
    idxs = [idx] + [clone_index(idx) for _ in range(ncopy - 1)]
    hidxs = [hidx] + [clone_index(hidx) for _ in range(ncopy - 1)]
    kalls = [kall] + [kall.clone() for _ in range(min(ncopy, 2) - 1)]
    valls = [vall] + [vall.clone() for _ in range(min(ncopy, 2) - 1)]
    k16 = [x.half() for x in kalls]
    v16 = [x.half() for x in valls]
    qs = q[:, :, None]
    q16 = qs.half()
    cap_all = kall.shape[2]
    lens_all = torch.tensor([cap_all], dtype=torch.int32, device=dev)

    def dense_bytes():
        return 2 * HKV * (N + LOCAL) * D * 2

    timings = {}
    timings["sdpa_bf16"] = time_cuda(lambda: [F.scaled_dot_product_attention(qs, k, v, scale=sc, enable_gqa=True)
                                              for k, v in zip(kalls, valls)], iters=iters, calls_per_iter=len(kalls))
    timings["sdpa_fp16"] = time_cuda(lambda: [F.scaled_dot_product_attention(q16, k, v, scale=sc, enable_gqa=True)
                                              for k, v in zip(k16, v16)], iters=iters, calls_per_iter=len(k16))
    timings["triton_dense"] = time_cuda(lambda: [decode_attention(q, k, v, lens_all, sc) for k, v in zip(kalls, valls)],
                                        iters=iters, calls_per_iter=len(kalls))
    base = timings["sdpa_fp16"]
    for name in ("sdpa_bf16", "sdpa_fp16", "triton_dense"):
        rows.append(timing_row(f"dense_{name}", timings[name], baseline="dense_sdpa_fp16", baseline_timing=base,
                               bytes_moved=dense_bytes(), peak_tb_per_s=PEAK_TB_S, context=N, local=LOCAL, batch=1))

    # selection alone, attention alone (sweep of tile configs), full step
    C = idx.num_clusters
    scores = [decode_scores(q, ix, sc)[:2] for ix in idxs]
    sel_bytes = HKV * C * D * 2 + HQ * C * 4 + HKV * C * 4
    ssweep, sel_chunk, t_sel = [], None, None
    for ch in (64, 32, 128, 256):                         # clusters per scoring program (64: the default)
        t = time_cuda(lambda ch=ch: [K.centroid_scores(q, ix.centroids, ix.log_sizes, sc, chunk=ch) for ix in idxs],
                      iters=iters, calls_per_iter=ncopy)
        ssweep.append({"chunk": ch, "ms": t.median_ms})
        if t_sel is None or t.median_ms < t_sel.median_ms:
            sel_chunk, t_sel = ch, t
    extra["selection_sweep"] = ssweep
    scores = [K.centroid_scores(q, ix.centroids, ix.log_sizes, sc, chunk=sel_chunk) for ix in idxs]
    rows.append(timing_row("squeezed_selection_flat", t_sel, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=sel_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           config={"chunk": sel_chunk}))
    kept_rows = int(kept.sum())
    attn_bytes = kept_rows * D * 2 * 2 + HKV * LOCAL * D * 4 + HQ * C * 4 + HKV * (C + 2) * 4
    sweep = []
    best = None
    # (block_c, block_n, warps, sub_splits, stages): the first 8 as in earlier runs; then fewer warps and fewer
    # pipeline stages (less shared memory and registers per program: more programs resident per SM)
    for bc, bn, w, ns, st in ((32, 32, 4, 1, 2), (16, 32, 4, 1, 2), (32, 32, 4, 2, 2), (64, 32, 4, 2, 2),
                              (32, 16, 4, 2, 2), (64, 64, 8, 2, 2), (32, 32, 4, 1, 1), (32, 32, 4, 2, 1),
                              (32, 32, 2, 1, 1), (32, 32, 2, 2, 1), (16, 32, 2, 1, 1), (64, 32, 2, 2, 1),
                              (32, 32, 2, 1, 2), (32, 16, 2, 2, 1)):
        def attn(bc=bc, bn=bn, w=w, ns=ns, st=st):
            return [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv,
                                             lengths, sc, block_c=bc, block_n=bn, num_warps=w, count_kept=False,
                                             sub_splits=ns, num_stages=st, merge_block_d=None)
                    for ix, (s_, e_) in zip(idxs, scores)]
        cfg = {"block_c": bc, "block_n": bn, "num_warps": w, "sub_splits": ns, "num_stages": st}
        try:
            oo = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk, lv,
                                          lengths, sc, block_c=bc, block_n=bn, num_warps=w, sub_splits=ns,
                                          num_stages=st)[0]
            cfg["rel_err_vs_reference"] = rel(oo, o_r)
            t = time_cuda(attn, iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            sweep.append({**cfg, "error": repr(ex)[:200]})
            continue
        sweep.append({**cfg, "ms": t.median_ms})
        if cfg["rel_err_vs_reference"] < 5e-3 and (best is None or t.median_ms < best[1].median_ms):
            best = ((bc, bn, w, ns, st), t)
    extra["decode_sweep"] = sweep
    (bc, bn, w, nsub, stages), t_attn = best
    extra["decode_best_config"] = {"block_c": bc, "block_n": bn, "num_warps": w, "sub_splits": nsub,
                                   "num_stages": stages}
    rows.append(timing_row("squeezed_attention_only", t_attn, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           kept_fraction=kept_frac, config=extra["decode_best_config"]))

    # where the attention's time goes: the sparse split kernel alone (partials), then the split-K merge alone
    # (shared kernel: one program per head; merge_splits: D / block_d programs per head)
    def parts(ix, s_, e_):
        return K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                        sc, block_c=bc, block_n=bn, num_warps=w, count_kept=False, sub_splits=nsub,
                                        num_stages=stages, partials_only=True)
    t_split = time_cuda(lambda: [parts(ix, s_, e_) for ix, (s_, e_) in zip(idxs, scores)], iters=iters,
                        calls_per_iter=ncopy)
    mids = [parts(ix, s_, e_) for ix, (s_, e_) in zip(idxs, scores)]
    n_splits = mids[0][0].shape[2]
    mid_bytes = HQ * n_splits * (D + 1) * 4
    rows.append(timing_row("squeezed_split_kernel_only", t_split, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=attn_bytes + mid_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           splits=n_splits))
    msweep, mbest = [], None
    for bd in (None, 64, 32, 16):
        tm = time_cuda(lambda bd=bd: [K.merge_splits(mo, ml, q.dtype, bd) for mo, ml in mids], iters=iters,
                       calls_per_iter=ncopy)
        msweep.append({"merge_block_d": bd, "ms": tm.median_ms})
        rows.append(timing_row(f"squeezed_merge_only_{bd or 'shared'}", tm, baseline="dense_sdpa_fp16",
                               baseline_timing=base, bytes_moved=mid_bytes, peak_tb_per_s=PEAK_TB_S, context=N,
                               batch=1, splits=n_splits))
        if mbest is None or tm.median_ms < mbest[1]:
            mbest = (bd, tm.median_ms)
    extra["merge_sweep"] = msweep
    merge_bd = mbest[0]
    extra["decode_best_config"]["merge_block_d"] = merge_bd

    # compacted decode (select + pack, balanced split-K): correctness at this shape, then a tile/split sweep
    oc, _, keptc = K.squeezed_decode_compact_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold,
                                                    lk, lv, lengths, sc)
    extra["compact_rel_err_vs_reference"] = rel(oc, o_r)
    extra["compact_kept_equal_reference"] = bool(torch.equal(keptc, kept_r))
    say(f"N={N}: compact rel err vs reference {extra['compact_rel_err_vs_reference']:.2e}, kept equal "
        f"{extra['compact_kept_equal_reference']}")
    csweep, cbest = [], None
    nsd = K.default_compact_splits(idx.keys.shape[1])
    for bn_, ns_, w_ in ((32, 2 * nsd, 4), (32, nsd, 4)):     # (slower than the fused decode in earlier sweeps)
        def cattn(bn_=bn_, ns_=ns_, w_=w_):
            return [K.squeezed_decode_compact_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk,
                                                     lv, lengths, sc, block_n=bn_, splits=ns_, num_warps=w_,
                                                     count_kept=False)
                    for ix, (s_, e_) in zip(idxs, scores)]
        try:
            t = time_cuda(cattn, iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            csweep.append({"block_n": bn_, "splits": ns_, "num_warps": w_, "error": repr(ex)[:200]})
            continue
        csweep.append({"block_n": bn_, "splits": ns_, "num_warps": w_, "ms": t.median_ms})
        if cbest is None or t.median_ms < cbest[1].median_ms:
            cbest = ((bn_, ns_, w_), t)
    extra["compact_sweep"] = csweep
    (cbn, cns, cw), t_cattn = cbest
    extra["compact_best_config"] = {"block_n": cbn, "splits": cns, "num_warps": cw}
    rows.append(timing_row("squeezed_attention_only_compact", t_cattn, baseline="dense_sdpa_fp16",
                           baseline_timing=base, bytes_moved=attn_bytes + HKV * Nc * 4 * 2, peak_tb_per_s=PEAK_TB_S,
                           context=N, batch=1, kept_fraction=kept_frac, config=extra["compact_best_config"]))

    def full(ixs, taus=None, compact=False):
        def fn():
            for i, ix in enumerate(ixs):
                if ix.hierarchical:
                    s_, e_, _ = decode_scores(q, ix, sc)
                else:
                    s_, e_ = K.centroid_scores(q, ix.centroids, ix.log_sizes, sc, chunk=sel_chunk)
                tau_ = ix.log_threshold if taus is None else taus
                if compact:
                    K.squeezed_decode_compact_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, tau_, lk, lv, lengths,
                                                     sc, block_n=cbn, splits=cns, num_warps=cw, count_kept=False)
                else:
                    K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, tau_, lk, lv, lengths, sc,
                                             block_c=bc, block_n=bn, num_warps=w, count_kept=False,
                                             sub_splits=nsub, num_stages=stages, merge_block_d=merge_bd)
        return fn
    t_fc = time_cuda(full(idxs, compact=True), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_flat_compact", t_fc, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=sel_bytes + attn_bytes + HKV * Nc * 4 * 2, peak_tb_per_s=PEAK_TB_S, context=N,
                           batch=1, sparsity=0.9, centroids=0.05, kept_fraction=kept_frac, threshold="calibrated"))
    t_fc10 = time_cuda(full(idxs, tau10, compact=True), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_flat_compact_kept10", t_fc10, baseline="dense_sdpa_fp16",
                           baseline_timing=base, bytes_moved=sel_bytes + int(kept10.sum()) * D * 4 + HKV * Nc * 8,
                           peak_tb_per_s=PEAK_TB_S, context=N, batch=1, sparsity=0.9, centroids=0.05,
                           kept_fraction=extra["kept_fraction_fixed10"], threshold="fixed 10% for this query"))
    t_hc = time_cuda(full(hidxs, compact=True), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_hierarchical_compact", t_hc, baseline="dense_sdpa_fp16",
                           baseline_timing=base, peak_tb_per_s=PEAK_TB_S, context=N, batch=1, sparsity=0.9,
                           centroids=[0.01, 0.05], kept_fraction=extra["hier_kept_fraction"]))
    t_full = time_cuda(full(idxs), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_flat", t_full, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=sel_bytes + attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           sparsity=0.9, centroids=0.05, kept_fraction=kept_frac, threshold="calibrated",
                           config=extra["decode_best_config"]))
    kept10_rows = int(kept10.sum())
    t_full10 = time_cuda(full(idxs, tau10), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_flat_kept10", t_full10, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=sel_bytes + attn_bytes + (kept10_rows - kept_rows) * D * 4,
                           peak_tb_per_s=PEAK_TB_S, context=N, batch=1, sparsity=0.9, centroids=0.05,
                           kept_fraction=extra["kept_fraction_fixed10"], threshold="fixed 10% for this query"))
    C1 = hidx.coarse_centroids.shape[1]
    h_bytes = HKV * C1 * D * 2 + int(scored.sum()) * D * 2 + int(hkept.sum()) * D * 4 + HKV * LOCAL * D * 4
    t_h = time_cuda(full(hidxs), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_hierarchical", t_h, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=h_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1, sparsity=0.9,
                           centroids=[0.01, 0.05], kept_fraction=extra["hier_kept_fraction"],
                           fine_scored_fraction=extra["hier_fine_scored_fraction"]))
    for r in rows:
        say(f"N={N} {r['method']:32s} {r['ms'] * 1e3:8.1f} us  x{r.get('speedup', float('nan')):5.2f}  "
            f"{r.get('tb_per_s', 0):.2f} TB/s")
    return rows, extra


# --- 3. prefill -------------------------------------------------------------------------------------------------

def bench_prefill(N: int, T: int, dev, iters: int, checkpoint=None) -> tuple[list[dict], dict]:
    """checkpoint(rows, extra): called with the one-key-set-per-chunk rows before the per-token part."""
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.attention import prefill_keep
    from lmsqueeze.methods.squeezed.lookup import keys_from_clusters, mask_to_index

    rows, extra = [], {}
    sc = 1 / math.sqrt(D)
    keys, values, queries = synthetic_context(N, dev, seed=N + 7)
    idx, _ = build_index(keys, values, queries(64))
    q = queries(T).reshape(1, HQ, T, D).to(torch.bfloat16)
    lk = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16)
    lv = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([T], dtype=torch.int32, device=dev)

    def select():
        keep = prefill_keep(q, idx, sc, 0.9, 0.5)
        return mask_to_index(keys_from_clusters(keep, idx.row_cluster))
    ix, cnt = select()
    extra["kept_fraction"] = ((cnt.float() - 64) / idx.clustered).mean().item()
    o = K.indexed_attention(q, idx.keys, idx.values, ix, cnt, lk, lv, lengths, sc)
    o_r, _ = R.indexed_attention_reference(q[:, :, -128:], idx.keys, idx.values, ix, cnt, lk, lv, lengths, sc)
    extra["rel_err_vs_reference_last128"] = rel(o[:, :, -128:], o_r)
    kall = torch.cat([keys, lk[0]], 1)[None]
    vall = torch.cat([values, lv[0]], 1)[None]
    base = time_cuda(lambda: F.scaled_dot_product_attention(q, kall, vall, scale=sc, enable_gqa=True), iters=iters,
                     use_graph=False)
    flops_dense = 4 * HQ * T * (N + T) * D
    rows.append(timing_row("prefill_dense_sdpa_bf16", base, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T, tflops=flops_dense / (base.median_ms * 1e-3) / 1e12))
    t_sel = time_cuda(select, iters=iters, use_graph=False)
    rows.append(timing_row("prefill_squeezed_selection", t_sel, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T))
    # where the selection's time goes: the scoring kernel alone, and the rest (top clusters, key list)
    t_ps = time_cuda(lambda: K.prefill_scores(q, idx.centroids, idx.log_sizes[None], sc), iters=iters,
                     use_graph=False)
    rows.append(timing_row("prefill_squeezed_selection_scores_kernel", t_ps, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T,
                           tflops=4 * HQ * T * idx.num_clusters * D / (t_ps.median_ms * 1e-3) / 1e12))
    sweep, best = [], None
    for bm, w, st in (((128, 8, 3),) if PREFILL_SHORT else ((64, 4, 2), (64, 8, 2), (128, 8, 2), (128, 8, 3))):
        try:
            t = time_cuda(lambda bm=bm, w=w, st=st: K.indexed_attention_triton(
                q, idx.keys, idx.values, ix, cnt, lk, lv, lengths, sc, block_m=bm, num_warps=w, num_stages=st),
                iters=iters, use_graph=False)
        except Exception as ex:  # noqa: BLE001
            sweep.append({"block_m": bm, "num_warps": w, "num_stages": st, "error": repr(ex)[:200]})
            continue
        sweep.append({"block_m": bm, "num_warps": w, "num_stages": st, "ms": t.median_ms})
        if best is None or t.median_ms < best[1].median_ms:
            best = ((bm, w, st), t)
    extra["attention_sweep"] = sweep
    (bm, w, st), t_attn = best
    flops_sparse = 4 * HQ * T * (float(cnt.float().mean()) + T / 2) * D
    rows.append(timing_row("prefill_squeezed_attention_only", t_attn, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, config=[bm, w, st],
                           tflops=flops_sparse / (t_attn.median_ms * 1e-3) / 1e12))

    def full():
        i, c = select()
        return K.indexed_attention_triton(q, idx.keys, idx.values, i, c, lk, lv, lengths, sc, block_m=bm,
                                          num_warps=w, num_stages=st)
    t_full = time_cuda(full, iters=iters, use_graph=False)
    rows.append(timing_row("prefill_squeezed", t_full, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T, sparsity=0.9, kept_fraction=extra["kept_fraction"],
                           prefill="chunk"))
    if checkpoint is not None:
        checkpoint(rows, extra)
    try:
        rows += _prefill_per_token(q, idx, lk, lv, lengths, sc, base, N, T, iters, extra)
    except Exception:  # noqa: BLE001
        extra["per_token_error"] = traceback.format_exc()[-2000:]
        say(f"per-token prefill raised:\n{traceback.format_exc()[-1500:]}")
    for r in rows:
        say(f"prefill {r['method']:34s} {r['ms']:8.3f} ms  x{r.get('speedup', float('nan')):5.2f}")
    return rows, extra


def _prefill_per_token(q, idx, lk, lv, lengths, sc, base, N, T, iters, extra) -> list[dict]:
    """Per-token prefill (the library default, prefill='token'): each token's clusters by the calibrated
    threshold (token_keep), then attention where a block of queries lists the union of its tokens' rows and
    masks per token. Correctness on the last 32 tokens vs the reference; block sizes swept."""
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.token_select import kept_rows, token_keep

    rows = []
    keep = token_keep(q, idx, sc, 0.9, 0.5, "threshold")
    per_tok = kept_rows(keep, idx.offsets) - 64                                    # clustered rows per token
    extra["token_kept_fraction"] = (per_tok / idx.clustered).mean().item()
    o = K.token_select_attention(q, idx.keys, idx.values, keep, idx.row_cluster, lk, lv, lengths, sc)
    o_r, _ = R.token_select_attention_reference(q[:, :, -32:], idx.keys, idx.values, keep[:, :, -32:],
                                                idx.row_cluster, lk, lv, lengths, sc)
    extra["token_rel_err_vs_reference_last32"] = rel(o[:, :, -32:], o_r)
    t_sel = time_cuda(lambda: token_keep(q, idx, sc, 0.9, 0.5, "threshold"), iters=iters, use_graph=False)
    rows.append(timing_row("prefill_token_selection", t_sel, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T))
    sweep, best = [], None
    for bm, w, st in (((128, 8, 3), (64, 4, 2)) if PREFILL_SHORT else ((128, 8, 3), (64, 4, 2), (32, 4, 2),
                                                                       (16, 4, 2))):
        _, cnt = K.block_rows(keep, idx.row_cluster, HQ // HKV, bm)
        union = ((cnt.float() - 64) / idx.clustered).mean().item()
        try:
            t = time_cuda(lambda bm=bm, w=w, st=st: K.token_select_attention_triton(
                q, idx.keys, idx.values, keep, idx.row_cluster, lk, lv, lengths, sc, block_m=bm, num_warps=w,
                num_stages=st), iters=iters, use_graph=False)
        except Exception as ex:  # noqa: BLE001
            sweep.append({"block_m": bm, "num_warps": w, "num_stages": st, "error": repr(ex)[:200]})
            continue
        sweep.append({"block_m": bm, "num_warps": w, "num_stages": st, "ms": t.median_ms,
                      "union_kept_fraction": union})
        if best is None or t.median_ms < best[1].median_ms:
            best = ((bm, w, st, union), t)
    extra["token_attention_sweep"] = sweep
    (bm, w, st, union), t_attn = best
    rows.append(timing_row("prefill_token_attention_only", t_attn, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, config=[bm, w, st],
                           union_kept_fraction=union, note="includes building the per-block row lists"))

    def full():
        kp = token_keep(q, idx, sc, 0.9, 0.5, "threshold")
        return K.token_select_attention_triton(q, idx.keys, idx.values, kp, idx.row_cluster, lk, lv, lengths, sc,
                                               block_m=bm, num_warps=w, num_stages=st)
    t_full = time_cuda(full, iters=iters, use_graph=False)
    rows.append(timing_row("prefill_squeezed_per_token", t_full, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, sparsity=0.9, prefill="token",
                           kept_fraction=extra["token_kept_fraction"], union_kept_fraction=union))
    for r in rows:
        say(f"prefill {r['method']:34s} {r['ms']:8.3f} ms  x{r.get('speedup', float('nan')):5.2f}")
    return rows


def plot(result: str, png: str) -> None:
    """Bar chart of the decode rows of a result JSON (time per variant, bytes floor, speedup)."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    d = json.loads(Path(result).read_text())
    names = ["dense_sdpa_bf16", "squeezed_selection_flat", "squeezed_attention_only", "squeezed_decode_flat",
             "squeezed_decode_hierarchical"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, n in zip(axes, (32768, 131072)):
        rows = {r["method"]: r for r in d["rows"] if r.get("context") == n}
        vals = [rows[m]["ms"] * 1e3 for m in names]
        floors = [rows[m].get("floor_ms", 0) * 1e3 for m in names]
        ax.bar(range(len(names)), vals, color=["gray", "tab:orange", "tab:blue", "tab:green", "tab:olive"])
        ax.scatter(range(len(names)), floors, color="k", marker="_", s=300, label="bytes / 3.0 TB/s")
        for i, m in enumerate(names):
            ax.text(i, vals[i], f"{vals[i]:.0f}us\nx{rows[m]['speedup']:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), [m.replace("squeezed_", "sq_").replace("dense_", "") for m in names],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{n // 1024}K fixed context, Llama-3-8B attention, B=1, bf16")
        ax.set_ylabel("us per decode step (one layer)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Squeezed Attention decode, {d['device']['name']}, 90% sparsity, 5% centroids (CUDA graphs)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/squeezed_decode_h100.json")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=215.0, help="skip later sections past this wall time")
    ap.add_argument("--plot-from", default=None, help="only plot this result JSON to --plot (no GPU needed)")
    ap.add_argument("--plot", default="benchmarks/plots/squeezed_decode_h100.png")
    ap.add_argument("--quick", action="store_true", help="decode sweeps only: no checks, no prefill")
    ap.add_argument("--sections", default="checks,decode,prefill",
                    help="comma-separated sections to run (checks, decode, prefill)")
    ap.add_argument("--prefill-sweep", default="full", choices=("full", "short"),
                    help="short: only the attention tile configs that won earlier sweeps (fewer compiles)")
    args = ap.parse_args()
    global QUICK, PREFILL_SHORT
    QUICK = args.quick
    PREFILL_SHORT = args.prefill_sweep == "short"
    sections = set(args.sections.split(","))
    if args.plot_from:
        plot(args.plot_from, args.plot)
        return 0
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    extra: dict = {"checks": [], "errors": [], "log": LOG}

    def save():
        write_result(args.out, "squeezed_decode", command_line(), rows, extra, device=dev)

    for name, fn in (() if QUICK or "checks" not in sections else
                     (("kernels", lambda: check_kernels(dev)), ("model", lambda: check_model(dev)))):
        try:
            res = fn()
            extra["checks"] += res
            bad = [r for r in res if not r["ok"]]
            say(f"check {name}: {len(res) - len(bad)}/{len(res)} ok" + (f"; FAILED {bad}" if bad else ""))
        except Exception:  # noqa: BLE001
            extra["errors"].append({"section": name, "trace": traceback.format_exc()[-2000:]})
            say(f"check {name} raised:\n{traceback.format_exc()[-1500:]}")
        save()
    for N in (int(x) for x in args.contexts.split(",")) if "decode" in sections else ():
        if time.time() - T0 > args.budget_s:
            say(f"skipping decode N={N}: out of time")
            continue
        try:
            r, e = bench_decode(N, dev, args.iters)
            rows += r
            extra[f"decode_{N}"] = e
        except Exception:  # noqa: BLE001
            extra["errors"].append({"section": f"decode_{N}", "trace": traceback.format_exc()[-2000:]})
            say(f"decode N={N} raised:\n{traceback.format_exc()[-1500:]}")
        torch.cuda.empty_cache()
        save()
    if time.time() - T0 <= args.budget_s and not QUICK and "prefill" in sections:
        try:
            r, e = bench_prefill(131072, 1024, dev, max(20, args.iters // 2), checkpoint=lambda r_, e_: write_result(
                args.out, "squeezed_decode", command_line(), rows + r_, {**extra, "prefill_131072_1024": e_},
                device=dev))
            rows += r
            extra["prefill_131072_1024"] = e
        except Exception:  # noqa: BLE001
            extra["errors"].append({"section": "prefill", "trace": traceback.format_exc()[-2000:]})
            say(f"prefill raised:\n{traceback.format_exc()[-1500:]}")
        save()
    print("\n== summary ==")
    for r in rows:
        if "speedup" in r:
            print(f"{r['method']:36s} ctx={r.get('context')} {r['ms'] * 1e3:9.1f} us  speedup x{r['speedup']:.2f}"
                  f"  {r.get('tb_per_s', float('nan')):.2f} TB/s  kept={r.get('kept_fraction', '')}")
    print("checks ok:", sum(c["ok"] for c in extra["checks"]), "/", len(extra["checks"]), "errors:", len(extra["errors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
