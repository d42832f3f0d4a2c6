"""Regenerate the README's results section from the JSON files in benchmarks/results/.

Each table names its source file; nothing is typed in by hand. Run: python benchmarks/scripts/update_readme.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def newest(*names: str) -> str:
    """The first of `names` (newest first) that exists under benchmarks/results."""
    return next((n for n in names if (RESULTS / n).exists()), names[-1])


def device_line(d: dict, name: str) -> str:
    dev = d.get("device")
    dev = dev.get("name") if isinstance(dev, dict) else dev
    commit = d.get("code_commit") or d.get("commit") or d.get("git_commit") or "?"  # code_commit: a corrected record
    return f"_Source: `benchmarks/results/{name}` ({dev}, commit {str(commit)[:7]})._"


def e2e_table(name: str) -> list[str]:
    d = load(name)
    if d is None:
        return []
    out = ["| batch | context | method | step ms | bytes floor ms | x floor | tokens/s | vs eager DynamicCache |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['batch']} | {r['length'] // 1024}K | {r['method']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | "
                   f"{r['x_floor']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    return out + ["", device_line(d, name), ""]


def kernel_table(name: str) -> list[str]:
    d = load(name)
    if d is None:
        return []
    out = ["| batch | context | implementation | µs | TB/s | vs SDPA |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if r["impl"] == "ours_smax_2x":
            continue
        vs = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "1.00x"
        out.append(f"| {r['batch']} | {r['length'] // 1024}K | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['tbps']:.2f} | {vs} |")
    return out + ["", device_line(d, name), ""]


def rows_table(name: str, title: str, columns: list[tuple[str, str, str]], keep=lambda r: True) -> list[str]:
    """A table of selected rows of a result file: columns are (header, row key, format)."""
    d = load(name)
    if d is None:
        return []
    out = [f"### {title}", "", "| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in d["rows"]:
        if keep(r):
            cells = [format(r[k], f) if r.get(k) is not None else "-" for _, k, f in columns]
            out.append("| " + " | ".join(cells) + " |")
    return out + ["", device_line(d, name), ""]


def generic_sections() -> list[str]:
    """Method result files that carry a `readme` block: {title, columns, rows} written by their scripts."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        d = json.loads(path.read_text())
        block = d.get("readme") if isinstance(d, dict) else None
        if not block:
            continue
        out += [f"### {block['title']}", "", "| " + " | ".join(block["columns"]) + " |",
                "|" + "---|" * len(block["columns"])]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in block["rows"]]
        out += ["", device_line(d, path.name), ""]
    return out


def render() -> str:
    lines = ["### End-to-end decode step (Llama-3-8B shape, random weights, bf16, H100)", "",
             "One decode step of the whole model over an N-token cache; every row timed in the same run "
             "(CUDA events, median of 30 after warm-up; `graph` rows replay a CUDA graph). The bytes floor is "
             "(weights + KV read) / 3.0 TB/s.", ""]
    lines += e2e_table("bench_e2e_llama3-8b_b1_h100.json")
    lines += e2e_table("bench_e2e_llama3-8b_8k_b1_h100.json")
    lines += e2e_table("bench_e2e_llama3-8b_b8_h100.json")
    lines += ["### Decode attention kernel (32 query / 8 KV heads, D=128, bf16)", ""]
    lines += kernel_table("decode_kernel_h100.json")
    lines += rows_table(
        "kvquant_decode_h100_v7d.json", "KVQuant decode attention vs fp16 SDPA (32/8 heads, D=128, H100)",
        [("batch", "batch", "d"), ("context", "length", "d"), ("method", "method", ""), ("ms", "ms", ".4f"),
         ("SDPA ms", "baseline_ms", ".4f"), ("speedup", "speedup", ".2f"), ("TB/s", "tb_per_s", ".2f"),
         ("bits/elt read", "bits_per_element_read", ".3f")])
    lines += rows_table(
        "kvquant_quality_zoo_v3.json", "KVQuant quality on the zoo model (held-out perplexity, 8K windows, H100 bf16)",
        [("method", "method", ""), ("ppl", "ppl", ".4f"), ("vs dense %", "ppl_delta_pct", "+.2f"),
         ("bits/elt", "bits_per_element", ".3f")],
        keep=lambda r: "[" not in r["method"])
    lines += ["![KVQuant perplexity vs bits](benchmarks/plots/kvquant_quality_zoo_v3.png)", ""]
    lines += rows_table(
        newest("chess_gpu_h100_v10.json", "chess_gpu_h100_v5.json", "chess_gpu_h100_v4.json", "chess_gpu_h100_v3.json"), "CHESS sparse GEMV and decode step vs dense (H100)",
        [("kernel", "kernel", ""), ("batch", "batch", "d"), ("sparsity", "sparsity", ".2f"), ("method", "method", ""),
         ("ms", "ms", ".4f"), ("dense ms", "baseline_ms", ".4f"), ("speedup", "speedup", ".2f")],
        keep=lambda r: r.get("batch") == 1)
    lines += rows_table(
        "squeezed_decode_h100_v10.json", "Squeezed Attention decode vs dense SDPA (32/8 heads, D=128, H100)",
        [("context", "context", "d"), ("batch", "batch", "d"), ("method", "method", ""), ("ms", "ms", ".4f"),
         ("baseline ms", "baseline_ms", ".4f"), ("speedup", "speedup", ".2f")],
        keep=lambda r: "ms" in r and not r["method"].startswith("prefill"))
    lines += rows_table(
        "squeezed_prefill_h100_v14.json",
        "Squeezed Attention prefill: 1K user tokens vs a 128K fixed context, 90% sparsity (H100; `_graph` rows and "
        "their baseline are CUDA graphs)",
        [("method", "method", ""), ("ms", "ms", ".3f"), ("dense ms", "baseline_ms", ".3f"), ("speedup", "speedup", ".2f"),
         ("keys read", "kept_fraction", ".3f")],
        keep=lambda r: r["method"].startswith("prefill"))
    lines += rows_table(
        "a2ats_serving_h100_v3c.json", "A²ATS serving vs dense on the GPU (Llama-3-8B shape, ratio 3%, H100)",
        [("context", "length", "d"), ("method", "method", ""), ("batch", "batch", "d"), ("ms / step", "ms", ".2f"),
         ("tokens/s", "tokens_per_s", ".1f"), ("vs dense", "speedup", ".2f")],
        keep=lambda r: r.get("part") == "serving")
    lines += ["### Quality plots", "",
              "![A²ATS recall vs budget](benchmarks/plots/a2ats_recall.png) "
              "![Squeezed Attention accuracy vs budget](benchmarks/plots/squeezed_quality_8k_v4.png) "
              "![CHESS perplexity vs sparsity](benchmarks/plots/chess_quality_zoo.png)", ""]
    lines += generic_sections()
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{render()}{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.replace("_No GPU results committed yet._", block)
    readme.write_text(text)


if __name__ == "__main__":
    main()
