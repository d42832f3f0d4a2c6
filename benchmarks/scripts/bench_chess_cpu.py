"""CPU benchmark of CHESS (batch 1 decode) on this machine: end-to-end tokens/s and single sparse GEMVs.

    python benchmarks/scripts/bench_chess_cpu.py [--out benchmarks/results/chess_cpu.json] [--model HF_DIR]
    python benchmarks/scripts/bench_chess_cpu.py --model zoo --threads 2 --out benchmarks/results/chess_cpu_zoo.json

Model: a 1.1B-parameter Llama shape (hidden 2048, 16 layers, intermediate 8192, 32 q / 8 kv heads, vocab
32000) with random weights, or a local HF model directory (--model, e.g. a zoo model). Both fp32 and bf16 are
run (unless --dtype is given); the headline rows (`headline: true`) are the dtype whose dense decode is faster.
CHESS(0.5) is calibrated on random tokens, the same distribution as the prompt and the decoded tokens (a
--model: on corpus text, prompted with held-out text).

Decode: a random prompt is prefilled, then greedy one-token steps through `lmsqueeze.apply` (Dense vs CHESS;
also CATS), each with its own cache. Blocks of steps of the methods alternate, so that a load change on this
shared machine hits all of them alike; per-step times (perf_counter), median over >= 20 steps after warm-up.
GEMVs: dense `F.linear` vs the CPU sparse paths at the model's shapes, rotating weight copies larger than the
last-level cache, calls interleaved, median of >= 20. The load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze  # noqa: E402
from lmsqueeze.bench.results import atomic_write_text, build_result, command_line  # noqa: E402
from lmsqueeze.methods.baselines.cats import CATS  # noqa: E402
from lmsqueeze.methods.chess import CHESS  # noqa: E402
from lmsqueeze.methods.chess.cpu import gate_up_compact_cpu, input_sparse_matvec_cpu, rows_weighted_sum_cpu  # noqa: E402

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
LLC_BYTES = 32 << 20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def build_model(args, dtype: torch.dtype):
    if args.model:
        model, tok = lmsqueeze.load_model(None if args.model == "zoo" else args.model, dtype=dtype)
        args.tokenizer = tok
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    return model


def interleaved(fns: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """Per-call seconds of each fn, calls interleaved round-robin."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def decode_rounds(model, methods: dict, prompt: torch.Tensor, rounds: int, per_round: int, warmup: int):
    """Alternate blocks of `per_round` decode steps of each method (one cache each); per-step times."""
    state = {}
    with torch.no_grad():
        for name, art in methods.items():
            with lmsqueeze.apply(model, art) as session:
                cache = session.new_cache()
                tok = model(prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
                for _ in range(warmup):
                    tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            state[name] = [cache, tok, []]
        for _ in range(rounds):
            for name, art in methods.items():
                cache, tok, ts = state[name]
                with lmsqueeze.apply(model, art):
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
                        ts.append(time.perf_counter() - t0)
                state[name][1] = tok
    return {name: s[2] for name, s in state.items()}


def gemv_rows(dtype: torch.dtype, H: int, I: int, iters: int) -> list[dict]:
    """Dense F.linear vs the CPU sparse paths at 50% sparsity, batch 1, rotating copies beyond the LLC."""
    rows = []
    elt = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)

    def copies(nbytes: int) -> int:
        return max(2, -(-2 * LLC_BYTES // nbytes))

    # down_proj: input-sparse over I inputs (x has 50% exact zeros)
    n = copies(H * I * elt)
    ws = [torch.randn(H, I, generator=gen).to(dtype) for _ in range(n)]
    wts = [w.t().contiguous() for w in ws]
    x = (torch.randn(1, I, generator=gen) * (torch.rand(1, I, generator=gen) >= 0.5)).to(dtype)
    idx = x[0].nonzero().squeeze(1)
    i = [0]

    def nxt() -> int:
        i[0] = (i[0] + 1) % n
        return i[0]

    t = interleaved({"dense": lambda: F.linear(x, ws[nxt()]),
                     "sparse": lambda: input_sparse_matvec_cpu(x, wts[nxt()]),
                     "sparse_kernel_only": lambda: rows_weighted_sum_cpu(wts[nxt()], idx, x[:, idx])},
                    warmup=3, iters=iters)
    err = ((input_sparse_matvec_cpu(x, wts[0]).float() - F.linear(x.float(), ws[0].float())).norm()
           / F.linear(x.float(), ws[0].float()).norm()).item()
    rows.append(dict(method="chess-cpu", kernel="down_proj", K=I, N=H, batch=1, sparsity=0.5,
                     rows_read_frac=idx.numel() / I, dense_ms=median_ms(t["dense"]), ms=median_ms(t["sparse"]),
                     kernel_only_ms=median_ms(t["sparse_kernel_only"]),
                     speedup=median_ms(t["dense"]) / median_ms(t["sparse"]), iters=iters, rel_err=err,
                     dense_gb_per_s=H * I * elt / (median_ms(t["dense"]) * 1e-3) / 1e9,
                     sparse_gb_per_s=idx.numel() * H * elt / (median_ms(t["sparse"]) * 1e-3) / 1e9))
    ws = wts = None

    # gate + up (gate dense, up only for surviving channels) vs two dense F.linear + SiLU * mul
    n = copies(2 * H * I * elt)
    mats = [((torch.randn(I, H, generator=gen) / H**0.5).to(dtype), torch.randn(I, H, generator=gen).to(dtype))
            for _ in range(n)]
    xh = torch.randn(1, H, generator=gen).to(dtype)
    a = F.silu(F.linear(xh, mats[0][0])).float()
    thr = torch.full((I,), float(a.abs().median()))

    t = interleaved({"dense": lambda: (lambda wg, wu: F.silu(F.linear(xh, wg)) * F.linear(xh, wu))(*mats[nxt() % n]),
                     "sparse": lambda: gate_up_compact_cpu(xh, *mats[nxt() % n], thr)}, warmup=3, iters=iters)
    rows.append(dict(method="chess-cpu", kernel="gate+up", K=H, N=I, batch=1, sparsity=0.5,
                     rows_read_frac=float((a.abs() > thr).float().mean()), dense_ms=median_ms(t["dense"]),
                     ms=median_ms(t["sparse"]), speedup=median_ms(t["dense"]) / median_ms(t["sparse"]),
                     iters=iters))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chess_cpu.json")
    ap.add_argument("--model", default=None,
                    help="a local HF model directory or 'zoo' (the bundled model; default: random 1.1B Llama shape)")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=6)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--no-cats", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    extra: dict = {"cpu_model": cpu_model(), "threads": torch.get_num_threads(), "loadavg_before": load_before}
    gen = torch.Generator().manual_seed(1)

    # Both dtypes are run in full (dense and sparse timed in the same rounds); the headline is the dtype whose
    # dense decode is faster in those rounds (a separate short probe proved too noisy on a shared machine).
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names = ["fp32", "bf16"] if args.dtype == "auto" else [args.dtype]
    model = build_model(args, torch.float32)
    vocab = model.config.vocab_size
    cfg = model.config
    H, I = cfg.hidden_size, cfg.intermediate_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen)
    batches = [torch.randint(0, vocab, (1, 128), generator=gen) for _ in range(4)]
    if args.model:  # a trained model: calibrate on corpus text and prompt with held-out text
        from lmsqueeze.data.calibration import calibration_batches
        from lmsqueeze.eval.texts import eval_text

        batches = calibration_batches(args.tokenizer, num_samples=8, seq_len=256)
        text, _ = eval_text(None, max_chars=20 * args.prompt)
        prompt = torch.tensor([args.tokenizer(text)["input_ids"][: args.prompt]])
        extra["calibration"] = "8 x 256 corpus train-split tokens; prompt: held-out text"
    extra["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    rows = []
    dense_by_dtype = {}
    for name in names:  # fp32 first: the bf16 model is converted from it
        model = model.to(dtypes[name])
        print(f"params {extra['params_b']:.2f}B, dtype {name}", flush=True)
        # calibrate on random tokens (same distribution as the prompt and the decoded tokens)
        t0 = time.perf_counter()
        arts = {"dense": None, "chess": CHESS(sparsity=args.sparsity).calibrate(model, batches)}
        if not args.no_cats:
            arts["cats"] = CATS(sparsity=args.sparsity).calibrate(model, batches)
        extra[f"calibrate_s_{name}"] = time.perf_counter() - t0
        # end-to-end decode, blocks of methods alternating
        times = decode_rounds(model, arts, prompt, args.rounds, args.per_round, warmup=3)
        dense = dense_by_dtype[name] = median_ms(times["dense"])
        for m in arts:
            ms = median_ms(times[m])
            ts = sorted(times[m])
            rows.append({"method": m, "kind": "decode_step", "batch": 1, "prompt": args.prompt, "dtype": name,
                         "sparsity": None if m == "dense" else args.sparsity, "ms": ms, "tokens_per_s": 1e3 / ms,
                         "iters": len(ts), "p10_ms": ts[len(ts) // 10] * 1e3,
                         "p90_ms": ts[-max(1, len(ts) // 10)] * 1e3, "baseline": "dense", "baseline_ms": dense,
                         "speedup": dense / ms})
            print(f"{name} {m:<6} {ms:8.1f} ms/token  {1e3 / ms:6.2f} tok/s  x{dense / ms:.3f}", flush=True)
        arts = None
        # single GEMVs at the model's shapes
        gemv = gemv_rows(dtypes[name], H, I, iters=25)
        for r in gemv:
            r["dtype"] = name
            print(f"{name} {r['kernel']:<8} dense {r['dense_ms']:.3f} ms  sparse {r['ms']:.3f} ms  "
                  f"x{r['speedup']:.3f}", flush=True)
        rows += gemv
    extra["dense_ms_by_dtype"] = dense_by_dtype
    extra["headline_dtype"] = min(dense_by_dtype, key=dense_by_dtype.get)
    for r in rows:
        r["headline"] = r["dtype"] == extra["headline_dtype"]
    print("faster dense dtype:", extra["headline_dtype"])
    extra["loadavg_after"] = os.getloadavg()
    doc = build_result("chess_cpu", command_line(), rows, extra, device="cpu")
    doc["device"]["name"] = extra["cpu_model"]
    import json

    atomic_write_text(args.out, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
