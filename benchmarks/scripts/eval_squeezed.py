"""Fixed-context many-questions quality of Squeezed Attention and its baselines, every method in one run.

Each context (needles in held-out code or prose) is captured once (one dense forward), prepared once per
method from that capture and asked all its questions; the cache is cropped back between questions. Methods:
dense (every row of the captured context: the same function as prefilling it densely), Squeezed Attention at
70% and 90% sparsity (5% centroids, 4 sink tokens always read; squeezed-90 reuses squeezed-70's clusters),
and at the KV budget of each Squeezed setting: Quest (pages of 16, page bounds counted), StreamingLLM
(4 sinks + recent), SnapKV-style prepare-time selection and random rows. The budget of a Squeezed setting is
what one decode step reads: (1 - sparsity) of the clustered keys, the centroids (keys only: half a token
each), the sinks and the observation window, as a fraction of the context.

    python benchmarks/scripts/eval_squeezed.py --context-length 8192 --contexts 52 --shard 0/2 --out a.json &
    python benchmarks/scripts/eval_squeezed.py --context-length 8192 --contexts 52 --shard 1/2 --out b.json
    python benchmarks/scripts/eval_squeezed.py --merge a.json,b.json --out benchmarks/results/squeezed_quality.json

(The zoo model recalls single needles well and several facts poorly, and never kv tables: see docs/zoo.md;
hence 4 needles per context by default.)

Prefill selection variants: a method name `squeezed-90:MODE` runs SqueezedAttention(prefill=MODE) (MODE one of
token, token-budget, chunk; plain `squeezed-90` is the library default). Choose a variant on calibration data,
never on the held-out numbers: `--text train` builds the contexts from the corpus train split (a different
haystack, and `--seed` different facts) instead of the held-out text:

    python benchmarks/scripts/eval_squeezed.py --text train --seed 1000 --contexts 12 \
        --methods squeezed-90:chunk,squeezed-90:token,squeezed-90:token-budget --out calib.json

`--device cuda` runs the model and the kernels on the GPU (the JSON records the device).

Runs on the CPU with the bundled zoo model (src/lmsqueeze/zoo/default) unless --model is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

OBSERVATION = 64
SINKS = 4
DEFAULT_METHODS = ("dense,squeezed-70,quest@70,streaming@70,snapkv@70,squeezed-90,quest@90,streaming@90,snapkv@90,"
                   "random@90")
PREFILL_MODES = ("token", "token-budget", "chunk")


def squeezed_budget(sparsity: float, centroids: float, tokens: int, observation: int = OBSERVATION,
                    sinks: int = SINKS) -> float:
    """Fraction of the context's K+V one Squeezed decode step reads (kept rows, centroids, sinks, window)."""
    nc = tokens - observation - sinks
    return ((1 - sparsity) * nc + centroids * nc / 2 + observation + sinks) / tokens


def methods_for(tokens: int, sinks: int = SINKS, threshold: str = "head") -> list[tuple[str, object]]:
    from lmsqueeze.methods.baselines.quest import Quest
    from lmsqueeze.methods.baselines.random_select import RandomSelect
    from lmsqueeze.methods.baselines.snapkv import SnapKV
    from lmsqueeze.methods.baselines.streaming import StreamingLLM
    from lmsqueeze.methods.squeezed import SqueezedAttention

    out: list[tuple[str, object]] = [("dense", StreamingLLM(budget=1.0))]   # every row of the context
    for sp in (0.7, 0.9):
        b = squeezed_budget(sp, 0.05, tokens, sinks=sinks)
        name = f"squeezed-{int(sp * 100)}"
        out += [(name + suffix, SqueezedAttention(centroids=0.05, sparsity=sp, observation=OBSERVATION, sinks=sinks,
                                                  threshold=threshold, **kw))
                for suffix, kw in [("", {})] + [(f":{m}", {"prefill": m}) for m in PREFILL_MODES]]
        out += [
                (f"quest@{int(sp * 100)}", Quest(budget=b)), (f"streaming@{int(sp * 100)}", StreamingLLM(budget=b)),
                (f"snapkv@{int(sp * 100)}", SnapKV(budget=b)), (f"random@{int(sp * 100)}", RandomSelect(budget=b))]
    out += [("squeezed-h90", SqueezedAttention(sparsity=0.9, hierarchical=(0.01, 0.05), observation=OBSERVATION,
                                               sinks=sinks))]
    return out


@torch.inference_mode()
def answer_prepared(model, tok, artifact, questions, budgets, chunk: int) -> tuple[list[list[int]], dict]:
    """Answer each question (token ids) after a prepared context; crop back to it after each one."""
    import lmsqueeze
    from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids
    from lmsqueeze.methods.squeezed.state import FixedContextState

    FixedContextState.count_rows_on_gpu = True       # rows read are counted on the GPU too (eager: a sync is fine)
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


def method_metrics(methods, per_method: dict, tokens: int, sinks: int) -> dict:
    """Accuracy, delta vs dense (points), rows read and KV budget of every method from its counts."""
    metrics = {}
    dense = per_method.get("dense", {})
    dense_acc = dense.get("correct", 0) / max(1, dense.get("n", 1))
    for name, method in methods:
        pm = per_method[name]
        if not pm["n"]:
            continue
        acc = pm["correct"] / pm["n"]
        metrics[name] = {
            "accuracy": acc, "correct": pm["correct"], "questions": pm["n"],
            "delta_vs_dense_points": 100 * (acc - dense_acc) if dense.get("n") else None,
            "fixed_rows_read_fraction": sum(pm["rows"]) / len(pm["rows"]),
            "nominal_budget": getattr(method, "budget", None),
            "config": method.to_dict(),
            "seconds_prepare": pm["prepare_s"], "seconds_answer": pm["answer_s"],
        }
        if name.startswith("squeezed"):
            cents = sum(method.hierarchical) if method.hierarchical else method.centroids
            metrics[name]["nominal_budget"] = squeezed_budget(method.sparsity, cents, tokens, sinks=method.sinks)
    return metrics


def merge(paths: list[str], out: str) -> None:
    """Merge shard results (same settings) into one result with metrics over all their contexts: every context
    whose methods all finished counts once (a context two shards both finished is taken from the first)."""
    import json

    from lmsqueeze.eval.results import write_json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    args = first["config"]
    methods = [(n, _method_from(m["config"])) for n, m in first["metrics"].items()]
    per_method = {n: {"correct": 0, "n": 0, "rows": [], "prepare_s": 0.0, "answer_s": 0.0} for n, _ in methods}
    seen: set[int] = set()
    records = []
    for p in parts:
        order = list(dict.fromkeys(r["context"] for r in p["records"]))     # contexts in the order run
        for j, c in enumerate(order):
            recs = [r for r in p["records"] if r["context"] == c]
            if c in seen or {r["method"] for r in recs} != set(per_method):
                continue                                                      # taken already, or unfinished
            seen.add(c)
            records += recs
            for n, pm in per_method.items():
                mine = [r for r in recs if r["method"] == n]
                pm["correct"] += sum(r["correct"] for r in mine)
                pm["n"] += len(mine)
                pm["rows"].append(p["per_method"][n]["rows"][j])
        for n, pm in per_method.items():                                      # timings: whole shards
            pm["prepare_s"] += p["per_method"][n]["prepare_s"]
            pm["answer_s"] += p["per_method"][n]["answer_s"]
    result = dict(first)
    result["metrics"] = method_metrics(methods, per_method, first["data"]["context_length"], args["sinks"])
    result["per_method"] = per_method
    result["records"] = records
    result["complete"] = True
    result["data"] = {**first["data"], "contexts_evaluated": sorted(seen)}
    result["data"]["shard"] = "merged: " + ", ".join(p["data"]["shard"] for p in parts)
    result["command"] = " ; ".join(p["command"] for p in parts) + " ; merged by: " + " ".join(sys.argv)
    result["shard_commits"] = [p["git_commit"] for p in parts]
    write_json(out, result)


def _method_from(d: dict):
    from lmsqueeze.methods.base import method_from_dict

    return method_from_dict(d)


def plot(result: str, png: str) -> None:
    """Accuracy vs KV budget: one colour and marker per method family, its settings joined by a line."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(result).read_text())
    style = {"dense": ("s", "k"), "squeezed": ("o", "tab:red"), "quest": ("^", "tab:blue"),
             "streaming": ("v", "tab:green"), "snapkv": ("D", "tab:purple"), "random": ("x", "tab:gray")}
    fams: dict[str, list] = {}
    for name, m in d["metrics"].items():
        fam = name.split("@")[0].split("-")[0] + (":" + name.split(":")[1] if ":" in name else "")
        fams.setdefault(fam, []).append((m["nominal_budget"], m["accuracy"], name))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for fam, pts in fams.items():
        marker, color = style.get(fam.split(":")[0], ("o", None))
        if ":" in fam:                                         # a prefill-selection variant of Squeezed
            marker = {"token": "P", "token-budget": "*", "chunk": "h"}.get(fam.split(":")[1], marker)
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, lw=1, ms=7, label=fam)
        for x, y, name in pts:
            if fam != "dense":
                ax.annotate(name.split(":")[0].split("@")[-1].split("-")[-1] + "%", (x, y), fontsize=6, xytext=(4, -8),
                            textcoords="offset points", color=color)
    if "dense" in d["metrics"]:
        ax.axhline(d["metrics"]["dense"]["accuracy"], color="k", ls="--", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("KV budget: fraction of the context's K+V read per decode step (metadata counted)", fontsize=8)
    ax.set_ylabel("accuracy (string match)")
    n = d["metrics"]["dense"]["questions"] if "dense" in d["metrics"] else "?"
    ax.set_title(f"fixed-context QA, zoo:default, {d['data']['context_length']}-token contexts, {n} questions "
                 "(labels: sparsity setting)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the bundled zoo model)")
    ap.add_argument("--context-length", type=int, default=8192)
    ap.add_argument("--contexts", type=int, default=52)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--kinds", default="needles/code,needles/prose",
                    help="comma-separated kind/format pairs, cycled over the contexts (kv/code, kv/prose too)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma-separated method names (also: squeezed-h90, snapkv@90); 'all' for every one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--sinks", type=int, default=SINKS, help="Squeezed: first context tokens always read")
    ap.add_argument("--threshold", default="head", help="Squeezed: 'head' or 'layer' calibrated thresholds")
    ap.add_argument("--shard", default="0/1", help="k/n: only the contexts i with i %% n == k (merge with --merge)")
    ap.add_argument("--reverse", action="store_true", help="run this shard's contexts last to first (a helper "
                    "process can then take the tail of a running shard; --merge keeps each context once)")
    ap.add_argument("--merge", default=None, help="comma-separated shard JSONs to merge into --out (and plot)")
    ap.add_argument("--extra-tokens", type=int, default=3,
                    help="new tokens per question beyond the answer's own (the harness default is 8)")
    ap.add_argument("--text", default="heldout", choices=("heldout", "train"),
                    help="haystack text: the held-out text (reported) or the corpus train split (calibration)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model and kernels)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop after the context that passes this wall time (the JSON says complete=false)")
    ap.add_argument("--out", default="benchmarks/results/squeezed_quality.json")
    ap.add_argument("--plot-from", default=None, help="only plot this result JSON to --plot")
    ap.add_argument("--plot", default="benchmarks/plots/squeezed_quality.png")
    args = ap.parse_args()
    if args.plot_from:
        plot(args.plot_from, args.plot)
        return 0
    if args.merge:
        merge(args.merge.split(","), args.out)
        plot(args.out, args.plot)
        print(f"wrote {args.out} and {args.plot}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    shard_k, shard_n = (int(x) for x in args.shard.split("/"))

    import lmsqueeze
    from lmsqueeze.data.tasks import fixed_context_sample, haystack_lines
    from lmsqueeze.eval.results import make_result, model_info, write_json
    from lmsqueeze.eval.scoring import string_match_all
    from lmsqueeze.eval.suite import answer_budget
    from lmsqueeze.eval.texts import eval_text
    from lmsqueeze.methods.squeezed.context import capture_context

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    model, tok = lmsqueeze.load_model(args.model, device=args.device)
    if args.text == "train":
        from lmsqueeze.data.corpus import read_texts

        text = "\n\n".join(read_texts(None, split="train", max_chars=8 * args.context_length + 200_000))
        import hashlib

        data_info = {"source": "corpus:stdlib:train (calibration)", "chars": len(text),
                     "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
    else:
        text, data_info = eval_text(None, max_chars=8 * args.context_length + 200_000)
    lines = haystack_lines(text)
    kinds = [tuple(k.split("/")) for k in args.kinds.split(",")]
    samples = [fixed_context_sample(tok, lines, args.context_length, args.facts, args.questions, args.seed, i,
                                    *kinds[i % len(kinds)]) for i in range(args.contexts) if i % shard_n == shard_k]
    if args.reverse:
        samples = samples[::-1]
    methods = methods_for(args.context_length, args.sinks, args.threshold)
    if args.methods != "all":
        keep = args.methods.split(",")
        unknown = set(keep) - {m[0] for m in methods}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[m[0] for m in methods]}")
        methods = [m for m in methods if m[0] in keep]
    per_method: dict[str, dict] = {name: {"correct": 0, "n": 0, "rows": [], "prepare_s": 0.0, "answer_s": 0.0}
                                   for name, _ in methods}
    records = []
    errors: list[dict] = []
    metrics: dict = {}

    def write(complete: bool) -> None:
        metrics.clear()
        metrics.update(method_metrics(methods, per_method, args.context_length, args.sinks))
        result = make_result(
            "eval.fixed_squeezed", metrics, model=model_info(model, args.model or "zoo:default"),
            data={**data_info, "contexts": args.contexts, "shard": args.shard,
                  "questions_per_context": args.questions,
                  "context_length": args.context_length, "facts": args.facts, "kinds": kinds, "seed": args.seed},
            config={"observation": OBSERVATION, "chunk_size": args.chunk_size, "sinks": args.sinks,
                    "threshold": args.threshold, "threads": args.threads,
                    "dense_note": "dense = StreamingLLM(budget=1.0) on the captured context: every row, one softmax "
                                  "(the same function as a dense prefill; RoPE at relative positions)",
                    "budget_note": "fixed_rows_read_fraction: fixed-context rows read per attention call (prefill "
                                   "chunks and decode steps, averaged over layers) / context tokens; centroid and "
                                   "page-bound reads are in nominal_budget only"},
            device=model.device)
        result["records"] = records
        result["errors"] = errors
        result["per_method"] = {n: {k: v for k, v in pm.items()} for n, pm in per_method.items()}
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
        prepared: dict[str, object] = {}
        failed: set[str] = set()
        for name, method in methods:
            try:
                t0 = time.perf_counter()
                flat = name.startswith("squeezed-") and not name.startswith("squeezed-h")
                reuse = next((a for n, a in prepared.items() if n.startswith("squeezed-") and not
                              n.startswith("squeezed-h")), None) if flat else None   # same clusters: K-means once
                art = (method.prepare(model, ctx, captured=captured, reuse=reuse) if reuse is not None else
                       method.prepare(model, ctx, captured=captured))
                prepared[name] = art
                t1 = time.perf_counter()
                t0 -= t_cap / len(methods)                                  # its share of the shared capture
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
            except Exception:  # noqa: BLE001  (one broken method must not cost the others' results)
                errors.append({"method": name, "context": s.index, "trace": traceback.format_exc()[-1500:]})
                print(f"method {name} failed on context {s.index}; dropped from this run:\n{errors[-1]['trace']}",
                      flush=True)
                failed.add(name)
        if failed:
            methods = [m for m in methods if m[0] not in failed]
            for n in failed:
                per_method.pop(n)
            records[:] = [r for r in records if r["method"] not in failed]
        write(len({r["context"] for r in records}) == len(samples))
        line = "  ".join(f"{n}={v['correct'] / max(1, v['n']):.3f}" for n, v in per_method.items())
        print(f"context {s.index} ({s.kind}/{s.format}, {len(ctx)} tokens): {line}", flush=True)
        if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
            print(f"stopping after {time.perf_counter() - t_start:.0f} s (--max-seconds)", flush=True)
            break
    print("\nmethod            accuracy  vs dense  rows read  nominal budget")
    for name, m in metrics.items():
        delta = m["delta_vs_dense_points"]
        print(f"{name:16s}  {m['accuracy']:.3f}   {delta if delta is None else f'{delta:+6.1f}'}   "
              f"{m['fixed_rows_read_fraction']:.3f}"
              f"     {m['nominal_budget']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
