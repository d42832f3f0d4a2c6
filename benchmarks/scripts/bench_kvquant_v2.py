"""GPU check and benchmark of the v2 KVQuant decode kernel (decode_v2.py) against v1 and fp16 SDPA.

    python benchmarks/scripts/bench_kvquant_v2.py --out $OUT [--sweep] [--budget-s 380] [--configs JSON]

1. correctness on the GPU: v2 (byte-permute lookups) against the float32 PyTorch reference on caches filled
   through the real quantize-and-append path (bits 2/3/4; 32/8 heads x D=128 and 8/8 x D=64 with an fp16
   window; batch 3 with different lengths and left padding) and a CUDA-graph replay after changing the
   device-side lengths (bench_kvquant.check_correctness's cases);
2. --sweep: v2 configs (BLOCK_N, warps, programs per SM, outlier handling, RoPE tables in registers) and v1's
   default at 128K tokens, batch 1, 3 bits; the fastest v2 config that passed the checks becomes the table's;
3. the table: Llama-3-8B attention shape (32 query heads, 8 KV heads, D=128), batch 1 and 8, 32K and 128K
   tokens, nuq4 / nuq3 / nuq2 (1% outliers, 1 fp16 sink): v2 and v1 against F.scaled_dot_product_attention
   (enable_gqa) on an fp16 cache, all timed in the same run. Each timed unit is a CUDA graph of calls cycling
   through input copies that together exceed the L2 cache; CUDA events, median of 30 replays after warm-up.
   Bytes moved: every byte the method must read (codes, outliers, per-token metadata; fp16 K/V for SDPA),
   plus q and out; TB/s = bytes / time, compared with 3.0 TB/s.
Writes kvquant_decode_h100.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kvquant as v1b

from lmsqueeze.methods.kvquant import decode_v2 as v2
from lmsqueeze.methods.kvquant import kernels as kk
from lmsqueeze.methods.kvquant import layout
from lmsqueeze.methods.kvquant.reference import decode_attention_reference
from lmsqueeze.methods.kvquant.rope import KernelRope

PEAK_TBPS = 3.0
V1_DEFAULT = {"block_n": 64, "num_warps": 4, "num_stages": 1, "maxnreg": 168, "vfold": True}
SWEEP_V1 = [
    V1_DEFAULT,
    {**V1_DEFAULT, "vfold": False},
    {**V1_DEFAULT, "maxnreg": 128},
    {**V1_DEFAULT, "vfold": False, "maxnreg": 128},
    {**V1_DEFAULT, "maxnreg": None},
    {**V1_DEFAULT, "num_stages": 2},
    {**V1_DEFAULT, "programs_per_sm": 3},
    {**V1_DEFAULT, "programs_per_sm": 12},
    {**V1_DEFAULT, "block_n": 128, "num_warps": 8, "maxnreg": None},
    {**V1_DEFAULT, "qrows": True},
]
SWEEP = [
    {"block_n": 128, "num_warps": 8, "nsub": 2},
    {"block_n": 128, "num_warps": 8, "nsub": 1},
    {"block_n": 128, "num_warps": 8, "nsub": 2, "programs_per_sm": 8},
    {"block_n": 128, "num_warps": 8, "nsub": 2, "programs_per_sm": 2},
    {"block_n": 64, "num_warps": 4, "nsub": 2},
    {"block_n": 128, "num_warps": 8, "nsub": 1, "opaque": 0},
    {"block_n": 128, "num_warps": 8, "qrows": True},
    {"block_n": 64, "num_warps": 4, "nsub": 1},
    {"block_n": 64, "num_warps": 4, "qrows": True, "opaque": 0},
]


def log(*a):
    print(*a, flush=True)


def check_v2(device, cfg) -> list[dict]:
    rows = []
    cases = [(b, 32, 8, 128, 0) for b in (2, 3, 4)] + [(3, 8, 8, 64, 16)]
    for bits, Hq, H, D, window in cases:
        t0 = time.time()
        try:
            lens = [1000, 777, 1]
            st, starts, S = v1b.filled_state(bits, 3, H, D, lens, window, 1, torch.float16, device, seed=bits + D)
            q = torch.randn(3, Hq, D, device=device, dtype=torch.float16)
            lengths = torch.full((3,), S, dtype=torch.int32, device=device)
            ref = decode_attention_reference(q, st.kv, lengths, D**-0.5, st.rope, starts)
            out = v2.kvquant_decode_attention_v2(q, st.kv, lengths, D**-0.5, st.rope, starts, **cfg)
            torch.cuda.synchronize()
            err = v1b.rel_err(out, ref)
            lens_dev = lengths.clone()
            outb = torch.empty_like(out)

            def call(outb=outb, q=q, st=st, lens_dev=lens_dev, D=D, starts=starts):
                outb.copy_(v2.kvquant_decode_attention_v2(q, st.kv, lens_dev, D**-0.5, st.rope, starts, **cfg))
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                call()
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                call()
            lens_dev.fill_(S - 300)
            gr.replay()
            torch.cuda.synchronize()
            ref2 = decode_attention_reference(q, st.kv, lens_dev, D**-0.5, st.rope, starts)
            gerr = v1b.rel_err(outb, ref2)
            row = {"check": "v2_vs_reference", "bits": bits, "heads": f"{Hq}/{H}x{D}", "batch": 3, "lengths": lens,
                   "window": window, "config": cfg, "rel_err": err, "graph_replay_rel_err": gerr,
                   "ok": bool(err < 2e-2 and gerr < 2e-2), "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            row = {"check": "v2_vs_reference", "bits": bits, "heads": f"{Hq}/{H}x{D}", "config": cfg, "ok": False,
                   "error": f"{type(e).__name__}: {str(e)[:400]}"}
        log("check", row)
        rows.append(row)
    return rows


def check_kernel(version, device, cfg) -> list[dict]:
    """GPU correctness checks of one kernel config (v1: bench_kvquant.check_correctness's cases)."""
    if version == "v2":
        return check_v2(device, cfg)
    rows = v1b.check_correctness(device, {b: dict(cfg) for b in (2, 3, 4)})
    for r in rows:
        r["config"] = cfg
        r["kernel"] = "v1"
    return rows


def time_kernel(version, bits, B, L, Hq, H, D, device, cfg) -> tuple[float, int, dict]:
    """(ms per call, bytes read, compile info) of v1 or v2 over random caches of L valid slots."""
    cfg = dict(cfg)
    one = v1b.random_cache(bits, B, H, D, L, 1, device, seed=bits)
    nbytes = v1b.quant_bytes(one, B, L, Hq, D)
    bpe = layout.bits_per_element(one)
    copies = max(1, min(8, -(-int(v1b.ROTATE_BYTES) // nbytes)))
    caches = [one] + [v1b.random_cache(bits, B, H, D, L, 1, device, seed=bits + 10 * i) for i in range(1, copies)]
    rope = KernelRope(torch.rand(D // 2, device=device) * 0.5, 1.0)
    qs = [torch.randn(B, Hq, D, device=device, dtype=torch.float16) for _ in range(copies)]
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    if version == "v1":
        fn_ = kk.kvquant_decode_attention
        holder = kk.LAST_SPLIT_KERNEL
        pps = cfg.pop("programs_per_sm", 0)
        if pps:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            cfg["num_splits"] = max(1, min(kk.MAX_SPLITS, -(-pps * sms // (B * H)),
                                           -(-one.capacity // cfg.get("block_n", 64))))
    else:
        fn_ = v2.kvquant_decode_attention_v2
        holder = v2.LAST_SPLIT_KERNEL

    def mk(i):
        def fn():
            fn_(qs[i], caches[i], lengths, D**-0.5, rope, None, **cfg)
        return fn
    ms = v1b.time_graph([mk(i) for i in range(copies)])
    ck = holder.get("compiled")
    info = {"n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None),
            "bits_per_element_allocated": bpe}
    caches.clear()
    torch.cuda.empty_cache()
    return ms, nbytes, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--configs", default=None, help="JSON list of v2 configs to sweep instead of the built-in list")
    ap.add_argument("--table-config", default=None, help="JSON v2 config for the table (default: sweep's best)")
    ap.add_argument("--budget-s", type=float, default=380.0, help="stop sweeping after this many seconds")
    ap.add_argument("--kernels", default="v1,v2", help="kernels to sweep and time: v1 (kernels.py), v2 (decode_v2.py)")
    ap.add_argument("--configs-v1", default=None, help="JSON list of v1 configs to sweep instead of the built-in list")
    args = ap.parse_args()
    device = torch.device("cuda")
    t_start = time.time()
    import transformers
    import triton

    from lmsqueeze.bench.results import git_state
    commit, dirty = git_state()
    env = {"command": " ".join(["python", "benchmarks/scripts/bench_kvquant_v2.py", *sys.argv[1:]]),
           "commit": commit, "dirty": dirty,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "device": torch.cuda.get_device_name(0),
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "transformers": transformers.__version__, "cuda": torch.version.cuda}}
    log(env)
    out_path = Path(args.out) / "kvquant_decode_h100.json"
    result = {**env, "kind": "kvquant.decode_attention", "peak_tb_per_s": PEAK_TBPS, "checks": [], "sweep": [],
              "rows": []}

    def save():
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    Hq, H, D = 32, 8, 128
    kernels = args.kernels.split(",")
    sweeps = {"v1": json.loads(args.configs_v1) if args.configs_v1 else SWEEP_V1,
              "v2": json.loads(args.configs) if args.configs else SWEEP}
    chosen = {"v1": dict(V1_DEFAULT), "v2": json.loads(args.table_config) if args.table_config else dict(SWEEP[0])}
    if args.sweep:
        L = 131072
        timed = {"v1": [], "v2": []}
        todo = [(v, c) for v in kernels for c in sweeps[v]]
        for version, cfg in todo:
            if time.time() - t_start > args.budget_s:
                log("sweep budget reached")
                break
            try:
                ms, nbytes, info = time_kernel(version, 3, 1, L, Hq, H, D, device, cfg)
                row = {"version": version, "bits": 3, "batch": 1, "length": L, "config": cfg, "ms": ms,
                       "tb_per_s": nbytes / ms / 1e9, **info}
                timed[version].append((ms, cfg))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"version": version, "bits": 3, "config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log("sweep", row, f"t={time.time() - t_start:.0f}s")
            result["sweep"].append(row)
            save()
        for version in kernels:
            timed[version].sort(key=lambda t: t[0])
            chosen[version] = None
            for _ms, cfg in timed[version][:3]:  # the fastest config whose GPU checks pass
                checks = check_kernel(version, device, cfg)
                result["checks"].extend(checks)
                save()
                if all(c["ok"] for c in checks):
                    chosen[version] = dict(cfg)
                    break
    else:
        for version in kernels:
            checks = check_kernel(version, device, chosen[version])
            result["checks"].extend(checks)
            if not all(c["ok"] for c in checks):
                chosen[version] = None
    result["chosen_config"] = {v: chosen[v] for v in kernels}
    save()
    for B in (1, 8):
        for L in (32768, 131072):
            sd_ms, sd_bytes = v1b.time_sdpa(B, L, Hq, H, D, device)
            base = {"batch": B, "length": L, "heads": f"{Hq}/{H}x{D}", "baseline": "sdpa_fp16_enable_gqa",
                    "baseline_ms": sd_ms, "baseline_bytes": sd_bytes, "baseline_tb_per_s": sd_bytes / sd_ms / 1e9}
            log("sdpa", base, f"t={time.time() - t_start:.0f}s")
            for bits in (4, 3, 2):
                for version in kernels:
                    cfg = chosen[version]
                    if cfg is None:
                        continue
                    try:
                        ms, nbytes, info = time_kernel(version, bits, B, L, Hq, H, D, device, cfg)
                        row = {**base, "method": f"kvquant-nuq{bits}-1%", "kernel": version, "config": cfg, "ms": ms,
                               "speedup": sd_ms / ms, "bytes": nbytes, "tb_per_s": nbytes / ms / 1e9,
                               "frac_of_peak": nbytes / ms / 1e9 / PEAK_TBPS, "floor_ms": nbytes / (PEAK_TBPS * 1e9),
                               "ceiling_speedup": sd_ms / (nbytes / (PEAK_TBPS * 1e9)),
                               "bits_per_element_read": 8 * nbytes / (2 * B * H * L * D), **info}
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        row = {**base, "method": f"kvquant-nuq{bits}-1%", "kernel": version,
                               "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    log("row", row, f"t={time.time() - t_start:.0f}s")
                    result["rows"].append(row)
                    save()
    for r in result["sweep"]:
        if "ms" in r:
            log(f"sweep {r['version']} {json.dumps(r['config'])} {r['ms']:.4f} ms {r['tb_per_s']:.2f} TB/s "
                f"regs {r.get('n_regs')} spills {r.get('n_spills')}")
    log("\n  B       L  method           kernel   ms      sdpa_ms  speedup  TB/s")
    for r in result["rows"]:
        if "ms" in r:
            log(f"{r['batch']:>3} {r['length']:>7}  {r['method']:<16} {r['kernel']:<4} {r['ms']:.4f}  "
                f"{r['baseline_ms']:.4f}  {r['speedup']:.2f}x  {r['tb_per_s']:.2f}")
    for c in result["checks"]:
        log("check", c.get("bits"), c.get("heads"), c.get("rel_err"), c.get("graph_replay_rel_err"),
            "ok" if c.get("ok") else "FAIL")
    log(f"chosen {chosen}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
