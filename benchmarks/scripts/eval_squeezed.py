"""Fixed-context many-questions quality of Squeezed Attention and its baselines, every method in one run.

Each context (needles in held-out code or prose, or a key-value table) is prepared once per method and asked
all its questions; the cache is cropped back between questions. Methods: dense (the context prefilled
densely), Squeezed Attention at 70% and 90% sparsity (5% centroids; hierarchical 1% / 5% at 90%), and at the
KV budget of each Squeezed setting: Quest (pages of 16, page bounds counted), StreamingLLM (4 sinks + recent),
SnapKV-style prepare-time selection and random rows. The budget of a Squeezed setting is what one decode step
reads: (1 - sparsity) of the clustered keys, the centroids (keys only: half a token each) and the observation
window, as a fraction of the context.

    python benchmarks/scripts/eval_squeezed.py --context-length 2048 --contexts 52 --facts 4 --questions 4 \
        --out benchmarks/results/squeezed_quality.json

(The zoo model recalls single needles well and several facts poorly, and never kv tables: see docs/zoo.md;
hence 4 needles per context by default.)

Runs on the CPU with the bundled zoo model (src/lmsqueeze/zoo/default) unless --model is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

OBSERVATION = 64
DEFAULT_METHODS = "dense,squeezed-70,quest@70,streaming@70,squeezed-90,quest@90,streaming@90,random@90"


def squeezed_budget(sparsity: float, centroids: float, tokens: int, observation: int = OBSERVATION) -> float:
    """Fraction of the context's K+V one Squeezed decode step reads (kept rows, centroids, window)."""
    nc = tokens - observation
    return ((1 - sparsity) * nc + centroids * nc / 2 + observation) / tokens


def methods_for(tokens: int) -> list[tuple[str, object]]:
    from lmsqueeze.methods.baselines.quest import Quest
    from lmsqueeze.methods.baselines.random_select import RandomSelect
    from lmsqueeze.methods.baselines.snapkv import SnapKV
    from lmsqueeze.methods.baselines.streaming import StreamingLLM
    from lmsqueeze.methods.squeezed import SqueezedAttention

    out: list[tuple[str, object]] = [("dense", None)]
    for sp in (0.7, 0.9):
        b = squeezed_budget(sp, 0.05, tokens)
        out += [(f"squeezed-{int(sp * 100)}", SqueezedAttention(centroids=0.05, sparsity=sp, observation=OBSERVATION)),
                (f"quest@{int(sp * 100)}", Quest(budget=b)), (f"streaming@{int(sp * 100)}", StreamingLLM(budget=b))]
    out += [("squeezed-h90", SqueezedAttention(sparsity=0.9, hierarchical=(0.01, 0.05), observation=OBSERVATION)),
            ("snapkv@90", SnapKV(budget=squeezed_budget(0.9, 0.05, tokens))),
            ("random@90", RandomSelect(budget=squeezed_budget(0.9, 0.05, tokens)))]
    return out


@torch.inference_mode()
def answer_prepared(model, tok, artifact, questions, budgets, chunk: int) -> tuple[list[list[int]], dict]:
    """Answer each question (token ids) after a prepared context; crop back to it after each one."""
    import lmsqueeze
    from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids

    stops = stop_token_ids(tok)
    outs = []
    with lmsqueeze.apply(model, artifact) as session:
        cache = session.new_cache(batch_size=1, max_length=max(len(q) + b for q, b in zip(questions, budgets)))
        for q, b in zip(questions, budgets):
            logits = prefill(model, torch.tensor(q), cache, chunk)
            outs.append(greedy_decode(model, cache, logits, b, stops))
            cache.crop(-cache.get_seq_length())
        rows = [layer.rows_read / max(1, layer.rows_calls) for layer in cache.layers]
    return outs, {"rows_read_per_step": sum(rows) / len(rows)}


def plot(result: str, png: str) -> None:
    """Accuracy vs the fraction of the fixed context read per step, one marker per method."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(result).read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in d["metrics"].items():
        family = name.split("@")[0].split("-")[0]
        marker = {"dense": "s", "squeezed": "o", "quest": "^", "streaming": "v", "snapkv": "D", "random": "x"}[family]
        ax.scatter(m["nominal_budget"], m["accuracy"], marker=marker, s=50, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("nominal KV budget (fraction of the fixed context read per decode step)")
    ax.set_ylabel("accuracy (string match)")
    n = d["metrics"]["dense"]["questions"] if "dense" in d["metrics"] else "?"
    ax.set_title(f"fixed-context QA, zoo:default, {d['data']['context_length']} tokens, {n} questions", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the bundled zoo model)")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--contexts", type=int, default=52)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--kinds", default="needles/code,needles/prose",
                    help="comma-separated kind/format pairs, cycled over the contexts (kv/code, kv/prose too)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma-separated method names (also: squeezed-h90, snapkv@90); 'all' for every one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--extra-tokens", type=int, default=3,
                    help="new tokens per question beyond the answer's own (the harness default is 8)")
    ap.add_argument("--out", default="benchmarks/results/squeezed_quality.json")
    ap.add_argument("--plot-from", default=None, help="only plot this result JSON to --plot")
    ap.add_argument("--plot", default="benchmarks/plots/squeezed_quality.png")
    args = ap.parse_args()
    if args.plot_from:
        plot(args.plot_from, args.plot)
        return 0
    logging.basicConfig(level=logging.WARNING)

    import lmsqueeze
    from lmsqueeze.data.tasks import fixed_context_sample, haystack_lines
    from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids
    from lmsqueeze.eval.results import make_result, model_info, write_json
    from lmsqueeze.eval.scoring import string_match_all
    from lmsqueeze.eval.suite import answer_budget
    from lmsqueeze.eval.texts import eval_text
    from lmsqueeze.methods.squeezed.context import capture_context

    torch.manual_seed(args.seed)
    model, tok = lmsqueeze.load_model(args.model)
    text, data_info = eval_text(None, max_chars=8 * args.context_length + 200_000)
    lines = haystack_lines(text)
    kinds = [tuple(k.split("/")) for k in args.kinds.split(",")]
    samples = [fixed_context_sample(tok, lines, args.context_length, args.facts, args.questions, args.seed, i,
                                    *kinds[i % len(kinds)]) for i in range(args.contexts)]
    methods = methods_for(args.context_length)
    if args.methods != "all":
        keep = args.methods.split(",")
        unknown = set(keep) - {m[0] for m in methods}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[m[0] for m in methods]}")
        methods = [m for m in methods if m[0] in keep]
    per_method: dict[str, dict] = {name: {"correct": 0, "n": 0, "rows": [], "prepare_s": 0.0, "answer_s": 0.0}
                                   for name, _ in methods}
    records = []
    stops = stop_token_ids(tok)
    metrics: dict = {}

    def write(complete: bool) -> None:
        metrics.clear()
        dense_acc = per_method.get("dense", {}).get("correct", 0) / max(1, per_method.get("dense", {}).get("n", 1))
        for name, method in methods:
            pm = per_method[name]
            acc = pm["correct"] / pm["n"]
            metrics[name] = {
                "accuracy": acc, "questions": pm["n"], "delta_vs_dense_points": 100 * (acc - dense_acc),
                "fixed_rows_read_fraction": sum(pm["rows"]) / len(pm["rows"]),
                "nominal_budget": getattr(method, "budget", None) if method is not None else 1.0,
                "config": method.to_dict() if method is not None else {"name": "dense"},
                "seconds_prepare": pm["prepare_s"], "seconds_answer": pm["answer_s"],
            }
            if name.startswith("squeezed"):
                sp = method.sparsity
                cents = sum(method.hierarchical) if method.hierarchical else method.centroids
                metrics[name]["nominal_budget"] = squeezed_budget(sp, cents, args.context_length)
        result = make_result(
            "eval.fixed_squeezed", metrics, model=model_info(model, args.model or "zoo:default"),
            data={**data_info, "contexts": args.contexts, "questions_per_context": args.questions,
                  "context_length": args.context_length, "facts": args.facts, "kinds": kinds, "seed": args.seed},
            config={"observation": OBSERVATION, "chunk_size": args.chunk_size,
                    "budget_note": "fixed_rows_read_fraction: fixed-context rows read per attention call (prefill "
                                   "chunks and decode steps, averaged over layers) / context tokens; centroid and "
                                   "page-bound reads are in nominal_budget only"},
            device="cpu")
        result["records"] = records
        result["complete"] = complete
        result["config"]["extra_tokens"] = args.extra_tokens
        write_json(args.out, result)

    for s in samples:
        ctx = tok(s.context)["input_ids"]
        qs = [tok(q, add_special_tokens=False)["input_ids"] for q in s.questions]
        budgets = [answer_budget(tok, a) - 8 + args.extra_tokens for a in s.answers]
        t_cap = time.perf_counter()
        captured = capture_context(model, ctx, OBSERVATION, args.chunk_size)  # one dense forward, every method
        t_cap = time.perf_counter() - t_cap
        for name, method in methods:
            t0 = time.perf_counter()
            if method is None:                                       # dense: the harness's own path
                with lmsqueeze.apply(model, None) as session, torch.inference_mode():
                    cache = session.new_cache(batch_size=1, max_length=len(ctx) + 64)
                    prefill(model, torch.tensor(ctx), cache, args.chunk_size)
                    t1 = time.perf_counter()
                    outs = []
                    for q, b in zip(qs, budgets):
                        outs.append(greedy_decode(model, cache, prefill(model, torch.tensor(q), cache,
                                                                           args.chunk_size), b, stops))
                        cache.crop(len(ctx))
                stats = {"rows_read_per_step": float(len(ctx))}
            else:
                art = method.prepare(model, ctx, captured=captured)
                t1 = time.perf_counter()
                pm_extra = t_cap / max(1, len(methods) - 1)             # its share of the shared capture
                t0 -= pm_extra
                outs, stats = answer_prepared(model, tok, art, qs, budgets, args.chunk_size)
            pm = per_method[name]
            pm["prepare_s"] += t1 - t0
            pm["answer_s"] += time.perf_counter() - t1
            pm["rows"].append(stats["rows_read_per_step"] / len(ctx))
            for i, (out, ans) in enumerate(zip(outs, s.answers)):
                pred = tok.decode(out, skip_special_tokens=True)
                ok = string_match_all(pred, ans)
                pm["correct"] += ok
                pm["n"] += 1
                records.append({"method": name, "context": s.index, "kind": s.kind, "format": s.format,
                                "question": i, "answers": ans, "prediction": pred, "correct": ok})
        write(len({r["context"] for r in records}) == len(samples))
        line = "  ".join(f"{n}={v['correct'] / max(1, v['n']):.3f}" for n, v in per_method.items())
        print(f"context {s.index} ({s.kind}/{s.format}, {len(ctx)} tokens): {line}", flush=True)
    print("\nmethod            accuracy  vs dense  rows read  nominal budget")
    for name, m in metrics.items():
        print(f"{name:16s}  {m['accuracy']:.3f}   {m['delta_vs_dense_points']:+6.1f}   {m['fixed_rows_read_fraction']:.3f}"
              f"     {m['nominal_budget']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
