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
    # v2 (decode sweeps incl. the in-kernel merge, prefill sweeps; model checks with the in-kernel merge):
    python benchmarks/scripts/bench_squeezed.py --out squeezed_decode_h100_v2.json --budget-s 250 \
        --check-kernels centroid_scores,squeezed_decode,fused_decode_merge_in_kernel --model-checks graph \
        --model-checks-last --fused-merge-checks
    # v3 (decode probe: blocks per program, keep-nothing fixed cost, registers; prefill; all model checks):
    python benchmarks/scripts/bench_squeezed.py --out squeezed_decode_h100_v3.json --sections checks,probe,prefill \
        --budget-s 265 --check-kernels fused_decode_bpp,prefill_scores,indexed_attention --model-checks-last
    # v4 (the same v3 command at ced64f2: next-tile prefetch and rows_from_clusters timed)
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
import types

import torch
import torch.nn.functional as F

from lmsqueeze.bench.results import command_line, timing_row, write_result
from lmsqueeze.bench.timing import time_cuda

PEAK_TB_S = 3.0
HQ, HKV, D = 32, 8, 128
LOCAL = 256
T0 = time.time()
LOG: list[str] = []
QUICK = False   # --quick: decode sweeps only (no checks, no prefill)
PREFILL_SHORT = False   # --prefill-sweep short: the prefill attention configs that won earlier sweeps only
PER_TOKEN = False       # --per-token: also time the per-token prefill rule (30 ms at 128K; slow to run)
# centroid scoring for decode: (clusters per program, warps)
SELECTION_SWEEP = ((32, 4), (64, 4), (128, 4), (128, 8), (256, 8))
# fused decode: (clusters per program, keys per tile, warps, programs per cluster block, pipeline stages, fused
# merge); the previous default (32, 32, 4, 2 up to 64 blocks else 1, 2, separate merge) is always timed first
DECODE_SWEEP = ((32, 32, 4, 2, 2, True), (32, 32, 4, 1, 2, True), (64, 32, 4, 1, 3, True), (128, 32, 4, 1, 3, True),
                (128, 64, 8, 1, 3, True), (256, 32, 4, 1, 3, True), (256, 64, 8, 1, 3, True),
                (128, 32, 4, 2, 3, True), (256, 64, 8, 2, 3, True), (64, 64, 8, 1, 3, True))
DECODE_LOCAL_SPLITS = (4, 8)
# decode probe (separate merge): (clusters per program, keys per tile, warps, programs per block or None: the
# previous default's rule, stages, blocks of clusters per program, in-kernel merge); the first is the previous
# default; blocks per program are strided, one softmax and one partial for all
DECODE_PROBE = ((32, 32, 4, None, 2, 1, False), (128, 32, 4, 2, 3, 1, False),
                (32, 32, 4, 1, 1, 4, False), (32, 32, 4, 1, 1, 4, True))
# (v4 also timed a tile loop that prefetched the next tile: slower at every config, removed from the kernel)
# prefill centroid scoring: (queries, centroids per tile, warps, stages); the first is the previous default
PREFILL_SCORES_SWEEP = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3),
                        (128, 128, 8, 2), (128, 32, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3), (128, 32, 4, 4),
                        (128, 64, 4, 3, False), (128, 32, 4, 4, False), (128, 64, 4, 2), (128, 128, 4, 3),
                        (64, 64, 4, 2), (256, 64, 8, 2), (128, 64, 8, 2), (128, 64, 4, 3, "rows"),
                        (128, 128, 4, 3, "rows"), (128, 32, 4, 3, "rows"), (64, 64, 4, 3, "rows"))
# (5th: False = base-e exponentials with a select per score, the kernel before PREFILL_SCORES_EXP2; "rows": pass 2
# on the untransposed tile, the kernel before its PASS2_T)
# prefill gather attention: (query rows per program, warps, stages, keys per tile)
PREFILL_ATTN_SWEEP = ((128, 8, 3, 64), (128, 8, 4, 64), (128, 8, 2, 128), (64, 4, 3, 64), (64, 4, 4, 64),
                      (64, 4, 3, 32), (64, 4, 2, 128), (32, 4, 3, 64), (128, 4, 3, 64), (128, 4, 2, 32),
                      (128, 8, 3, 32), (256, 8, 2, 32), (64, 4, 3, 64, False), (128, 8, 3, 32, False),
                      (128, 8, 3, 128), (128, 8, 2, 64), (256, 8, 2, 64), (128, 4, 2, 128), (256, 16, 2, 64),
                      (256, 16, 2, 128), (256, 16, 3, 64), (256, 16, 2, 32), (256, 16, 3, 32), (256, 16, 4, 32))
# (5th: False = every tile masked, the kernel before PREFILL_STEADY; default: kernels.PREFILL_STEADY)
CHECK_KERNELS = None    # --check-kernels: only the kernel checks whose name starts with one of these
MODEL_CHECKS = "all"    # --model-checks graph: only graph decode == eager decode


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

    def want(name):
        return CHECK_KERNELS is None or any(name.startswith(p) for p in CHECK_KERNELS)
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
            from lmsqueeze.methods.squeezed.listed import squeezed_decode_listed_triton
            for name, impl, kw in (("fused_decode", K.squeezed_decode_triton, {}),
                                   ("listed_decode", squeezed_decode_listed_triton, {}),
                                   ("listed_decode_p5_sel64_e4", squeezed_decode_listed_triton,
                                    {"programs": 5, "select_block": 64, "block_e": 4}),
                                   ("fused_decode_early_local_first_hoist", K.squeezed_decode_triton,
                                    {"early": True, "local_first": True, "hoist_v": True}),
                                   ("fused_decode_merge_in_kernel", K.squeezed_decode_triton,
                                    {"fused_merge": True}),
                                   ("fused_decode_merge_in_kernel_c128_n64", K.squeezed_decode_triton,
                                    {"fused_merge": True, "block_c": 128, "block_n": 64, "num_warps": 8,
                                     "num_stages": 3}),
                                   ("fused_decode_merge_in_kernel_c256_nsub2", K.squeezed_decode_triton,
                                    {"fused_merge": True, "block_c": 256, "sub_splits": 2, "num_stages": 3}),
                                   ("fused_decode_bpp4", K.squeezed_decode_triton,
                                    {"blocks_per_program": 4, "sub_splits": 1}),
                                   ("fused_decode_bpp4_nsub2_merge_in_kernel", K.squeezed_decode_triton,
                                    {"blocks_per_program": 4, "sub_splits": 2, "fused_merge": True})):
                for rep in range(2 if want(name) else 0):   # twice: the tickets must be left at 0
                    o, lse, kept = impl(q, keys, vals, offs, s_r, e_r, tau, lk, lv, lengths, sc, starts,
                                        local_splits=2, **kw)
                    out.append({**case, "kernel": f"{name}#{rep}", "rel_err": rel(o, o_r), "lse_err": rel(lse, lse_r),
                                "kept_equal": bool(torch.equal(kept, kept_r)), "tol": tol})
            qq = torch.randn(B, Hkv * G, T, Dh, generator=gen).to(dev, dtype)
            mask = torch.rand(B, Hkv, keys.shape[1], generator=gen).to(dev) < 0.3
            idx, cnt = mask_to_index(mask)
            lengths2 = torch.tensor([T + 3, L], dtype=torch.int32, device=dev)
            if want("indexed_attention"):
                o = K.indexed_attention(qq, keys, vals, idx, cnt, lk, lv, lengths2, sc, starts)
                o_r, _ = R.indexed_attention_reference(qq, keys, vals, idx, cnt, lk, lv, lengths2, sc, starts)
                out.append({**case, "kernel": "indexed_attention", "rel_err": rel(o, o_r), "tol": tol})
            keep = torch.rand(B, Hkv, T, C + 1, generator=gen).to(dev) < 0.3
            offs_l = offs.long()
            rc = torch.repeat_interleave(torch.arange(C + 1, device=dev).repeat(Hkv),
                                         (offs_l[:, 1:] - offs_l[:, :-1]).flatten()).reshape(Hkv, -1)
            if want("token_select_attention"):
                o = K.token_select_attention(qq, keys, vals, keep, rc, lk, lv, lengths2, sc, starts)
                o_r, _ = R.token_select_attention_reference(qq, keys, vals, keep, rc, lk, lv, lengths2, sc, starts)
                out.append({**case, "kernel": "token_select_attention", "rel_err": rel(o, o_r), "tol": tol})
            for bd in (32, None) if want("merge_splits") else ():
                mo = torch.randn(B, Hkv * G, 45, Dh, generator=gen).to(dev)
                ml = torch.randn(B, Hkv * G, 45, generator=gen).to(dev)
                mo_, _ = K.merge_splits(mo, ml, dtype, bd)
                ref_m = (torch.softmax(ml, -1)[..., None] * mo).sum(-2)
                out.append({**case, "kernel": f"merge_splits_{bd}", "rel_err": rel(mo_, ref_m), "tol": tol})
            for cfg in (None,) if want("prefill_scores") else ():   # the default config (PREFILL_SCORES_CONFIG)
                p = K.prefill_scores_triton(qq, cents, ls[None], sc, *(cfg or ()))
                p_r = R.prefill_scores_reference(qq, cents, ls[None], sc)
                out.append({**case, "kernel": f"prefill_scores_{cfg}", "rel_err": rel(p, p_r), "tol": tol})
            if not want("fine_scores"):
                continue
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
    from lmsqueeze.methods.squeezed import kernels as K

    for hier, mode in (((None, "token"), ((0.02, 0.1), "token"), (None, "chunk"), (None, "token-budget"))
                       if MODEL_CHECKS == "all" else ()):
        art0 = SqueezedAttention(centroids=0.1, sparsity=0.0, coarse_sparsity=0.0, hierarchical=hier,
                                 observation=16, prefill=mode).prepare(m, ids[:, :S])
        with lmsqueeze.apply(m, art0) as sess, torch.no_grad():
            c = sess.new_cache()
            logits = [m(ids[:, S:S + 6], past_key_values=c).logits[0]]
            logits += [m(ids[:, i:i + 1], past_key_values=c).logits[0] for i in range(S + 6, S + T)]
        err = (torch.cat(logits) - ref).abs().max().item()
        out.append({"check": f"sparsity0_equals_dense{'_hier' if hier else ''}_{mode}", "max_abs_logit_err": err,
                    "ok": err < 1e-3})
    # bf16: the 'chunk' prefill takes attention.prefill_gathered (cuDNN over the gathered rows) when available;
    # at sparsity 0 it must match dense bf16 logits
    if MODEL_CHECKS == "all":
        import copy

        from lmsqueeze.methods.squeezed import attention as A
        mb = copy.deepcopy(m).to(torch.bfloat16)
        with torch.no_grad():
            ref_b = mb(ids).logits[0, S:].float()
        art_b = SqueezedAttention(centroids=0.1, sparsity=0.0, observation=16, prefill="chunk").prepare(mb, ids[:, :S])
        with lmsqueeze.apply(mb, art_b) as sess, torch.no_grad():
            c = sess.new_cache()
            logits = [mb(ids[:, S:S + 6], past_key_values=c).logits[0]]
            logits += [mb(ids[:, i:i + 1], past_key_values=c).logits[0] for i in range(S + 6, S + T)]
        err = (torch.cat(logits).float() - ref_b).abs().max().item() / ref_b.abs().max().item()
        used = A.gather_sdpa_ok(torch.empty(1, device=dev, dtype=torch.bfloat16), art_b_index(art_b, dev), None, None)
        out.append({"check": "sparsity0_equals_dense_chunk_bf16", "gathered_path": used, "rel_max_logit_err": err,
                    "ok": err < 2e-2})
        del mb
    dense_tok = generate(m, ids, max_new_tokens=12, use_graph=True).new_tokens
    for sp, hier in ((0.0, None), (0.9, None), (0.9, (0.02, 0.1))):
        art = SqueezedAttention(centroids=0.1, sparsity=sp, coarse_sparsity=0.0 if sp == 0 else 0.5,
                                hierarchical=hier, observation=16).prepare(m, ids[:, :S])
        clear_runners(m)
        eager = generate(m, ids[:, S:], max_new_tokens=12, method=art, use_graph=False)
        clear_runners(m)
        graph = generate(m, ids[:, S:], max_new_tokens=12, method=art, use_graph=True)
        row = {"check": f"graph_decode_equals_eager_s{sp}{'_hier' if hier else ''}", "graph": graph.graph,
               "fused_merge": K.DECODE_FUSED_MERGE,
               "ok": bool(torch.equal(eager.new_tokens, graph.new_tokens)) and graph.graph}
        if sp == 0:
            row["equals_dense_tokens"] = bool(torch.equal(graph.new_tokens, dense_tok))
            row["ok"] = row["ok"] and row["equals_dense_tokens"]
        out.append(row)
    return out


def art_b_index(art, dev):
    """Layer 0's index of a prepared artifact (for gather_sdpa_ok's shape conditions)."""
    from lmsqueeze.methods.squeezed.index import SqueezedIndex
    from lmsqueeze.methods.squeezed.state import cached_layer
    return cached_layer(art, 0, dev, torch.bfloat16, SqueezedIndex.from_tensors)


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


def probe_parser(doc: str, iters: int) -> argparse.ArgumentParser:
    """The decode probes' command line (probe_listed_decode.py, sweep_squeezed_decode.py, trace_listed_decode.py):
    --out JSON, --contexts (comma-separated), --iters."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--iters", type=int, default=iters)
    return ap


def decode_case(N: int, dev) -> types.SimpleNamespace:
    """The decode probes' inputs at context N (trace_squeezed_decode.py, probe_listed_decode.py): the synthetic
    context (keys, values), its flat index (stats) and rotation copies (idxs, ncopy of them, so graph replays do not
    read from L2), one bf16 query q [1, HQ, D], a 1024-slot local cache (lk, lv) holding LOCAL tokens (lengths),
    and time_sdpa(iters): dense fp16 SDPA over context + local tokens (two copies), the baseline."""
    keys, values, queries = synthetic_context(N, dev, seed=N)
    idx, stats = build_index(keys, values, queries(64))
    q = queries(1).reshape(1, HQ, D).to(torch.bfloat16)
    lk = torch.randn(1, HKV, 1024, D, device=dev, dtype=torch.bfloat16)
    lv = torch.randn(1, HKV, 1024, D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([LOCAL], dtype=torch.int32, device=dev)
    ncopy = 6 if N <= 40000 else 3
    idxs = [idx] + [clone_index(idx) for _ in range(ncopy - 1)]
    kall = torch.cat([keys, lk[0, :, :LOCAL]], 1)[None].half()
    vall = torch.cat([values, lv[0, :, :LOCAL]], 1)[None].half()
    k16, v16, q16 = [kall, kall.clone()], [vall, vall.clone()], q[:, :, None].half()

    def time_sdpa(iters: int):
        return time_cuda(lambda: [F.scaled_dot_product_attention(q16, k, v, scale=1 / math.sqrt(D), enable_gqa=True)
                                  for k, v in zip(k16, v16)], iters=iters, calls_per_iter=len(k16))
    return types.SimpleNamespace(keys=keys, values=values, idx=idx, stats=stats, idxs=idxs, ncopy=ncopy, q=q, lk=lk,
                                 lv=lv, lengths=lengths, time_sdpa=time_sdpa)


def bench_decode(N: int, dev, iters: int) -> tuple[list[dict], dict]:
    from lmsqueeze.kernels.decode_attention import decode_attention
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import listed as LS
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

    # selection alone (sweep of clusters per program and warps), attention alone (sweep of tile configs), full step
    C = idx.num_clusters
    sel_bytes = HKV * C * D * 2 + HQ * C * 4 + HKV * C * 4
    ssweep, sel_cfg, t_sel = [], None, None
    for ch, sw in SELECTION_SWEEP:
        try:
            t = time_cuda(lambda ch=ch, sw=sw: [K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, chunk=ch,
                                                                         num_warps=sw) for ix in idxs],
                          iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            ssweep.append({"chunk": ch, "num_warps": sw, "error": repr(ex)[:200]})
            continue
        ssweep.append({"chunk": ch, "num_warps": sw, "ms": t.median_ms})
        if t_sel is None or t.median_ms < t_sel.median_ms:
            sel_cfg, t_sel = (ch, sw), t
    extra["selection_sweep"] = ssweep
    sel_chunk, sel_warps = sel_cfg

    def score(ix):
        return K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, chunk=sel_chunk, num_warps=sel_warps)
    scores = [score(ix) for ix in idxs]
    s, e = scores[0]
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    rows.append(timing_row("squeezed_selection_flat", t_sel, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=sel_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           config={"chunk": sel_chunk, "num_warps": sel_warps}))
    kept_rows = int(kept.sum())
    attn_bytes = kept_rows * D * 2 * 2 + HKV * LOCAL * D * 4 + HQ * C * 4 + HKV * (C + 2) * 4
    # the decode default before this run: 32 clusters / 32 keys, 4 warps, 2 programs per block up to 64 blocks,
    # 2 stages, separate merge launch
    prev_default = (32, 32, 4, 2 if -(-(C + 1) // 32) <= 64 else 1, 2, False)
    # the same with the local (user + generated) slots split over more programs (7th: local splits; default:
    # kernels.default_local_splits of the local buffer)
    configs = [prev_default] + [(*prev_default, ls) for ls in DECODE_LOCAL_SPLITS]
    configs += [c for c in DECODE_SWEEP if c != prev_default]

    def decode_kw(cfg):
        bc, bn, w, ns, st, fu, *ls = cfg
        kw = {"block_c": bc, "block_n": bn, "num_warps": w, "sub_splits": ns, "num_stages": st, "fused_merge": fu}
        return {**kw, "local_splits": ls[0]} if ls else kw

    sweep, best = [], None
    for cfg in configs:
        kw = decode_kw(cfg)
        row = dict(kw)
        try:
            oo, _, kk = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                  lv, lengths, sc, **kw)
            row["rel_err_vs_reference"] = rel(oo, o_r)
            row["kept_equal_reference"] = bool(torch.equal(kk, kept_r))
            t = time_cuda(lambda kw=kw: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_,
                                                                  ix.log_threshold, lk, lv, lengths, sc,
                                                                  count_kept=False, **kw)
                                         for ix, (s_, e_) in zip(idxs, scores)],
                          iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            sweep.append({**row, "error": repr(ex)[:300]})
            say(f"N={N} decode config {kw} raised {repr(ex)[:300]}")
            continue
        row["ms"] = t.median_ms
        sweep.append(row)
        ok = row["rel_err_vs_reference"] < 5e-3 and row["kept_equal_reference"]
        if ok and (best is None or t.median_ms < best[1].median_ms):
            best = (cfg, t)
    extra["decode_sweep"] = sweep
    extra["decode_prev_default_config"] = decode_kw(prev_default)
    cfg_best, t_attn = best
    # the in-kernel merge leaves its tickets at 0: three calls in a row give the same answer as the reference
    reps = [K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk, lv, lengths,
                                     sc, **decode_kw(cfg_best))[0] for _ in range(3)]
    extra["best_repeat_calls_equal"] = all(torch.equal(r_, reps[0]) for r_ in reps)
    extra["best_rel_err_vs_reference"] = rel(reps[-1], o_r)
    extra["decode_best_config"] = decode_kw(cfg_best)
    say(f"N={N}: best decode config {extra['decode_best_config']} {t_attn.median_ms * 1e3:.1f} us")
    rows.append(timing_row("squeezed_attention_only", t_attn, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           kept_fraction=kept_frac, config=extra["decode_best_config"]))
    # the same tiles with the separate merge launch, and the parts: split kernel alone (partials), merge alone
    kw_unfused = {**decode_kw(cfg_best), "fused_merge": False}
    t_unf = time_cuda(lambda: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold,
                                                        lk, lv, lengths, sc, count_kept=False, **kw_unfused)
                               for ix, (s_, e_) in zip(idxs, scores)], iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_attention_only_unfused_merge", t_unf, baseline="dense_sdpa_fp16",
                           baseline_timing=base, bytes_moved=attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           kept_fraction=kept_frac, config=kw_unfused))

    def parts(ix, s_, e_):
        return K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                        sc, count_kept=False, partials_only=True, **kw_unfused)
    t_split = time_cuda(lambda: [parts(ix, s_, e_) for ix, (s_, e_) in zip(idxs, scores)], iters=iters,
                        calls_per_iter=ncopy)
    mids = [parts(ix, s_, e_) for ix, (s_, e_) in zip(idxs, scores)]
    n_splits = mids[0][0].shape[2]
    mid_bytes = HQ * n_splits * (D + 1) * 4
    rows.append(timing_row("squeezed_split_kernel_only", t_split, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=attn_bytes + mid_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           splits=n_splits, config=kw_unfused))
    tm = time_cuda(lambda: [K.merge_splits(mo, ml, q.dtype, K.MERGE_BLOCK_D) for mo, ml in mids], iters=iters,
                   calls_per_iter=ncopy)
    rows.append(timing_row(f"squeezed_merge_only_{K.MERGE_BLOCK_D}", tm, baseline="dense_sdpa_fp16",
                           baseline_timing=base, bytes_moved=mid_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           splits=n_splits))

    # the listed decode (listed.py) at this shape: same answer as the reference?
    o_l, _, kept_l = LS.squeezed_decode_listed_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold,
                                                      lk, lv, lengths, sc)
    extra["listed_rel_err_vs_reference"] = rel(o_l, o_r)
    extra["listed_kept_equal_reference"] = bool(torch.equal(kept_l, kept_r))
    extra["default_path"] = "listed" if LS.use_listed(C) else "block"

    def full(ixs, taus=None, kw=None, chunk=None, warps=None, path="default"):
        """The whole step; path: 'default' (the library's rule: listed from LS.LIST_MIN_CLUSTERS clusters, with
        its defaults), 'block' (the block decode with `kw`, default the sweep's best) or 'listed'."""
        listed = path == "listed" or (path == "default" and kw is None and LS.use_listed(C))
        kw = kw or decode_kw(cfg_best)
        chunk, warps = chunk or sel_chunk, warps or sel_warps

        def fn():
            for ix in ixs:
                if ix.hierarchical:
                    s_, e_, _ = decode_scores(q, ix, sc)
                else:
                    s_, e_ = K.centroid_scores_triton(q, ix.centroids, ix.log_sizes, sc, chunk=chunk, num_warps=warps)
                tau = ix.log_threshold if taus is None else taus
                if listed:
                    LS.squeezed_decode_listed_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, tau, lk, lv, lengths,
                                                     sc, count_kept=False)
                else:
                    K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, tau, lk, lv, lengths, sc,
                                             count_kept=False, **kw)
        return fn
    t_full = time_cuda(full(idxs), iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_flat", t_full, baseline="dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=sel_bytes + attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           sparsity=0.9, centroids=0.05, kept_fraction=kept_frac, threshold="calibrated",
                           path=extra["default_path"],
                           config={**extra["decode_best_config"], "selection_chunk": sel_chunk,
                                   "selection_warps": sel_warps}))
    for path in ("block", "listed"):   # both decodes at every size, same run
        t_p = time_cuda(full(idxs, path=path), iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(f"squeezed_decode_flat_{path}", t_p, baseline="dense_sdpa_fp16", baseline_timing=base,
                               bytes_moved=sel_bytes + attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                               sparsity=0.9, centroids=0.05, kept_fraction=kept_frac, threshold="calibrated",
                               config=({"programs": LS.LIST_PROGRAMS, "stages": LS.LIST_STAGES,
                                        "select_block": LS.LIST_SELECT_BLOCK} if path == "listed"
                                       else extra["decode_best_config"])))
    if torch.cuda.get_device_capability()[0] >= 9:   # the same step with the other programmatic-launch setting
        pdl_default = K.DECODE_PDL
        K.DECODE_PDL = not pdl_default
        try:
            t_pdl = time_cuda(full(idxs), iters=iters, calls_per_iter=ncopy)
            s_p, e_p = K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, chunk=sel_chunk,
                                                num_warps=sel_warps)
            out_p = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s_p, e_p, idx.log_threshold, lk,
                                             lv, lengths, sc, **decode_kw(cfg_best))[0]
        finally:
            K.DECODE_PDL = pdl_default                 # later rows and contexts run the default again
        s_n, e_n = K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, chunk=sel_chunk, num_warps=sel_warps)
        out_n = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s_n, e_n, idx.log_threshold, lk, lv,
                                         lengths, sc, **decode_kw(cfg_best))[0]
        other = "no_pdl" if pdl_default else "pdl"
        rows.append(timing_row(f"squeezed_decode_flat_{other}", t_pdl, baseline="dense_sdpa_fp16",
                               baseline_timing=base, bytes_moved=sel_bytes + attn_bytes, peak_tb_per_s=PEAK_TB_S,
                               context=N, batch=1, sparsity=0.9, centroids=0.05, kept_fraction=kept_frac,
                               threshold="calibrated", equal_to_default=bool(torch.equal(out_p, out_n)),
                               note=f"squeezed_decode_flat with programmatic dependent launch "
                                    f"{'off' if pdl_default else 'on'} (default: {'on' if pdl_default else 'off'}), "
                                    "same run"))
    prev_sel = 32 if N <= 40000 else 128          # the previous run's selection chunk at this size
    t_prev = time_cuda(full(idxs, kw=decode_kw(prev_default), chunk=prev_sel, warps=4), iters=iters,
                       calls_per_iter=ncopy)
    rows.append(timing_row("squeezed_decode_flat_prev_default", t_prev, baseline="dense_sdpa_fp16",
                           baseline_timing=base, bytes_moved=sel_bytes + attn_bytes, peak_tb_per_s=PEAK_TB_S,
                           context=N, batch=1, sparsity=0.9, centroids=0.05, kept_fraction=kept_frac,
                           threshold="calibrated", config={**decode_kw(prev_default), "selection_chunk": prev_sel,
                                                           "selection_warps": 4},
                           note="the decode default before this run (separate merge launch), same run"))
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


def _kernel_resources(fn) -> list[dict]:
    """Registers / spills / shared memory of every compiled variant of a Triton kernel (best effort: the cache
    layout differs between Triton versions)."""
    out = []
    try:
        caches = getattr(fn, "device_caches", None) or {}
        for dc in caches.values():
            cache = dc[0] if isinstance(dc, tuple) else dc
            for key, ck in cache.items():
                meta = getattr(ck, "metadata", None)
                out.append({"key": str(key)[-300:], "n_regs": getattr(ck, "n_regs", None),
                            "n_spills": getattr(ck, "n_spills", None),
                            "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
                            "num_stages": getattr(meta, "num_stages", None)})
    except Exception as ex:  # noqa: BLE001
        out.append({"error": repr(ex)[:200]})
    return out


def bench_decode_probe(N: int, dev, iters: int) -> tuple[list[dict], dict]:
    """Where the split kernel's time goes: wider cluster ranges per program with the separate merge (the in-kernel
    merge lost in the v2 sweep), the fixed cost (a threshold that keeps no cluster: the observation window and
    local slots only), registers / spills; then the full step with the fastest config vs the previous default,
    against dense SDPA in the same run."""
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed._triton_kernels import _squeezed_decode_kernel

    rows, extra = [], {}
    sc = 1 / math.sqrt(D)
    case = decode_case(N, dev)
    idx, idxs, ncopy, q, lk, lv, lengths = case.idx, case.idxs, case.ncopy, case.q, case.lk, case.lv, case.lengths
    scores = [K.centroid_scores(q, ix.centroids, ix.log_sizes, sc) for ix in idxs]
    s, e = scores[0]
    o_r, _, kept_r = R.squeezed_decode_reference(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc)
    kept_rows = int(kept_r.sum())
    extra["kept_fraction"] = ((kept_r.float() - 64) / idx.clustered).mean().item()
    C = idx.num_clusters
    base = case.time_sdpa(iters)
    rows.append(timing_row("probe_dense_sdpa_fp16", base, baseline="probe_dense_sdpa_fp16", baseline_timing=base,
                           bytes_moved=2 * HKV * (N + LOCAL) * D * 2, peak_tb_per_s=PEAK_TB_S, context=N, batch=1))
    attn_bytes = kept_rows * D * 2 * 2 + HKV * LOCAL * D * 4 + HQ * C * 4 + HKV * (C + 2) * 4
    ns_prev = 2 if -(-(C + 1) // 32) <= 64 else 1
    sweep, best = [], None
    for bc, bn, w, ns, st, bpp, fu in DECODE_PROBE:
        kw = {"block_c": bc, "block_n": bn, "num_warps": w, "sub_splits": ns or ns_prev, "num_stages": st,
              "fused_merge": fu, "blocks_per_program": bpp}
        r_ = dict(kw)
        try:
            oo, _, kk = K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk,
                                                 lv, lengths, sc, **kw)
            r_["rel_err_vs_reference"] = rel(oo, o_r)
            r_["kept_equal_reference"] = bool(torch.equal(kk, kept_r))
            t = time_cuda(lambda kw=kw: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_,
                                                                  ix.log_threshold, lk, lv, lengths, sc,
                                                                  count_kept=False, **kw)
                                         for ix, (s_, e_) in zip(idxs, scores)], iters=iters, calls_per_iter=ncopy)
            tp = None if fu else time_cuda(
                lambda kw=kw: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold,
                                                        lk, lv, lengths, sc, count_kept=False, partials_only=True,
                                                        **kw)
                               for ix, (s_, e_) in zip(idxs, scores)], iters=iters, calls_per_iter=ncopy)
        except Exception as ex:  # noqa: BLE001
            sweep.append({**r_, "error": repr(ex)[:300]})
            continue
        r_["ms"] = t.median_ms
        if tp is not None:
            r_["split_only_ms"] = tp.median_ms
            r_["split_tb_per_s"] = attn_bytes / (tp.median_ms * 1e-3) / 1e12
        sweep.append(r_)
        if r_["rel_err_vs_reference"] < 5e-3 and r_["kept_equal_reference"] and (
                best is None or t.median_ms < best[1].median_ms):
            best = (kw, t)
    extra["attention_sweep"] = sweep
    prev_kw = {"block_c": 32, "block_n": 32, "num_warps": 4, "sub_splits": ns_prev, "num_stages": 2,
               "fused_merge": False, "blocks_per_program": 1}
    # the in-kernel merge leaves its tickets at 0: repeated calls of the fastest config agree with the reference
    reps = [K.squeezed_decode_triton(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk, lv, lengths,
                                     sc, **best[0])[0] for _ in range(3)]
    extra["best_repeat_calls_equal"] = all(torch.equal(r_, reps[0]) for r_ in reps)
    extra["best_rel_err_vs_reference"] = rel(reps[-1], o_r)
    # fixed cost: a threshold no cluster passes (observation window + local slots only), previous default tiles
    tau_none = torch.full_like(idx.log_threshold, float("inf"))
    t_none = time_cuda(lambda: [K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, tau_none, lk, lv,
                                                         lengths, sc, count_kept=False, partials_only=True, **prev_kw)
                                for ix, (s_, e_) in zip(idxs, scores)], iters=iters, calls_per_iter=ncopy)
    rows.append(timing_row("probe_split_kernel_keep_nothing", t_none, baseline="probe_dense_sdpa_fp16",
                           baseline_timing=base, context=N, batch=1, config=prev_kw,
                           note="threshold +inf: only the 64 observation rows and 256 local slots are read"))
    extra["decode_kernel_resources"] = _kernel_resources(_squeezed_decode_kernel)
    best_kw, t_best = best
    extra["best_config"] = best_kw
    rows.append(timing_row("probe_attention_only_best", t_best, baseline="probe_dense_sdpa_fp16",
                           baseline_timing=base, bytes_moved=attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                           kept_fraction=extra["kept_fraction"], config=best_kw))

    def full(kw):
        def fn():
            for ix in idxs:
                s_, e_ = K.centroid_scores(q, ix.centroids, ix.log_sizes, sc)
                K.squeezed_decode_triton(q, ix.keys, ix.values, ix.offsets, s_, e_, ix.log_threshold, lk, lv, lengths,
                                         sc, count_kept=False, **kw)
        return fn
    sel_bytes = HKV * C * D * 2 + HQ * C * 4 + HKV * C * 4
    for name, kw in (("probe_decode_flat_best", best_kw), ("probe_decode_flat_prev_default", prev_kw)):
        t = time_cuda(full(kw), iters=iters, calls_per_iter=ncopy)
        rows.append(timing_row(name, t, baseline="probe_dense_sdpa_fp16", baseline_timing=base,
                               bytes_moved=sel_bytes + attn_bytes, peak_tb_per_s=PEAK_TB_S, context=N, batch=1,
                               sparsity=0.9, centroids=0.05, kept_fraction=extra["kept_fraction"], config=kw))
    for r in rows:
        say(f"probe N={N} {r['method']:34s} {r['ms'] * 1e3:8.1f} us  x{r.get('speedup', float('nan')):5.2f}")
    return rows, extra


# --- 3. prefill -------------------------------------------------------------------------------------------------

def bench_prefill(N: int, T: int, dev, iters: int, checkpoint=None) -> tuple[list[dict], dict]:
    """checkpoint(rows, extra): called with the one-key-set-per-chunk rows before the per-token part.

    Timed eager (as the library runs a prefill chunk) and in CUDA graphs (launch overhead removed on both sides);
    the selection with the host sync (rows list as wide as the largest count) and without it (as wide as N)."""
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R
    from lmsqueeze.methods.squeezed.attention import prefill_rows

    rows, extra = [], {}
    sc = 1 / math.sqrt(D)
    keys, values, queries = synthetic_context(N, dev, seed=N + 7)
    idx, _ = build_index(keys, values, queries(64))
    q = queries(T).reshape(1, HQ, T, D).to(torch.bfloat16)
    lk = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16)
    lv = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([T], dtype=torch.int32, device=dev)

    def select(sync_free=False, from_clusters=False):   # None: the library defaults (attention.PREFILL_*)
        return prefill_rows(q, idx, sc, 0.9, 0.5, sync_free=sync_free, from_clusters=from_clusters)

    def PREFILL_SYNC_DEFAULT():
        from lmsqueeze.methods.squeezed import attention as A
        return A.PREFILL_SYNC_FREE
    ix, cnt = select()
    ix_f, cnt_f = select(True)
    extra["sync_free_rows_equal"] = bool(torch.equal(cnt, cnt_f)) and all(
        torch.equal(ix[b, h, :int(cnt[b, h])], ix_f[b, h, :int(cnt[b, h])]) for b in range(1) for h in range(HKV))
    ix_c, cnt_c = select(True, True)
    extra["rows_from_clusters_equal"] = bool(torch.equal(ix_c, ix_f)) and bool(torch.equal(cnt_c, cnt_f))
    extra["kept_fraction"] = ((cnt.float() - 64) / idx.clustered).mean().item()
    o = K.indexed_attention(q, idx.keys, idx.values, ix, cnt, lk, lv, lengths, sc)
    o_r, _ = R.indexed_attention_reference(q[:, :, -128:], idx.keys, idx.values, ix, cnt, lk, lv, lengths, sc)
    extra["rel_err_vs_reference_last128"] = rel(o[:, :, -128:], o_r)
    kall = torch.cat([keys, lk[0]], 1)[None]
    vall = torch.cat([values, lv[0]], 1)[None]
    flops_dense = 4 * HQ * T * (N + T) * D

    def dense():
        return F.scaled_dot_product_attention(q, kall, vall, scale=sc, enable_gqa=True)
    base = time_cuda(dense, iters=iters, use_graph=False)
    base_g = time_cuda(dense, iters=iters, use_graph=True)
    rows.append(timing_row("prefill_dense_sdpa_bf16", base, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T, tflops=flops_dense / (base.median_ms * 1e-3) / 1e12))
    rows.append(timing_row("prefill_dense_sdpa_bf16_graph", base_g, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T,
                           tflops=flops_dense / (base_g.median_ms * 1e-3) / 1e12))
    # centroid scoring kernel: sweep (block_m, block_c, warps, stages) against the reference
    p_ref = R.prefill_scores_reference(q, idx.centroids, idx.log_sizes[None], sc)
    ps_sweep, ps_best = [], None
    ps_flops = 4 * HQ * T * idx.num_clusters * D
    for cfg in PREFILL_SCORES_SWEEP:
        bm_, bc_, w_, st_, *e2 = cfg
        e2 = e2[0] if e2 else K.PREFILL_SCORES_EXP2
        r_ = {"block_m": bm_, "block_c": bc_, "num_warps": w_, "num_stages": st_, "exp2": e2}
        try:
            p_ = K.prefill_scores_triton(q, idx.centroids, idx.log_sizes[None], sc, bm_, bc_, w_, st_, exp2=e2)
            r_["rel_err_vs_reference"] = rel(p_, p_ref)
            t = time_cuda(lambda cfg=cfg, e2=e2: K.prefill_scores_triton(q, idx.centroids, idx.log_sizes[None], sc,
                                                                         *cfg[:4], exp2=e2),
                          iters=iters, use_graph=True)
        except Exception as ex:  # noqa: BLE001
            ps_sweep.append({**r_, "error": repr(ex)[:300]})
            continue
        r_["ms"] = t.median_ms
        r_["tflops"] = ps_flops / (t.median_ms * 1e-3) / 1e12
        ps_sweep.append(r_)
        if (e2 == K.PREFILL_SCORES_EXP2 and r_["rel_err_vs_reference"] < 1e-2
                and (ps_best is None or t.median_ms < ps_best[1].median_ms)):   # best among the library's variant
            ps_best = (cfg[:4], t)
    del p_ref
    extra["scores_sweep"] = ps_sweep

    def use_best_scores():   # the library's scoring config set to the sweep's best (restored by the callers)
        K.PREFILL_SCORES_CONFIG = tuple(ps_best[0])
    prev_scores_cfg = K.PREFILL_SCORES_CONFIG
    extra["scores_prev_default"] = list(prev_scores_cfg)
    extra["scores_best_config"] = list(ps_best[0])
    rows.append(timing_row("prefill_squeezed_selection_scores_kernel", ps_best[1], baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, config=list(ps_best[0]),
                           tflops=ps_flops / (ps_best[1].median_ms * 1e-3) / 1e12))
    # selection with the host sync (as wide as the largest count) and without (as wide as N), both with the best
    # scoring config; eager, and the sync-free one in a CUDA graph
    prev_scores_cfg = K.PREFILL_SCORES_CONFIG
    use_best_scores()
    try:
        t_sel = time_cuda(select, iters=iters, use_graph=False)
        t_self = time_cuda(lambda: select(True), iters=iters, use_graph=False)
        t_selg = time_cuda(lambda: select(True), iters=iters, use_graph=True)
        t_selc = time_cuda(lambda: select(True, True), iters=iters, use_graph=False)
        t_selcg = time_cuda(lambda: select(True, True), iters=iters, use_graph=True)
    finally:
        K.PREFILL_SCORES_CONFIG = prev_scores_cfg
    rows.append(timing_row("prefill_squeezed_selection", t_sel, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, config=list(ps_best[0]),
                           note="host sync (rows list as wide as the largest count), eager"))
    rows.append(timing_row("prefill_squeezed_selection_sync_free", t_self, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, config=list(ps_best[0]), note="eager"))
    rows.append(timing_row("prefill_squeezed_selection_sync_free_graph", t_selg, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base_g, context=N, user_tokens=T, config=list(ps_best[0]),
                           note="CUDA graph; baseline: dense SDPA in a CUDA graph"))
    rows.append(timing_row("prefill_squeezed_selection_from_clusters", t_selc, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, config=list(ps_best[0]),
                           note="eager, no host sync, row list from a scan over clusters (rows_from_clusters)"))
    rows.append(timing_row("prefill_squeezed_selection_from_clusters_graph", t_selcg,
                           baseline="prefill_dense_sdpa_bf16", baseline_timing=base_g, context=N, user_tokens=T,
                           config=list(ps_best[0]), note="CUDA graph, rows_from_clusters"))
    sweep, best = [], None
    for bm, w, st, bn, *sd in PREFILL_ATTN_SWEEP:
        sd = sd[0] if sd else K.PREFILL_STEADY
        r_ = {"block_m": bm, "num_warps": w, "num_stages": st, "block_n": bn, "steady": sd}
        try:
            o_ = K.indexed_attention_triton(q, idx.keys, idx.values, ix_f, cnt_f, lk, lv, lengths, sc, block_m=bm,
                                            num_warps=w, num_stages=st, block_n=bn, steady=sd)
            r_["rel_err_vs_reference_last128"] = rel(o_[:, :, -128:], o_r)
            t = time_cuda(lambda bm=bm, w=w, st=st, bn=bn, sd=sd: K.indexed_attention_triton(
                q, idx.keys, idx.values, ix_f, cnt_f, lk, lv, lengths, sc, block_m=bm, num_warps=w, num_stages=st,
                block_n=bn, steady=sd), iters=iters, use_graph=True)
        except Exception as ex:  # noqa: BLE001
            sweep.append({**r_, "error": repr(ex)[:200]})
            continue
        r_["ms"] = t.median_ms
        sweep.append(r_)
        if (sd == K.PREFILL_STEADY and r_["rel_err_vs_reference_last128"] < 1e-2
                and (best is None or t.median_ms < best[1].median_ms)):   # best among the library's variant
            best = ((bm, w, st, bn), t)
    extra["attention_sweep"] = sweep
    (bm, w, st, bn), t_attn = best
    flops_sparse = 4 * HQ * T * (float(cnt.float().mean()) + T / 2) * D
    rows.append(timing_row("prefill_squeezed_attention_only", t_attn, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base_g, context=N, user_tokens=T, config=[bm, w, st, bn],
                           tflops=flops_sparse / (t_attn.median_ms * 1e-3) / 1e12, note="CUDA graph"))

    def full(sync_free, from_clusters=False):
        def fn():
            i, c = select(sync_free, from_clusters)
            return K.indexed_attention_triton(q, idx.keys, idx.values, i, c, lk, lv, lengths, sc, block_m=bm,
                                              num_warps=w, num_stages=st, block_n=bn)
        return fn
    t_full = time_cuda(full(None, None), iters=iters, use_graph=False)
    rows.append(timing_row("prefill_squeezed", t_full, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T, sparsity=0.9, kept_fraction=extra["kept_fraction"],
                           prefill="chunk", config={"scores": list(K.PREFILL_SCORES_CONFIG), "attention": [bm, w, st, bn],
                                                    "sync_free": PREFILL_SYNC_DEFAULT()},
                           note="eager, the library defaults for scoring and host sync; best attention tiles"))
    use_best_scores()
    try:
        t_fs = time_cuda(full(False), iters=iters, use_graph=False)
        t_ff = time_cuda(full(True), iters=iters, use_graph=False)
        t_fg = time_cuda(full(True), iters=iters, use_graph=True)
        t_fc = time_cuda(full(True, True), iters=iters, use_graph=False)
        t_fcg = time_cuda(full(True, True), iters=iters, use_graph=True)
    finally:
        K.PREFILL_SCORES_CONFIG = prev_scores_cfg
    cfg_new = {"scores": list(ps_best[0]), "attention": [bm, w, st, bn]}
    rows.append(timing_row("prefill_squeezed_sync", t_fs, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T, sparsity=0.9, kept_fraction=extra["kept_fraction"],
                           prefill="chunk", config=cfg_new, note="eager, host sync"))
    rows.append(timing_row("prefill_squeezed_sync_free", t_ff, baseline="prefill_dense_sdpa_bf16", baseline_timing=base,
                           context=N, user_tokens=T, sparsity=0.9, kept_fraction=extra["kept_fraction"],
                           prefill="chunk", config=cfg_new, note="eager, no host sync"))
    rows.append(timing_row("prefill_squeezed_graph", t_fg, baseline="prefill_dense_sdpa_bf16_graph",
                           baseline_timing=base_g, context=N, user_tokens=T, sparsity=0.9,
                           kept_fraction=extra["kept_fraction"], prefill="chunk", config=cfg_new,
                           note="selection + attention in one CUDA graph vs dense SDPA in a CUDA graph"))
    rows.append(timing_row("prefill_squeezed_from_clusters", t_fc, baseline="prefill_dense_sdpa_bf16",
                           baseline_timing=base, context=N, user_tokens=T, sparsity=0.9,
                           kept_fraction=extra["kept_fraction"], prefill="chunk", config=cfg_new,
                           note="eager, no host sync, rows_from_clusters"))
    rows.append(timing_row("prefill_squeezed_from_clusters_graph", t_fcg, baseline="prefill_dense_sdpa_bf16_graph",
                           baseline_timing=base_g, context=N, user_tokens=T, sparsity=0.9,
                           kept_fraction=extra["kept_fraction"], prefill="chunk", config=cfg_new,
                           note="CUDA graph, rows_from_clusters"))
    # the exact-budget path (attention.prefill_gathered: gathered rows through torch's cuDNN attention), eager
    # and as a CUDA graph, checked against the reference over its own rows
    try:
        from lmsqueeze.methods.squeezed.attention import gather_sdpa_ok, prefill_gathered
        extra["gathered_path_available"] = gather_sdpa_ok(q, idx, None, None)

        def gathered():
            return prefill_gathered(q, idx, sc, 0.9, lk, lv, lengths, None)[0]
        o_g = gathered()
        budget = math.ceil(0.1 * idx.clustered)
        psum = K.prefill_scores(q, idx.centroids, idx.log_sizes[None], sc)
        ix_x, cnt_x = K.chunk_rows_triton(psum, idx.offsets, idx.row_cluster, budget, idx.keys.shape[1], exact=True)
        width = int(cnt_x.max())
        o_gr, _ = R.indexed_attention_reference(q[:, :, -128:], idx.keys, idx.values, ix_x[..., :width].contiguous(),
                                                cnt_x, lk, lv, lengths, sc)
        extra["gathered_rel_err_vs_reference_last128"] = rel(o_g[:, :, -128:], o_gr)
        extra["gathered_rows_per_head"] = cnt_x[0].tolist()
        extra["gathered_kept_fraction"] = ((cnt_x.float() - 64) / idx.clustered).mean().item()
        t_g = time_cuda(gathered, iters=iters, use_graph=False)
        t_gg = time_cuda(gathered, iters=iters, use_graph=True)
        rows.append(timing_row("prefill_squeezed_gathered", t_g, baseline="prefill_dense_sdpa_bf16",
                               baseline_timing=base, context=N, user_tokens=T, sparsity=0.9,
                               kept_fraction=extra["gathered_kept_fraction"], prefill="chunk",
                               note="eager, exact budget, gathered rows through torch's cuDNN attention "
                                    "(attention.prefill_gathered)"))
        rows.append(timing_row("prefill_squeezed_gathered_graph", t_gg, baseline="prefill_dense_sdpa_bf16_graph",
                               baseline_timing=base_g, context=N, user_tokens=T, sparsity=0.9,
                               kept_fraction=extra["gathered_kept_fraction"], prefill="chunk",
                               note="CUDA graph, exact budget, gathered rows through torch's cuDNN attention"))
    except Exception:  # noqa: BLE001
        extra["gathered_error"] = traceback.format_exc()[-2000:]
        say(f"gathered prefill raised:\n{traceback.format_exc()[-1500:]}")
    if checkpoint is not None:
        checkpoint(rows, extra)
    if PER_TOKEN:
        try:
            rows += _prefill_per_token(q, idx, lk, lv, lengths, sc, base, N, T, iters, extra)
        except Exception:  # noqa: BLE001
            extra["per_token_error"] = traceback.format_exc()[-2000:]
            say(f"per-token prefill raised:\n{traceback.format_exc()[-1500:]}")
    for r in rows:
        say(f"prefill {r['method']:42s} {r['ms']:8.3f} ms  x{r.get('speedup', float('nan')):5.2f}")
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
                    help="comma-separated sections to run (checks, decode, probe, prefill)")
    ap.add_argument("--prefill-sweep", default="full", choices=("full", "short"),
                    help="short: only the attention tile configs that won earlier sweeps (fewer compiles)")
    ap.add_argument("--per-token", action="store_true", help="also time the per-token prefill rule")
    ap.add_argument("--fused-merge-checks", action="store_true",
                    help="run the model checks (graph decode == eager) with the in-kernel merge on")
    ap.add_argument("--model-checks-last", action="store_true",
                    help="run the model checks after the timings (inside --budget-s) instead of first")
    ap.add_argument("--check-kernels", default=None,
                    help="comma-separated name prefixes: only these kernel checks (default: all)")
    ap.add_argument("--model-checks", default="all", choices=("all", "graph"),
                    help="graph: only the graph decode == eager decode model checks")
    args = ap.parse_args()
    global QUICK, PREFILL_SHORT, PER_TOKEN, CHECK_KERNELS, MODEL_CHECKS
    CHECK_KERNELS = args.check_kernels.split(",") if args.check_kernels else None
    MODEL_CHECKS = args.model_checks
    QUICK = args.quick
    PER_TOKEN = args.per_token
    if args.fused_merge_checks:
        from lmsqueeze.methods.squeezed import kernels as K
        K.DECODE_FUSED_MERGE = True
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

    def run_checks(which):
        for name, fn in (() if QUICK or "checks" not in sections else which):
            if time.time() - T0 > args.budget_s:
                say(f"skipping check {name}: out of time")
                continue
            try:
                res = fn()
                extra["checks"] += res
                bad = [r for r in res if not r["ok"]]
                say(f"check {name}: {len(res) - len(bad)}/{len(res)} ok" + (f"; FAILED {bad}" if bad else ""))
            except Exception:  # noqa: BLE001
                extra["errors"].append({"section": name, "trace": traceback.format_exc()[-2000:]})
                say(f"check {name} raised:\n{traceback.format_exc()[-1500:]}")
            save()

    run_checks((("kernels", lambda: check_kernels(dev)),) + (() if args.model_checks_last else
                                                              (("model", lambda: check_model(dev)),)))
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
    for N in (int(x) for x in args.contexts.split(",")) if "probe" in sections else ():
        if time.time() - T0 > args.budget_s:
            say(f"skipping probe N={N}: out of time")
            continue
        try:
            r, e = bench_decode_probe(N, dev, args.iters)
            rows += r
            extra[f"probe_{N}"] = e
        except Exception:  # noqa: BLE001
            extra["errors"].append({"section": f"probe_{N}", "trace": traceback.format_exc()[-2000:]})
            say(f"probe N={N} raised:\n{traceback.format_exc()[-1500:]}")
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
    if args.model_checks_last:
        run_checks((("model", lambda: check_model(dev)),))
    print("\n== summary ==")
    for r in rows:
        if "speedup" in r:
            print(f"{r['method']:36s} ctx={r.get('context')} {r['ms'] * 1e3:9.1f} us  speedup x{r['speedup']:.2f}"
                  f"  {r.get('tb_per_s', float('nan')):.2f} TB/s  kept={r.get('kept_fraction', '')}")
    print("checks ok:", sum(c["ok"] for c in extra["checks"]), "/", len(extra["checks"]), "errors:", len(extra["errors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
