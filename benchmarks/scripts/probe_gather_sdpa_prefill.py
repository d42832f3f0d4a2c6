"""Probe: prefill attention of 1K user tokens over a selected 10% of a 128K fixed context (Llama-3-8B heads) as
(gather the selected K/V rows -> torch's cuDNN / flash attention with log-sum-exp over them, the G query heads of a
KV head packed as rows) + lmsqueeze's Triton kernel for the causal user tokens + a log-sum-exp merge, against
lmsqueeze's gather attention kernel and dense SDPA in the same run (H100, CUDA graphs, median of 30).

    python benchmarks/scripts/probe_gather_sdpa_prefill.py --out $OUT/squeezed_probe_gather_sdpa_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lmsqueeze.bench.results import command_line, environment
from lmsqueeze.bench.timing import time_cuda


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from lmsqueeze.kernels.merge import merge_attention_states
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed import reference as R

    dev = torch.device("cuda")
    Hq, H, D, T, N = 32, 8, 128, 1024, 131072
    G = Hq // H
    W = N // 10 + 64                                   # every head reads the same number of rows
    sc = 1 / math.sqrt(D)
    g = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    values = torch.randn(H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    q = torch.randn(1, Hq, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    lk = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    lv = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    lengths = torch.tensor([T], dtype=torch.int32, device=dev)
    idx = torch.stack([torch.randperm(N, device=dev, generator=g)[:W].sort().values for _ in range(H)])[None]
    idx = idx.to(torch.int32).contiguous()
    counts = torch.full((1, H), W, dtype=torch.int32, device=dev)
    res = {"kind": "squeezed.probe_gather_sdpa_prefill", "command": command_line(), **environment(), "rows": [],
           "shape": {"Hq": Hq, "Hkv": H, "D": D, "T": T, "N": N, "rows_read": W}}

    def row(name, t, **kw):
        res["rows"].append({"method": name, "ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, **kw})
        print(f"{name:40s} {t.median_ms:.4f} ms", flush=True)

    # reference output (fp32 over the same rows + causal user tokens)
    o_ref, _ = R.indexed_attention_reference(q[:, :, -64:], keys, values, idx, counts, lk, lv, lengths, sc)

    kg = torch.empty(1, H, W, D, device=dev, dtype=torch.bfloat16)
    vg = torch.empty_like(kg)

    def gather_torch():
        ii = idx[0].long()[..., None].expand(-1, -1, D)
        kg[0] = keys.gather(1, ii)
        vg[0] = values.gather(1, ii)

    def gather_triton():
        K.gather_rows_triton(keys, values, idx, kg, vg)

    qp = q.view(1, H, G * T, D)
    ops = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        ops["cudnn"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qp, kg, vg, None, True, 0.0, False,
                                                                                   False, scale=sc)[:2]
    ops["flash"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(qp, kg, vg, 0.0, False, False,
                                                                              scale=sc)[:2]
    ops["efficient"] = lambda: torch.ops.aten._scaled_dot_product_efficient_attention(qp, kg, vg, None, True, 0.0,
                                                                                      False, scale=sc)[:2]

    def local():
        return K.indexed_attention_triton(q, keys, values, idx, torch.zeros_like(counts), lk, lv, lengths, sc,
                                          return_lse=True)

    gather_triton()
    res["gather_equal_torch"] = None
    kt, vt = kg.clone(), vg.clone()
    gather_torch()
    res["gather_equal_torch"] = bool(torch.equal(kt, kg) and torch.equal(vt, vg))
    o_l, lse_l = local()
    for name, fn in ops.items():
        try:
            o_f, lse_f = fn()
            o_f = o_f.view(1, Hq, T, D)
            lse_f = lse_f.reshape(1, Hq, T).float()
            out, _ = merge_attention_states(o_f, lse_f, o_l, lse_l)
            err = ((out[:, :, -64:].float() - o_ref.float()).norm() / o_ref.float().norm()).item()
            t_attn = time_cuda(fn, iters=30)
            row(f"{name}_attention_fixed_rows", t_attn, rel_err_vs_reference=err,
                tflops=4 * Hq * T * W * D / (t_attn.median_ms * 1e-3) / 1e12)

            def pipeline(fn=fn):
                gather_triton()
                o_f, lse_f = fn()
                o_l, lse_l = local()
                return merge_attention_states(o_f.view(1, Hq, T, D), lse_f.reshape(1, Hq, T).float(), o_l, lse_l)
            row(f"{name}_pipeline", time_cuda(pipeline, iters=30), rel_err_vs_reference=err)
        except Exception as ex:  # noqa: BLE001
            res["rows"].append({"method": name, "error": repr(ex)[:400]})
            print(name, "error", repr(ex)[:300], flush=True)
    row("gather_triton", time_cuda(gather_triton, iters=30), bytes=4 * H * W * D * 2)
    row("gather_torch", time_cuda(gather_torch, iters=30))
    row("local_triton", time_cuda(local, iters=30))
    o_i = K.indexed_attention_triton(q, keys, values, idx, counts, lk, lv, lengths, sc)
    res["lmsqueeze_rel_err"] = ((o_i[:, :, -64:].float() - o_ref.float()).norm() / o_ref.float().norm()).item()
    row("lmsqueeze_indexed_attention", time_cuda(lambda: K.indexed_attention_triton(
        q, keys, values, idx, counts, lk, lv, lengths, sc), iters=30))
    for cfg in ((256, 16, 2, 64),):
        row(f"lmsqueeze_indexed_attention_{cfg}", time_cuda(lambda cfg=cfg: K.indexed_attention_triton(
            q, keys, values, idx, counts, lk, lv, lengths, sc, block_m=cfg[0], num_warps=cfg[1], num_stages=cfg[2],
            block_n=cfg[3]), iters=30))
    kall = torch.cat([keys, lk[0]], 1)[None]
    vall = torch.cat([values, lv[0]], 1)[None]
    row("dense_sdpa_bf16", time_cuda(lambda: F.scaled_dot_product_attention(q, kall, vall, scale=sc, enable_gqa=True),
                                     iters=30, use_graph=False))
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
