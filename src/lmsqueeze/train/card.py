"""Render the zoo's model cards (docs/zoo.md) from training results JSON files, so no figure is retyped."""

from __future__ import annotations

import json
from pathlib import Path

from lmsqueeze.train.passkey import EVAL_FORMATS

FORMAT_NOTES = {
    "code": '`NAME = "value"` in held-out code ... `assert NAME == "` (value: 8 random [a-z0-9], NAME: two words)',
    "prose": '"The pass key is 68142. Remember it." in "The grass is green. ..." filler ... '
             '"What is the pass key? The pass key is"',
    "prose_in_code": "the prose fact and question inside held-out code",
    "multikey": '4 facts "The special magic number for WORD is N." in prose filler, one asked',
    "kv": 'a `data = {"key": "value", ...}` block of 32 hex pairs (16 at 1K) in code, `assert data["key"] == "`',
}


def _fmt_list(xs, nd=3) -> str:
    return " / ".join(f"{x:.{nd}f}" for x in xs)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def model_section(res: dict, source: str) -> list[str]:
    cfg, f, tr, meta = res["model_config"], res["final"], res["train"], res["meta"]
    looped = cfg["num_loops"] > 1
    n_pass = cfg["num_loops"]
    tc = tr["train_config"]
    lines = [f"## `{res['name']}`" + (" (bundled default: `lmsqueeze.load_model()`)" if not looped else
                                        " (bundled: `lmsqueeze.models.looped.load_looped(...)`)"), ""]
    arch = ("Llama-style decoder (`LlamaForCausalLM` on disk)" if not looped else
            f"looped decoder `{cfg['num_unique_layers']}x{cfg['num_loops']}`: {cfg['num_unique_layers']} unique "
            f"blocks cycled {cfg['num_loops']} times, shared final RMSNorm + tied LM head after every pass")
    lines += [
        f"- **Architecture**: {arch}; d_model {cfg['hidden_size']}, {cfg['num_unique_layers']} "
        f"{'unique ' if looped else ''}layers, {cfg['num_heads']} query / {cfg['num_kv_heads']} KV heads "
        f"(GQA {cfg['num_heads'] // cfg['num_kv_heads']}:1), head_dim {cfg['head_dim']}, SwiGLU FFN "
        f"{cfg['intermediate_size']}, RMSNorm, RoPE theta {cfg['rope_theta']:g}, tied embeddings, vocabulary "
        f"{cfg['vocab_size']} (byte-level BPE, one token per digit), max_position_embeddings "
        f"{cfg['max_position_embeddings']}.",
        f"- **Parameters**: {res['parameters']:,}; weights {res['weights_bytes'] / 1e6:.1f} MB (bf16 safetensors).",
        f"- **Training**: {tr['tokens']:,} tokens, {tr['steps']} steps, {tr['elapsed_s']:.0f} s on one "
        f"{meta['device']} ({tr['tokens'] / tr['elapsed_s'] / 1e6:.2f} M tokens/s), {meta['date']}, commit "
        f"`{meta['git_commit'][:10]}`, torch {meta['torch']}, transformers {meta['transformers']}. AdamW "
        f"(lr {tc['lr']:g}, betas {tc['beta1']}/{tc['beta2']}, weight decay {tc['weight_decay']} on block "
        f"matrices), {tc['warmup_steps']} warm-up steps then cosine to {tc['min_lr_ratio']:g}x over the "
        f"{tc['time_budget_s']:.0f} s budget, grad clip {tc['grad_clip']}, bf16 autocast, SDPA attention, "
        f"no torch.compile. Sequences of {tc['seq_len']} tokens ({tc['batch_size']} per step); length "
        f"curriculum {tc['curriculum']} (progress fraction, length; shorter sequences in larger batches, "
        f"same tokens per step).",
    ]
    if looped:
        w = cfg.get("exit_loss_weights") or [(r + 1) ** 2 for r in range(n_pass)]
        lines.append(f"- **Early-exit loss**: sum over passes of weight x next-token cross-entropy, weights "
                     f"proportional to {w} (later passes weigh more).")
    base = (res.get("init_from") or {}).get("card")
    if base:
        bm = base["training_mix"]["retrieval"]
        lines.append(
            f"- **Stages**: the line above is the second stage, a fine-tuning run started from the first stage's "
            f"weights (`benchmarks/results/train_run2_default.json`: {base['tokens_seen']:,} tokens, "
            f"{base['steps']} steps, {base['train_time_s']:.0f} s on the same GPU, mix "
            f"{bm['fraction_of_sequences']:.0%} retrieval sequences with formats {bm['formats']}). Tokens seen in "
            f"all: {base['tokens_seen'] + tr['tokens']:,}; training time in all: "
            f"{base['train_time_s'] + tr['elapsed_s']:.0f} s.")
    c = res["corpus"]["train"]
    mix = res["mix"]
    lines += [
        f"- **Training data**: Python sources of the GPU machine (CPython {meta['python']} stdlib + "
        f"site-packages), train split by path hash ({c['listed_files']:,} files listed, {c['files']:,} read, "
        f"{c['chars'] / 1e6:.0f} M characters, {c['tokens'] / 1e6:.0f} M tokens; "
        f"{c['excluded_heldout_files']} vendored copies of held-out files excluded by path suffix). "
        f"Documents separated by `<|eos|>`, every sequence starts with `<|bos|>`.",
        f"- **Training mix**: {mix['fraction_of_sequences']:.0%} of sequences are synthetic retrieval sequences "
        f"(the rest are corpus windows): formats {mix['formats']}, fillers {mix['fillers']}, needles per "
        f"sequence {mix['needles_per_sequence']}, {mix['end_query_prob']:.0%} of questions at the very end "
        f"of the sequence, {mix['intro_prob']:.0%} with an instruction line first, "
        f"{mix.get('early_fact_prob', 0):.0%} of facts placed in the first quarter of the filler "
        f"(see `lmsqueeze/train/synthetic.py`). The templates include the wordings that `lmsqueeze.data.tasks` "
        f"uses, with random values; the held-out text (the evaluation haystack) is never trained on.",
        "",
    ]
    v, t = f["validation"], f["test_heldout"]
    lines += ["### Perplexity", "",
              f"fp32, windows of {t['window']} tokens (`<bos>` + {t['window'] - 1} tokens, consecutive, every "
              f"token scored; `lmsqueeze.train.evaluate.perplexity`). Validation: {v['tokens']:,} tokens of the "
              f"GPU machine's validation split; test: the whole held-out text (`lmsqueeze.data.heldout`, "
              f"{t['tokens']:,} tokens).", ""]
    if looped:
        rows = [[f"pass {r + 1} ({cfg['num_unique_layers'] * (r + 1)} layers)", f"{v['ppl'][r]:.3f}",
                 f"{t['ppl'][r]:.3f}", f"{v['agreement'][r]:.3f}", f"{t['agreement'][r]:.3f}"] for r in range(n_pass)]
        lines += _table(rows, ["exit", "validation ppl", "test ppl", "greedy = final (validation)",
                               "greedy = final (test)"])
        lines += ["", "Agreement: how often the argmax token after pass r equals the argmax after the last pass, "
                      "over every scored position.", ""]
    else:
        lines += _table([[f"{v['ppl'][0]:.3f}", f"{t['ppl'][0]:.3f}"]], ["validation ppl", "test ppl (held-out)"])
        lines.append("")
    lines += ["### Retrieval (`lmsqueeze.train.passkey`)", "",
              f"Exact match of the greedy answer (teacher-forced: argmax at every answer token), "
              f"{next(iter(next(iter(f['passkey'].values())).values()))['n']} cases per cell, needle depths "
              f"evenly spaced in (0, 1), prompts of exactly the given length, weights in {f['passkey_dtype']}"
              + (", last pass" if looped else "") + ".", ""]
    lengths = list(next(iter(f["passkey"].values())).keys())
    rows = [[fmt] + [f"{f['passkey'][fmt][L]['acc'][-1]:.2f}" for L in lengths] + [FORMAT_NOTES.get(fmt, "")]
            for fmt in EVAL_FORMATS if fmt in f["passkey"]]
    lines += _table(rows, ["format"] + lengths + ["prompt"])
    lines.append("")
    h = f.get("harness")
    if h and "error" not in h:
        n = next(iter(next(iter(next(iter(h.values())).values())).values()))["n"]
        lines += ["### Retrieval on the evaluation harness's prompts (`lmsqueeze.data.tasks`)", "",
                  f"The exact prompts `lmsqueeze eval` builds (haystack: the held-out text), {n} per cell "
                  f"(depths evenly spaced), scored teacher-forced as above (stricter than the harness's "
                  f"string match), measured at the end of training; for the default model the tables under \"Through "
                  f"`lmsqueeze eval`\" are the harness's own runs.", ""]
        rows = []
        for task, by_fmt in h.items():
            for fmt, by_len in by_fmt.items():
                rows.append([f"{task} / {fmt}"] + [f"{by_len[L]['acc'][-1]:.2f}" for L in by_len])
        lines += _table(rows, ["task / format"] + list(next(iter(next(iter(h.values())).values())).keys()))
        lines.append("")
    checks = []
    if "export_max_abs_logit_diff_fp32" in f:
        checks.append(f"exported HF model vs the trained module (same bf16 weights, fp32): max |logit "
                      f"difference| {f['export_max_abs_logit_diff_fp32']:.1e}; loaded with `{f['loaded_with']}`")
    if "greedy_cache_equals_full_forward" in f:
        checks.append(f"greedy decoding with the (pass, layer) KV cache equals full recomputation: "
                      f"{f['greedy_cache_equals_full_forward']}")
    lines += ["Checks: " + "; ".join(checks) + f". Source: `{source}`.", ""]
    return lines


ZOO_INTRO = """# The lmsqueeze model zoo

Small models trained by `lmsqueeze train` on an offline corpus (the Python sources of the training
machine), bundled in the package so everything works without a model hub. Every number below comes from
the JSON named under each card (H100 runs of `benchmarks/scripts/train_zoo.py`: one ~8-minute call trained
both models, then a second ~5-minute call fine-tuned `default` at full length); plots:
`benchmarks/plots/train_default.png` (stage 2), `benchmarks/plots/train_run2_default.png` (stage 1),
`benchmarks/plots/train_looped_4x3.png`.

```python
import lmsqueeze
from lmsqueeze.models.looped import load_looped, greedy_decode
model, tok = lmsqueeze.load_model()                      # src/lmsqueeze/zoo/default (LlamaForCausalLM)
looped, tok = load_looped(lmsqueeze.models.loading.ZOO_DIR / "looped-4x3")
per_pass_logits = looped(tok("def f(x):", return_tensors="pt").input_ids)   # list of 3 [B, T, V]
```

**Tokenizer** (`src/lmsqueeze/zoo/tokenizer/`, copied into each model directory): byte-level BPE with
8192 tokens trained with `tokenizers` on 60 M characters of the train split of a CPython 3.11 install
(stdlib + site-packages, files in shuffled order), digits split one per token; `<|bos|>` (0, prepended by
`tokenizer(text)`), `<|eos|>` (1, between documents), `<|pad|>` (2). Rebuild: `lmsqueeze train tokenizer
--out DIR`.

**Held-out text** (`lmsqueeze.data.heldout.load_heldout_text()`): the 35 test-split files of the CPython
3.11.7 standard library (459 K characters, 132 K tokens), frozen as `data/heldout/stdlib_test.txt.xz`
with a manifest and the PSF license, so test perplexity compares across machines and Python versions.
Training excludes it by the split hash and by path suffix (vendored copies).

**Reproduce**: `PYTHONPATH=src python3 benchmarks/scripts/train_zoo.py --out OUT` on a GPU (budgets:
`--default-budget-s 265 --looped-budget-s 185`), then the default model's second stage: `train_zoo.py --only
default --init-default <stage-1 dir> --default-budget-s 150 --mix '<the mix in train_default.json>'`;
`lmsqueeze train model|looped` runs one model.
`benchmarks/scripts/train_zoo.py --cpu-check FILE` re-measures the held-out perplexity of the bundled
models on a CPU in fp32.

"""


def _suite_cells(csv_path: Path) -> dict[tuple[str, str, int], list[float]]:
    """(task, format, length) -> string-match scores of an `lmsqueeze eval suite` predictions CSV."""
    import csv

    cells: dict[tuple[str, str, int], list[float]] = {}
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            key = (row["task"], row["format"], int(row["length"]))
            cells.setdefault(key, []).append(float(row["string_match_all"]))
    return cells


def _passkey_cells(csv_path: Path) -> dict[tuple[str, int], list[float]]:
    """(format, length) -> string-match scores of the passkey rows of a predictions CSV."""
    return {(fmt, L): v for (task, fmt, L), v in _suite_cells(csv_path).items() if task == "passkey"}


def _suite_table(results_dir: Path, name: str) -> list[str]:
    """The command line and a task/format x length table of one committed `lmsqueeze eval suite` JSON."""
    res = json.loads((results_dir / name).read_text())
    cfg = res["config"]
    cells = _suite_cells(results_dir / Path(res["predictions_csv"]).name)
    lengths = sorted({L for _, _, L in cells})
    rows = [[f"{task} / {fmt}"] + [f"{sum(cells[task, fmt, L]) / len(cells[task, fmt, L]):.2f}" for L in lengths]
            for task in cfg["tasks"] for fmt in cfg["formats"]]
    n = len(next(iter(cells.values())))
    cmd = (f"`lmsqueeze eval suite --tasks {','.join(cfg['tasks'])} --formats {','.join(cfg['formats'])} "
           f"--lengths {','.join(map(str, lengths))} --depths {','.join(map(str, cfg['depths']))} --samples "
           f"{cfg['samples']}` (`benchmarks/results/{name}`, {n} prompts per cell, {res['device']}, string match "
           f"of the greedy answer):")
    return [cmd, ""] + _table(rows, ["task / format"] + [str(L) for L in lengths]) + [""]


def harness_section(results_dir: Path) -> list[str]:
    """The default model through `lmsqueeze eval` (perplexity on GPU and CPU, passkey in two formats)."""
    load = lambda name: json.loads((results_dir / name).read_text())
    gpu, cpu = load("eval_ppl_default_dense.json"), load("eval_ppl_default_dense_cpu.json")
    g, c = gpu["metrics"]["ppl"], cpu["metrics"]["ppl"]
    lines = ["### Through `lmsqueeze eval` (the project's harness)", "",
             f"From `benchmarks/results/eval_ppl_default_dense.json` and `eval_ppl_default_dense_cpu.json`: "
             f"`lmsqueeze eval ppl --context-length {gpu['config']['context_length']}` on the held-out text gives "
             f"**{g:.3f}** on the {gpu['device']} ({gpu['metrics']['tokens']:,} tokens scored in "
             f"{gpu['metrics']['windows']} disjoint windows: the first {gpu['config']['max_tokens']:,} tokens of the "
             f"held-out text, no `<bos>` prepended, the first token of each window not scored, so it differs from "
             f"the card's own protocol above) and **{c:.3f}** on this project's CPU machine (torch "
             f"{cpu['versions']['torch']}, relative difference {abs(c - g) / g:.1e}). This is the number to "
             f"reproduce with `lmsqueeze eval ppl`.", ""]
    lines += _suite_table(results_dir, "eval_passkey_default_dense.json")
    if (results_dir / "eval_retrieval_default_dense.json").exists():
        lines += _suite_table(results_dir, "eval_retrieval_default_dense.json")
    return lines


def closing_sections(results_dir: Path) -> list[str]:
    """CPU reproduction and history / known limits, with every figure read from the results JSON files."""
    load = lambda name: json.loads((results_dir / name).read_text())
    cpu, final, looped = load("train_cpu_heldout_ppl.json"), load("train_default.json"), load("train_looped_4x3.json")
    r1d, r1l, r2d = load("train_run1_default.json"), load("train_run1_looped_4x3.json"), load("train_run2_default.json")
    d, l = cpu["default"]["ppl"][0], cpu["looped-4x3"]["ppl"]
    gd, gl = final["final"]["test_heldout"]["ppl"][0], looped["final"]["test_heldout"]["ppl"]
    pk1, pk2 = r1d["final"]["passkey"]["code"], r2d["final"]["passkey"]
    kv = [c["acc"][-1] for c in final["final"]["passkey"]["kv"].values()]
    t1, t2, t3 = (r["train"]["train_config"] for r in (r1d, r2d, final))
    lt1, lt2 = r1l["train"]["train_config"], looped["train"]["train_config"]
    old_cells = _passkey_cells(results_dir / "eval_passkey_default_run2_dense.predictions.csv")
    old_prose = sum(old_cells["prose", 8192]) / len(old_cells["prose", 8192])
    acc = lambda by_len: _fmt_list([c["acc"][-1] for c in by_len.values()], 2)
    return [
        "## Reproducibility on a CPU", "",
        f"`benchmarks/results/train_cpu_heldout_ppl.json` (torch {cpu['meta']['torch']}, transformers "
        f"{cpu['meta']['transformers']}, fp32, models loaded from the package): held-out perplexity {d:.4f} for "
        f"`default` (H100 run: {gd:.4f}, relative difference {abs(d - gd) / gd:.1e}) and "
        f"{_fmt_list(l, 4)} per pass for `looped-4x3` (H100: {_fmt_list(gl, 4)}).", "",
        "## History and known limits", "",
        f"- Run 1 (`benchmarks/results/train_run1_*.json`, commit `{r1d['meta']['git_commit'][:10]}`: budgets "
        f"{t1['time_budget_s']:.0f} s / {lt1['time_budget_s']:.0f} s, {r1d['mix']['fraction_of_sequences']:.0%} "
        f"retrieval sequences, early-exit weights 1:2:3, looped curriculum {lt1['curriculum']}) gave `default` test "
        f"perplexity {r1d['final']['test_heldout']['ppl'][0]:.3f} and code passkey {acc(pk1)} at "
        f"{', '.join(pk1)} tokens, and a looped model whose third pass was *worse* than its second (validation "
        f"{_fmt_list(r1l['final']['validation']['ppl'])}).",
        f"- Run 2 (commit `{r2d['meta']['git_commit'][:10]}`): budgets {t2['time_budget_s']:.0f} s / "
        f"{lt2['time_budget_s']:.0f} s, {r2d['mix']['fraction_of_sequences']:.0%} retrieval sequences with more "
        f"code needles, weights 1:4:9, looped curriculum {lt2['curriculum']}. The bundled `looped-4x3` is run 2's; "
        f"run 2's `default` (`train_run2_default.json`: test perplexity {r2d['final']['test_heldout']['ppl'][0]:.3f}, "
        f"prose passkey {acc(pk2['prose'])}, code {acc(pk2['code'])}) reached only {old_prose:.2f} on the harness's "
        f"prose passkey at 8K ({len(old_cells['prose', 8192])} prompts, `eval_passkey_default_run2_dense.json`; the "
        f"misses were mostly at depth 0.1, ~7K tokens from the question).",
        f"- Stage 2 (commit `{final['meta']['git_commit'][:10]}`): {t3['time_budget_s']:.0f} s more at "
        f"{t3['seq_len']} tokens only, peak lr {t3['lr']:g}, {final['mix']['fraction_of_sequences']:.0%} retrieval "
        f"sequences, more prose needles in code filler and {final['mix'].get('early_fact_prob', 0):.0%} of facts in "
        f"the first quarter (far from their questions). This is the bundled `default`; it also lowered the test "
        f"perplexity.",
        f"- Key-value retrieval is not learned (own kv check {min(kv):.2f}-{max(kv):.2f}, harness kv_retrieval "
        "as tabled) and the harness's multi-key needles are weak: the model does not match long random keys.",
        "- The looped model saw fewer tokens (its block runs 3 times per token) and retrieves worse at 8K.",
        "- Validation perplexity is on the GPU machine's own validation split (Python 3.12 stdlib + packages) and "
        "does not compare across machines; the test (held-out) perplexity does.", "",
    ]


def write_zoo_md(results_dir: str | Path, out: str | Path) -> Path:
    """docs/zoo.md from benchmarks/results/train_*.json."""
    results_dir = Path(results_dir)
    default, looped = (json.loads((results_dir / n).read_text()) for n in ("train_default.json",
                                                                         "train_looped_4x3.json"))
    lines = list(ZOO_INTRO.splitlines()) + model_section(default, str(results_dir / "train_default.json"))
    lines += harness_section(results_dir) + model_section(looped, str(results_dir / "train_looped_4x3.json"))
    text = "\n".join(lines) + "\n"
    text = text.replace(str(results_dir) + "/", "benchmarks/results/")
    out = Path(out)
    out.write_text(text + "\n".join(closing_sections(results_dir)))
    return out
