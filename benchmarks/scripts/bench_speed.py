"""SPEED on CPU: pipelined decoding of the bundled looped 4x3 model vs its plain greedy decoding, and early-exit
self-speculation of the default zoo Llama vs plain greedy, transformers' prompt-lookup assisted generation and
transformers' early-exit assistant, all in one run, batch 1, greedy, EOS ignored.

CPU FIGURES ONLY (eager PyTorch, no CUDA graphs): tokens per forward and flush / acceptance rates are
properties of the models and the held-out text and carry over to a GPU; the wall-clock tokens/s do not.
GPU figures (both sides CUDA-graphed): benchmarks/scripts/bench_speed_gpu.py.

    python benchmarks/scripts/bench_speed.py --out benchmarks/results/speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from lmsqueeze.bench.results import atomic_write_text, command_line, environment  # noqa: E402
from lmsqueeze.data.heldout import load_heldout_text  # noqa: E402
from lmsqueeze.methods.speed import (CalibrationConfig, calibrate_self_speculation, plain_greedy,  # noqa: E402
                                     self_speculative_generate, speed_decode_looped)
from lmsqueeze.models.looped import greedy_decode, load_looped  # noqa: E402

LOOPED_DIR = ROOT / "src/lmsqueeze/zoo/looped-4x3"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def prompts(tok, n: int, length: int) -> list[torch.Tensor]:
    """n windows of `length` tokens spread over the held-out text (offset so they differ from calibration)."""
    ids = tok.encode(load_heldout_text()[:400_000])
    stride = len(ids) // n
    return [torch.tensor([ids[i * stride + stride // 2:i * stride + stride // 2 + length]]) for i in range(n)]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls (after one warm-up) and the last result."""
    res = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


class ForwardCounter:
    """Counts full-depth forwards of an HF model (draft calls of the early-exit assistant run with a smaller
    config.num_hidden_layers and are counted apart)."""

    def __init__(self, model) -> None:
        self.model, self.full, self.draft = model, 0, 0
        self.depth = model.config.num_hidden_layers
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        if self.model.config.num_hidden_layers < self.depth:
            self.draft += 1
        else:
            self.full += 1

    def reset(self) -> None:
        self.full = self.draft = 0


def bench_looped(args) -> dict:
    model, tok = load_looped(LOOPED_DIR)
    rows = []
    for i, ids in enumerate(prompts(tok, args.prompts, args.prompt_tokens)):
        n = args.looped_tokens
        t_ref, ref = timed(lambda: greedy_decode(model, ids, n), args.repeats)
        t_spd, (out, st) = timed(lambda: speed_decode_looped(model, ids, n), args.repeats)
        rows.append({"prompt": i, "prompt_tokens": ids.shape[1], "new_tokens": n,
                     "identical_to_greedy": bool(torch.equal(out, ref)),
                     "greedy_s": t_ref, "speed_s": t_spd,
                     "greedy_tok_s": n / t_ref, "speed_tok_s": n / t_spd, "speedup": t_ref / t_spd,
                     **st.as_dict()})
        print(f"looped prompt {i}: identical={rows[-1]['identical_to_greedy']} "
              f"tokens/forward={st.tokens_per_forward:.2f} flush_rate={st.flush_rate:.3f} "
              f"greedy {n / t_ref:.1f} tok/s, SPEED {n / t_spd:.1f} tok/s", flush=True)
    steps = sum(r["steps"] for r in rows)
    committed = sum(r["new_tokens"] - 1 for r in rows)
    return {"model": str(LOOPED_DIR.relative_to(ROOT)), "config": model.config.name, "rows": rows,
            "summary": {"all_identical": all(r["identical_to_greedy"] for r in rows),
                        "tokens_per_forward": committed * model.config.num_loops / steps,
                        "tokens_per_block_pass": committed / steps,
                        "flush_rate": sum(r["flushes"] for r in rows) / committed,
                        "flushed_tokens_per_token": sum(r["flushed_tokens"] for r in rows) / committed,
                        "median_speedup_wall": statistics.median(r["speedup"] for r in rows),
                        "median_greedy_tok_s": statistics.median(r["greedy_tok_s"] for r in rows),
                        "median_speed_tok_s": statistics.median(r["speed_tok_s"] for r in rows)}}


def bench_llama(args) -> dict:
    import lmsqueeze

    model, tok = lmsqueeze.load_model()
    model.eval()
    model.generation_config.eos_token_id = None  # fixed-length decoding on every side
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t = time.perf_counter()
    cal = calibrate_self_speculation(model, tok, CalibrationConfig(num_prompts=args.calib_prompts,
                                                                   gen_tokens=args.calib_tokens))
    calib_s = time.perf_counter() - t
    e, k = cal.exit_layer, cal.draft
    print(f"calibration ({calib_s:.0f} s): E={e} k={k}", flush=True)
    counter = ForwardCounter(model)
    rows = []
    for i, ids in enumerate(prompts(tok, args.prompts, args.prompt_tokens)):
        n = args.llama_tokens
        row = {"prompt": i, "prompt_tokens": ids.shape[1], "new_tokens": n}
        t_ref, ref = timed(lambda: plain_greedy(model, ids, n), args.repeats)
        row.update(greedy_s=t_ref, greedy_tok_s=n / t_ref)

        def hf(**kw):
            return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=pad, **kw)

        t_hf, out = timed(hf, args.repeats)
        row.update(hf_greedy_s=t_hf, hf_greedy_tok_s=n / t_hf, hf_greedy_identical=bool(torch.equal(out, ref)))
        t_ss, (out, st) = timed(lambda: self_speculative_generate(model, ids, n, exit_layer=e, draft=k), args.repeats)
        row.update(self_spec_s=t_ss, self_spec_tok_s=n / t_ss, self_spec_identical=bool(torch.equal(out, ref)),
                   self_spec_speedup=t_ref / t_ss, self_spec=st.as_dict())
        for name, kw in (("prompt_lookup", {"prompt_lookup_num_tokens": args.lookup_tokens}),
                         ("hf_early_exit", {"assistant_early_exit": e})):
            try:
                t_x, out = timed(lambda: hf(**kw), args.repeats)
                counter.reset()
                hf(**kw)
                row[name] = {"s": t_x, "tok_s": n / t_x, "identical": bool(torch.equal(out, ref)),
                             "speedup_vs_greedy": t_ref / t_x, "full_forwards": counter.full,
                             "draft_forwards": counter.draft,
                             "tokens_per_full_forward": n / max(counter.full, 1)}
            except Exception as exc:  # record, keep the run going
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        pl = row["prompt_lookup"]
        print(f"llama prompt {i}: greedy {n / t_ref:.1f} tok/s | self-spec {n / t_ss:.1f} tok/s "
              f"acc={st.acceptance_rate:.2f} tpf={st.tokens_per_forward:.2f} same={row['self_spec_identical']} | "
              f"prompt lookup {pl.get('tok_s', float('nan')):.1f} tok/s tpf={pl.get('tokens_per_full_forward', 0):.2f}",
              flush=True)
    counter.handle.remove()
    drafted = sum(r["self_spec"]["drafted"] for r in rows)
    summary = {"exit_layer": e, "draft": k,
               "self_spec_all_identical": all(r["self_spec_identical"] for r in rows),
               "self_spec_acceptance_rate": sum(r["self_spec"]["accepted"] for r in rows) / max(drafted, 1),
               "self_spec_tokens_per_forward": sum(r["new_tokens"] for r in rows) / sum(r["self_spec"]["rounds"] for r in rows),
               "median_greedy_tok_s": statistics.median(r["greedy_tok_s"] for r in rows),
               "median_hf_greedy_tok_s": statistics.median(r["hf_greedy_tok_s"] for r in rows),
               "median_self_spec_tok_s": statistics.median(r["self_spec_tok_s"] for r in rows),
               "median_self_spec_speedup": statistics.median(r["self_spec_speedup"] for r in rows)}
    for name in ("prompt_lookup", "hf_early_exit"):
        ok = [r[name] for r in rows if "error" not in r[name]]
        if ok:
            summary[f"median_{name}_tok_s"] = statistics.median(x["tok_s"] for x in ok)
            summary[f"median_{name}_speedup"] = statistics.median(x["speedup_vs_greedy"] for x in ok)
            summary[f"{name}_all_identical"] = all(x["identical"] for x in ok)
            summary[f"{name}_tokens_per_full_forward"] = statistics.median(x["tokens_per_full_forward"] for x in ok)
    return {"model": "src/lmsqueeze/zoo/default", "calibration": {"seconds": calib_s, "best_tokens_per_full_forward_equiv": cal.tokens_per_full_forward_equiv,
                                                       "beats_plain_greedy": cal.tokens_per_full_forward_equiv > 1.0,
                                                       "table": cal.table},
            "rows": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/speed_cpu.json"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--looped-tokens", type=int, default=64)
    ap.add_argument("--llama-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookup-tokens", type=int, default=4)
    ap.add_argument("--calib-prompts", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "speed", "command": command_line(), **environment("cpu"), "cpu_model": cpu_model(),
              "torch_threads": args.threads,
              "note": ("CPU figures only: eager PyTorch on a shared 2-core CPU, batch 1, greedy, EOS ignored; "
                       "wall times are medians of --repeats runs after a warm-up and are noisy (other jobs share "
                       "the CPU). GPU figures (H100, CUDA-graphed) were NOT measured. tokens_per_forward for "
                       "the looped model = committed tokens per R batched block passes (plain greedy: 1.0); for "
                       "self-speculation = committed tokens per verify forward."),
              "args": vars(args)}
    result["looped"] = bench_looped(args)
    result["self_speculation"] = bench_llama(args)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    ls, ss = result["looped"]["summary"], result["self_speculation"]["summary"]
    print(f"\nCPU ({result['cpu_model']}, {args.threads} thread(s)):")
    print(f"looped 4x3 SPEED: identical={ls['all_identical']} tokens/forward={ls['tokens_per_forward']:.2f} "
          f"flush rate={ls['flush_rate']:.3f} tok/s {ls['median_speed_tok_s']:.1f} vs greedy "
          f"{ls['median_greedy_tok_s']:.1f} ({ls['median_speedup_wall']:.2f}x)")
    print(f"default Llama self-spec E={ss['exit_layer']} k={ss['draft']}: identical={ss['self_spec_all_identical']} "
          f"acceptance={ss['self_spec_acceptance_rate']:.3f} tokens/forward={ss['self_spec_tokens_per_forward']:.2f} "
          f"tok/s {ss['median_self_spec_tok_s']:.1f} vs greedy {ss['median_greedy_tok_s']:.1f} "
          f"({ss['median_self_spec_speedup']:.2f}x); prompt lookup {ss.get('median_prompt_lookup_tok_s', float('nan')):.1f} tok/s; "
          f"HF early-exit assistant {ss.get('median_hf_early_exit_tok_s', float('nan')):.1f} tok/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
