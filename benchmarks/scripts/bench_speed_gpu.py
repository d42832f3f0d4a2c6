"""SPEED on a CUDA GPU, batch 1, both sides CUDA-graphed (one graph per step), in one run:

1. the bundled looped 4x3 model (fp32): static pipelined decoding vs plain greedy decoding of the same model on
   the same static buffers and kernels; token identity checked (pipelined vs plain, plain vs the eager
   `greedy_decode`), flush rate on held-out text, tokens/s (decode only, prefill excluded on both sides);
   also an fp64 exactness pass (PyTorch kernels, graphed) against the eager references;
2. a 7B-scale looped shape with random bf16 weights: graphed time of one block pass (+ exit head) at m = 1..R
   tokens in flight, the full pipeline step and the plain greedy step; the speedups derived from them are
   COMBINED figures (measured step times x modelled tokens per step), labelled as such.

    python benchmarks/scripts/bench_speed_gpu.py --out benchmarks/results/speed_gpu_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from lmsqueeze.bench.results import atomic_write_text, command_line, environment
from lmsqueeze.bench.timing import time_fn
from lmsqueeze.data.heldout import load_heldout_text
from lmsqueeze.methods.speed.pipeline import speed_decode_looped
from lmsqueeze.methods.speed.static_pipeline import (
    block_pass,
    build_static,
    capture_step,
    exit_argmax,
    greedy_step,
    pipeline_step,
    run_greedy,
    run_pipeline,
    start_static,
    static_ids,
)
from lmsqueeze.models.looped import LoopedConfig, LoopedDecoder, greedy_decode, load_looped

LOOPED_DIR = ROOT / "src/lmsqueeze/zoo/looped-4x3"
TB = 3.0e12  # measured H100 copy bandwidth (DESIGN.md), bytes/s


def prompts(tok, n: int, length: int) -> list[torch.Tensor]:
    """n windows of `length` tokens spread over the held-out text."""
    ids = tok.encode(load_heldout_text()[:400_000])
    stride = len(ids) // n
    return [torch.tensor([ids[i * stride + stride // 2:i * stride + stride // 2 + length]]) for i in range(n)]


def first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    d = (a != b).nonzero()
    return None if d.numel() == 0 else int(d[0, -1])


def weight_bytes(st) -> tuple[int, int]:
    """(bytes of one pass of the unique blocks, bytes of the exit head)."""
    blk = sum(t.numel() * t.element_size() for w in st.layers
              for t in (w.w_in, w.w_qkv, w.w_o, w.w_post, w.w_gu, w.w_down))
    head = st.emb.numel() * st.emb.element_size() + st.norm_w.numel() * st.norm_w.element_size()
    return blk, head


def kv_bytes_per_row(st, ctx: int) -> int:
    """K and V bytes one row reads per pass of the block at context ctx."""
    return 2 * len(st.layers) * st.hkv * ctx * st.head_dim * st.kc.element_size()


DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def capture(step):
    """A CUDA graph's replay of `step` (the bare function in --cpu-smoke mode)."""
    return capture_step(step).replay if DEV == "cuda" else step


def timed(reset, run, reps: int, warm: int = 2) -> list[float]:
    """ms of `run()` per rep (CUDA events; perf_counter on CPU); `reset()` runs outside the timed region."""
    out = []
    for i in range(warm + reps):
        reset()
        sync()
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            run()
            ms = (time.perf_counter() - t) * 1e3
        if i >= warm:
            out.append(ms)
    return out


def bench_zoo(args, backends: list[str], res: dict) -> dict:
    model, tok = load_looped(LOOPED_DIR, dtype=torch.float32, device=DEV)
    cfg = model.config
    plist = [p.to(DEV) for p in prompts(tok, args.prompts, args.prompt_tokens)]
    n = args.new_tokens
    res.update({"model": str(LOOPED_DIR.relative_to(ROOT)), "config": cfg.name, "dtype": "float32",
                "prompt_tokens": args.prompt_tokens, "new_tokens": n, "prompts": len(plist)})
    res.setdefault("backends", {})
    refs = [greedy_decode(model, p, n) for p in plist]  # eager reference (LoopedCache, SDPA)
    for backend in backends:
        res["backends"][backend] = bench_backend(args, model, plist, refs, backend)
    return res


def bench_backend(args, model, plist: list[torch.Tensor], refs: list[torch.Tensor], backend: str) -> dict:
    """Plain vs pipelined decoding of every prompt on one backend's static buffers and graphs."""
    cfg = model.config
    n = args.new_tokens
    max_len = args.prompt_tokens + n
    t_start = time.perf_counter()
    st = build_static(model, max_len, triton=(backend == "triton"))
    start_static(st, model, plist[0], n)
    g_pipe = capture(lambda: pipeline_step(st))
    start_static(st, model, plist[0], n)
    g_greedy = capture(lambda: greedy_step(st))
    blk, head = weight_bytes(st)
    rows = []
    for i, p in enumerate(plist):
        def reset(p=p):
            start_static(st, model, p, n)

        reset()
        run_greedy(st, g_greedy)
        plain = static_ids(st, greedy=True)
        reset()
        steps, syncs = run_pipeline(st, g_pipe)
        piped = static_ids(st)
        c = st.stats.tolist()
        t_plain = timed(reset, lambda: run_greedy(st, g_greedy), args.reps)
        t_pipe = timed(reset, lambda: run_pipeline(st, g_pipe), args.reps)
        mp, mg = statistics.median(t_pipe), statistics.median(t_plain)
        ctx_mid = args.prompt_tokens + n // 2
        row = {"prompt": i, "identical_pipelined_vs_plain": bool(torch.equal(piped, plain)),
               "first_diff_pipelined_vs_plain": first_diff(piped, plain),
               "identical_plain_vs_eager_greedy": bool(torch.equal(plain, refs[i])),
               "first_diff_plain_vs_eager_greedy": first_diff(plain, refs[i]),
               "steps": steps, "host_syncs": syncs, "committed_after_first": c[0], "flushes": c[1],
               "flushed_tokens": c[2], "tokens_per_step": c[0] / steps,
               "tokens_per_forward": c[0] * cfg.num_loops / steps, "flush_rate": c[1] / max(c[0], 1),
               "plain_ms": mg, "pipelined_ms": mp, "plain_ms_p10_p90": [min(t_plain), max(t_plain)],
               "plain_tok_s": (n - 1) / mg * 1e3, "pipelined_tok_s": (n - 1) / mp * 1e3, "speedup": mg / mp,
               "plain_ms_per_step": mg / (n - 1), "pipelined_ms_per_step": mp / steps,
               "timed_runs": len(t_pipe)}
        # bytes: weights + KV read at mid context; floor = bytes / 3.0 TB/s
        row["plain_bytes_per_step"] = cfg.num_loops * (blk + kv_bytes_per_row(st, ctx_mid)) + head
        row["pipelined_bytes_per_step"] = blk + cfg.num_loops * kv_bytes_per_row(st, ctx_mid) + head
        row["plain_floor_ms_per_step"] = row["plain_bytes_per_step"] / TB * 1e3
        row["pipelined_floor_ms_per_step"] = row["pipelined_bytes_per_step"] / TB * 1e3
        rows.append(row)
        print(f"[{backend}] prompt {i}: same={row['identical_pipelined_vs_plain']} "
              f"same_as_eager={row['identical_plain_vs_eager_greedy']} tpf={row['tokens_per_forward']:.2f} "
              f"flush={row['flush_rate']:.3f} plain {row['plain_tok_s']:.0f} tok/s pipelined "
              f"{row['pipelined_tok_s']:.0f} tok/s ({row['speedup']:.2f}x)", flush=True)
    committed = sum(r["committed_after_first"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    return {
        "rows": rows, "setup_s": time.perf_counter() - t_start,
        "summary": {
            "all_identical_pipelined_vs_plain": all(r["identical_pipelined_vs_plain"] for r in rows),
            "all_identical_plain_vs_eager_greedy": all(r["identical_plain_vs_eager_greedy"] for r in rows),
            "flush_rate": sum(r["flushes"] for r in rows) / committed,
            "flushed_tokens_per_token": sum(r["flushed_tokens"] for r in rows) / committed,
            "tokens_per_step": committed / steps, "tokens_per_forward": committed * cfg.num_loops / steps,
            "median_speedup": statistics.median(r["speedup"] for r in rows),
            "speedup_total_time": sum(r["plain_ms"] for r in rows) / sum(r["pipelined_ms"] for r in rows),
            "median_plain_tok_s": statistics.median(r["plain_tok_s"] for r in rows),
            "median_pipelined_tok_s": statistics.median(r["pipelined_tok_s"] for r in rows),
            "median_plain_ms_per_step": statistics.median(r["plain_ms_per_step"] for r in rows),
            "median_pipelined_ms_per_step": statistics.median(r["pipelined_ms_per_step"] for r in rows),
            "host_syncs_per_decode_pipelined": statistics.median(r["host_syncs"] for r in rows),
            "host_syncs_per_decode_plain": 0}}


def bench_fp64_exactness(args) -> dict:
    """fp64, PyTorch kernels, graphed: static pipelined == static plain == eager greedy; steps/flushes == eager."""
    model, tok = load_looped(LOOPED_DIR, dtype=torch.float64, device=DEV)
    plist = [p.to(DEV) for p in prompts(tok, args.prompts, args.prompt_tokens)]
    n = args.new_tokens
    st = build_static(model, args.prompt_tokens + n, triton=False)
    start_static(st, model, plist[0], n)
    g_pipe = capture(lambda: pipeline_step(st))
    start_static(st, model, plist[0], n)
    g_greedy = capture(lambda: greedy_step(st))
    rows = []
    for i, p in enumerate(plist):
        ref = greedy_decode(model, p, n)
        eager_out, est = speed_decode_looped(model, p, n)
        start_static(st, model, p, n)
        run_greedy(st, g_greedy)
        plain = static_ids(st, greedy=True)
        start_static(st, model, p, n)
        steps, _ = run_pipeline(st, g_pipe)
        piped = static_ids(st)
        c = st.stats.tolist()
        rows.append({"prompt": i, "pipelined_eq_eager_greedy": bool(torch.equal(piped, ref)),
                     "plain_static_eq_eager_greedy": bool(torch.equal(plain, ref)),
                     "eager_pipeline_eq_eager_greedy": bool(torch.equal(eager_out, ref)),
                     "steps": steps, "eager_pipeline_steps": est.steps, "flushes": c[1],
                     "eager_pipeline_flushes": est.flushes})
    return {"dtype": "float64", "backend": "torch (graphed)", "rows": rows,
            "all_identical": all(r["pipelined_eq_eager_greedy"] and r["plain_static_eq_eager_greedy"] for r in rows),
            "steps_and_flushes_match_eager_pipeline": all(r["steps"] == r["eager_pipeline_steps"] and
                                                          r["flushes"] == r["eager_pipeline_flushes"] for r in rows)}


def bench_7b(args) -> dict:
    """Random bf16 weights at a 7B-scale shape: graphed step times vs tokens in flight."""
    r_ = args.big_loops
    shape = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_heads": 32,
             "num_kv_heads": 8, "head_dim": 128}
    if DEV != "cuda":  # --cpu-smoke: same code, toy sizes
        shape = {"vocab_size": 300, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4, "num_kv_heads": 2,
                 "head_dim": 64}
    cfg = LoopedConfig(**shape, num_unique_layers=args.big_unique, num_loops=r_, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LoopedDecoder(cfg).to(torch.bfloat16).eval()
    ctx = args.big_ctx
    st = build_static(model, ctx + 512)
    st.kc.normal_()
    st.vc.normal_()
    blk, head = weight_bytes(st)
    kv_row = kv_bytes_per_row(st, ctx)
    res = {"shape": {**shape, "unique_layers": cfg.num_unique_layers, "passes": r_, "dtype": "bfloat16", "context": ctx},
           "block_weight_bytes": blk, "head_weight_bytes": head, "kv_bytes_per_row_per_pass": kv_row,
           "measured": {}, "combined": {}}
    d = cfg.hidden_size
    rows = []
    for m in range(1, r_ + 1):
        x = torch.randn(m, d, device=DEV, dtype=torch.bfloat16)
        wpos = torch.full((m,), ctx, device=DEV, dtype=torch.int64)
        lens = torch.full((m,), ctx + 1, device=DEV, dtype=torch.int32)
        def blk_only(x=x, m=m, wpos=wpos, lens=lens):
            return block_pass(st, x, slice(0, m), wpos, wpos, lens)

        def blk_head(x=x, m=m, wpos=wpos, lens=lens):
            return exit_argmax(st, block_pass(st, x, slice(0, m), wpos, wpos, lens))

        t_blk = time_fn(blk_only, DEV, warmup=3, iters=args.iters)
        t_all = time_fn(blk_head, DEV, warmup=3, iters=args.iters)
        byt = blk + head + m * kv_row
        rows.append({"tokens_in_flight": m, "block_ms": t_blk.median_ms, "block_plus_head_ms": t_all.median_ms,
                     "graph": t_all.graph, "bytes": byt, "floor_ms": byt / TB * 1e3,
                     "achieved_tb_s": byt / (t_all.median_ms * 1e-3) / 1e12,
                     "ms_per_token_in_flight": t_all.median_ms / m})
        print(f"7B-scale block+head, {m} in flight: {t_all.median_ms:.3f} ms (floor {byt / TB * 1e3:.3f})", flush=True)
    res["measured"]["block_pass_vs_tokens_in_flight"] = rows
    # full pipeline step (R slots, update kernel) and plain greedy step
    start = ctx - r_

    def reset_pipeline():
        st.tok.random_(0, cfg.vocab_size)
        st.pos.copy_(start + torch.arange(r_ - 1, -1, -1, device=DEV))
        st.valid.fill_(1)
        st.wpos.copy_(st.pos)
        st.lens.copy_((st.pos + 1).to(torch.int32))
        st.last_pos.fill_(st.max_len - 2)
        st.h_in.normal_()

    def reset_greedy():
        st.g_pos.fill_(ctx)
        st.g_wpos.fill_(ctx)
        st.g_lens.fill_(ctx + 1)
        st.g_h.normal_()

    def timed_steps(reset, step) -> list[float]:
        reset()
        return timed(reset, capture(step), args.iters, warm=3)

    tp = statistics.median(timed_steps(reset_pipeline, lambda: pipeline_step(st)))
    tg = statistics.median(timed_steps(reset_greedy, lambda: greedy_step(st)))
    bp = blk + head + r_ * kv_row
    bg = r_ * (blk + kv_row) + head
    res["measured"]["pipeline_step_ms"] = tp
    res["measured"]["pipeline_step_floor_ms"] = bp / TB * 1e3
    res["measured"]["plain_greedy_step_ms"] = tg
    res["measured"]["plain_greedy_step_floor_ms"] = bg / TB * 1e3
    res["measured"]["iters"] = args.iters
    ideal = tg / tp
    res["combined"] = {
        "note": ("COMBINED, not measured end to end: speedup = plain greedy step time / (pipeline step time / "
                 "tokens per step), tokens per step modelled as 1 / (1 + p (R - 1)) for a flush probability p per "
                 "token (each flush wastes up to R - 1 steps); random weights have no meaningful flush rate."),
        "speedup_if_no_flush": ideal,
        "speedup_by_flush_rate": {str(p): ideal / (1 + p * (r_ - 1)) for p in args.flush_rates},
    }
    print(f"7B-scale: pipeline step {tp:.3f} ms (floor {bp / TB * 1e3:.3f}), plain greedy step {tg:.3f} ms "
          f"(floor {bg / TB * 1e3:.3f}); combined no-flush speedup {ideal:.2f}x", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/speed_gpu_h100.json"))
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--big-unique", type=int, default=4)
    ap.add_argument("--big-loops", type=int, default=8)
    ap.add_argument("--big-ctx", type=int, default=1024)
    ap.add_argument("--flush-rates", type=float, nargs="+", default=[0.0, 0.06, 0.14, 0.22])
    ap.add_argument("--skip", nargs="*", default=[], choices=["zoo", "fp64", "7b"])
    ap.add_argument("--cpu-smoke", action="store_true", help="run every code path on the CPU at toy sizes, no graphs")
    args = ap.parse_args()
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
        args.backends = ["torch"]
    torch.set_float32_matmul_precision("highest")
    env = environment(DEV)
    result = {"benchmark": "speed_gpu", "command": command_line(), **env, "args": vars(args),
              "note": ("Batch 1, greedy, EOS ignored, decode only (prefill excluded on both sides). Both sides "
                       "replay one CUDA graph per step on the same static buffers and kernels; plain greedy "
                       "replays n - 1 graphs with no host sync, the pipeline syncs a few times per decode to read "
                       "its commit counter (host_syncs). Times: CUDA events, median of --reps decodes after 2 "
                       "warm-ups. floor = bytes / 3.0 TB/s.")}
    out = Path(args.out)
    zoo: dict = {}
    result["looped_4x3"] = zoo
    sections = [("looped_7b_scale", "7b", lambda: bench_7b(args)),
                ("looped_4x3", "zoo", lambda: bench_zoo(args, args.backends[:1], zoo)),
                ("exactness_fp64", "fp64", lambda: bench_fp64_exactness(args)),
                ("looped_4x3", "zoo", lambda: bench_zoo(args, args.backends[1:], zoo))]
    for i, (name, key, fn) in enumerate(sections):
        if key in args.skip:
            continue
        t = time.perf_counter()
        try:
            r = fn()
            if name != "looped_4x3":
                result[name] = r
        except Exception as exc:  # noqa: BLE001 - keep the other sections' results
            traceback.print_exc()
            result[f"error_section_{i}_{name}"] = f"{type(exc).__name__}: {exc}"[:500]
        result[f"seconds_section_{i}_{name}"] = time.perf_counter() - t
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print("\nsummary")
    for b, v in result.get("looped_4x3", {}).get("backends", {}).items():
        s = v["summary"]
        print(f"4x3 [{b}]: identical {s['all_identical_pipelined_vs_plain']} (vs eager {s['all_identical_plain_vs_eager_greedy']}) "
              f"flush rate {s['flush_rate']:.3f} tok/fwd {s['tokens_per_forward']:.2f} | plain {s['median_plain_tok_s']:.0f} "
              f"tok/s, pipelined {s['median_pipelined_tok_s']:.0f} tok/s, median speedup {s['median_speedup']:.2f}x "
              f"(total-time {s['speedup_total_time']:.2f}x); ms/step plain {s['median_plain_ms_per_step']:.4f} "
              f"pipe {s['median_pipelined_ms_per_step']:.4f}")
    e = result.get("exactness_fp64", {})
    print(f"fp64 exactness: {e.get('all_identical')} steps/flushes match eager: {e.get('steps_and_flushes_match_eager_pipeline')}")
    b = result.get("looped_7b_scale", {})
    if "measured" in b:
        for r in b["measured"]["block_pass_vs_tokens_in_flight"]:
            print(f"7B m={r['tokens_in_flight']}: block {r['block_ms']:.3f} ms, +head {r['block_plus_head_ms']:.3f} ms, "
                  f"floor {r['floor_ms']:.3f}")
        m = b["measured"]
        print(f"7B pipeline step {m['pipeline_step_ms']:.3f} ms vs plain step {m['plain_greedy_step_ms']:.3f} ms; "
              f"combined {b['combined']['speedup_by_flush_rate']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
