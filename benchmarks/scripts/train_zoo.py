"""Train the zoo in one GPU call: the default Llama and the looped 4x3 decoder, evaluate both, pack results.

GPU (one device call, tokenizer carried from src/lmsqueeze/zoo/tokenizer/):
    PYTHONPATH=src RAYON_NUM_THREADS=14 python3 benchmarks/scripts/train_zoo.py --out $OUT
CPU smoke run of the same path with tiny sizes:
    python benchmarks/scripts/train_zoo.py --smoke --out /tmp/zoo_smoke
Unpack what comes back, and plot the loss curves:
    python benchmarks/scripts/train_zoo.py --unpack <files_at> --dest /tmp/zoo_back
    python benchmarks/scripts/train_zoo.py --plot benchmarks/results/train_*.json --dest benchmarks/plots
    python benchmarks/scripts/train_zoo.py --card docs/zoo.md

Outputs under --out (at most 8 files, each < 16 MiB): zoo.tar.partNN (the model directories, results
and log, split in 15 MiB parts), train_default.json, train_looped_4x3.json, run.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

PART_BYTES = 15 * 2**20
RESULT_NAMES = {"default": "train_default.json", "looped-4x3": "train_looped_4x3.json"}


def pack(staging: Path, out: Path) -> list[Path]:
    """Tar `staging` and split it into parts under 15 MiB in `out`."""
    tar_path = staging.parent / (staging.name + ".tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(staging, arcname="zoo_run")
    data = tar_path.read_bytes()
    tar_path.unlink()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        p = out / f"zoo.tar.part{i // PART_BYTES:02d}"
        p.write_bytes(data[i:i + PART_BYTES])
        parts.append(p)
    return parts


def unpack(src: Path, dest: Path) -> None:
    parts = sorted(src.glob("zoo.tar.part*"))
    tar_path = dest / "zoo.tar"
    dest.mkdir(parents=True, exist_ok=True)
    with tar_path.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    print(f"unpacked {len(parts)} parts into {dest / 'zoo_run'}")


def summary_table(results: dict) -> str:
    lines = []
    for name, res in results.items():
        if "error" in res:
            lines.append(f"{name}: ERROR {res['error']}")
            continue
        f = res["final"]
        lines.append(f"{name}: params {res['parameters']:,}  tokens {res['train']['tokens']:,}  "
                     f"steps {res['train']['steps']}  train {res['train']['elapsed_s']:.0f}s  "
                     f"val ppl {[round(x, 3) for x in f['validation']['ppl']]}  "
                     f"test ppl {[round(x, 3) for x in f['test_heldout']['ppl']]}")
        if "export_max_abs_logit_diff_fp32" in f:
            lines.append(f"  export max |dlogit| {f['export_max_abs_logit_diff_fp32']:.2e}  bos {f['tokenizer_adds_bos']}")
        if "greedy_cache_equals_full_forward" in f:
            lines.append(f"  greedy cache == full: {f['greedy_cache_equals_full_forward']}  "
                         f"agreement {[round(x, 3) for x in f['validation']['agreement']]}")
        for fmt, by_len in f["passkey"].items():
            lines.append(f"  passkey {fmt:14s} " + "  ".join(f"{L}:{v['acc'][-1]:.2f}" for L, v in by_len.items()))
        harness = f.get("harness") or {}
        if "error" in harness:
            lines.append(f"  harness ERROR {harness['error']}")
        for task, by_fmt in (harness if "error" not in harness else {}).items():
            for fmt, by_len in by_fmt.items():
                lines.append(f"  harness {task}/{fmt:6s} " + "  ".join(f"{L}:{v['acc'][-1]:.2f}" for L, v in by_len.items()))
    return "\n".join(lines)


def cpu_check(path: Path) -> int:
    """Held-out perplexity of the bundled models, loaded as users load them, on the CPU in fp32."""
    import numpy as np
    import torch

    from lmsqueeze.data.heldout import load_heldout_text
    from lmsqueeze.models.loading import load_model
    from lmsqueeze.models.looped import load_looped
    from lmsqueeze.train.evaluate import hf_logits_fn, looped_logits_fn, perplexity
    from lmsqueeze.train.recipe import run_meta

    model, tok = load_model()
    ids = np.asarray(tok(load_heldout_text(), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        default = perplexity(hf_logits_fn(model), ids, 8192, tok.bos_token_id, batch_size=1)
        looped, _ = load_looped(Path(__file__).resolve().parents[2] / "src/lmsqueeze/zoo/looped-4x3")
        loop = perplexity(looped_logits_fn(looped), ids, 8192, tok.bos_token_id, batch_size=1)
    out = {"meta": run_meta("python " + " ".join(sys.argv)), "dtype": "float32", "text": "held-out",
           "default": default, "looped-4x3": loop}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"default test ppl {default['ppl']}, looped-4x3 {loop['ppl']} -> {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    ap.add_argument("--tokenizer", type=Path, default=Path("src/lmsqueeze/zoo/tokenizer"))
    ap.add_argument("--deadline-s", type=float, default=520.0, help="whole script, from its start")
    ap.add_argument("--default-budget-s", type=float, default=265.0)
    ap.add_argument("--looped-budget-s", type=float, default=185.0)
    ap.add_argument("--looped-eval-reserve-s", type=float, default=45.0)
    ap.add_argument("--max-chars", type=int, default=400_000_000)
    ap.add_argument("--only", choices=["default", "looped-4x3"], help="train one model only")
    ap.add_argument("--init-default", type=Path, help="continue training the default model from this exported "
                    "directory (a fine-tuning stage, preset gpu-finetune) instead of fresh weights")
    ap.add_argument("--mix", type=str, default=None, help="RetrievalMix fields as JSON, e.g. "
                    "'{\"fraction\": 0.6, \"early_fact_prob\": 0.3}'")
    ap.add_argument("--plot", type=Path, nargs="*", help="results JSON files to plot into --dest")
    ap.add_argument("--cpu-check", type=Path, help="write the bundled models' held-out perplexity on this "
                    "machine's CPU (fp32) to this JSON")
    ap.add_argument("--card", type=Path, help="render docs/zoo.md (this path) from benchmarks/results/train_*.json")
    ap.add_argument("--unpack", type=Path)
    ap.add_argument("--dest", type=Path)
    args = ap.parse_args()
    if args.plot:
        from lmsqueeze.train.plots import plot_training

        for f in args.plot:
            print(plot_training(f, args.dest / (f.stem + ".png")))
        return 0
    if args.card:
        from lmsqueeze.train.card import write_zoo_md

        print(write_zoo_md(Path("benchmarks/results"), args.card))
        return 0
    if args.cpu_check:
        return cpu_check(args.cpu_check)
    if args.unpack:
        unpack(args.unpack, args.dest)
        return 0
    t_start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="zoo_staging_"))
    (staging / "results").mkdir(parents=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(staging / "run.log")])
    log = logging.getLogger("train_zoo")

    import torch

    from lmsqueeze.train.corpus_stream import CorpusSpec
    from lmsqueeze.train.presets import model_preset, train_preset
    from lmsqueeze.train.recipe import EvalConfig, prepare_data, train_and_evaluate
    from lmsqueeze.train.synthetic import RetrievalMix

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.smoke:
        corpus = CorpusSpec(include_packages=False, max_chars=3_000_000)
        models = [("default", "tiny"), ("looped-4x3", "tiny-looped")]
        tcfg = {"default": train_preset("smoke"), "looped-4x3": train_preset("smoke")}
        ecfg = EvalConfig(ppl_window=512, lengths=(512, 1024), passkey_n=4, batch_size=4, val_max_tokens=4096, test_max_tokens=4096,
                          periodic_windows=1, periodic_passkey_n=2)
        val_chars, min_stream = 300_000, 20_000
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        corpus = CorpusSpec(include_packages=True, max_chars=args.max_chars)
        models = [("default", "default"), ("looped-4x3", "looped-4x3")]
        tcfg = {"default": train_preset("gpu-finetune" if args.init_default else "gpu",
                                        time_budget_s=args.default_budget_s),
                "looped-4x3": train_preset("gpu-looped", time_budget_s=args.looped_budget_s)}
        ecfg = EvalConfig()
        val_chars, min_stream = 4_000_000, 5_000_000
    mix = RetrievalMix(**json.loads(args.mix)) if args.mix else RetrievalMix()
    if args.only:
        models = [m for m in models if m[0] == args.only]
    data = prepare_data(args.tokenizer, corpus, val_max_chars=val_chars, harness_lengths=ecfg.lengths,
                        harness_n=2 if args.smoke else 10)
    log.info("data ready to start after %.1fs: val %d tokens, test %d tokens",
             time.perf_counter() - t_start, len(data.val_tokens), len(data.test_tokens))
    vocab = data.encoder.get_vocab_size()
    results: dict = {}
    for name, preset in models:
        cfg = tcfg[name]
        if name == "looped-4x3" and not args.smoke:
            left = args.deadline_s - (time.perf_counter() - t_start) - args.looped_eval_reserve_s
            cfg.time_budget_s = max(20.0, min(cfg.time_budget_s, left))
        log.info("training %s (%s) budget %s s", name, preset, cfg.time_budget_s)
        try:
            res = train_and_evaluate(name, model_preset(preset, vocab), cfg, data, mix,
                                     run_dir=staging / "runs" / name, out_dir=staging / "zoo" / name,
                                     ecfg=ecfg, command=command, min_stream_tokens=min_stream,
                                     init_from=args.init_default if name == "default" else None)
        except Exception as e:  # keep going: the other model and the packing still run
            log.error("%s failed:\n%s", name, traceback.format_exc())
            res = {"error": f"{type(e).__name__}: {e}"}
        results[name] = res
        (staging / "results" / RESULT_NAMES[name]).write_text(json.dumps(res, indent=1) + "\n")
        shutil.copy(staging / "results" / RESULT_NAMES[name], out / RESULT_NAMES[name])
        shutil.rmtree(staging / "runs" / name, ignore_errors=True)  # checkpoints stay on the machine
    log.info("corpus stream: %s", data.train.stats)
    log.info("total %.1fs", time.perf_counter() - t_start)
    logging.shutdown()
    shutil.copy(staging / "run.log", out / "run.log")
    parts = pack(staging, out)
    print(f"packed {len(parts)} parts: {[p.name for p in parts]}")
    shutil.rmtree(staging, ignore_errors=True)
    print(summary_table(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
