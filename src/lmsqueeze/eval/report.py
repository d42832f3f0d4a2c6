"""`lmsqueeze report DIR`: result JSON files -> a markdown table per kind and PNG plots.

Plots: quality (perplexity, accuracy, LongBench average) against KV bits or budget, for eval results whose
method config carries such a field (Dense and other methods without it are drawn as horizontal lines);
latency against context length, for benchmark JSON whose rows carry a context length and times in ms.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

HEADLINE = {"eval.ppl": ("ppl", "perplexity"), "eval.suite": ("mean_accuracy", "suite accuracy"),
            "eval.fixed": ("accuracy", "fixed-context accuracy"), "eval.longbench": ("average", "LongBench average")}
X_FIELDS = {"bits": "KV bits", "kv_bits": "KV bits", "nbits": "KV bits", "budget": "budget",
            "token_budget": "token budget", "budget_fraction": "budget fraction", "keep_fraction": "budget fraction",
            "sparsity": "sparsity"}
CONTEXT_KEYS = ("context_length", "context", "context_len", "seq_len", "seqlen", "kv_length", "length", "tokens")
ROW_LISTS = ("rows", "results", "measurements")
LABEL_KEYS = ("method", "impl", "name", "variant", "backend", "baseline", "batch", "chunk", "stage", "dtype")


def load_results(directory: str | Path) -> list[dict[str, Any]]:
    """Every JSON object under `directory` (recursively), each with its path under '_file'."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LmsqueezeError(f"{directory} is not a directory; pass the folder holding result JSON files")
    out = []
    for f in sorted(directory.rglob("*.json")):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", f, e)
            continue
        if isinstance(obj, dict):
            obj["_file"] = str(f.relative_to(directory))
            out.append(obj)
    return out


def method_label(method: dict) -> str:
    """'kvquant(bits=3, outliers=0.01)' from a method dict (scalar fields only)."""
    name = method.get("name", "?")
    args = [f"{k}={v}" for k, v in method.items()
            if k not in ("name", "artifact") and isinstance(v, (int, float, str, bool)) and v is not None]
    return f"{name}({', '.join(args)})" if args else name


def _model_label(result: dict) -> str:
    model = result.get("model") or {}
    name = Path(model["path"]).name if model.get("path") else "default"
    sha = (model.get("fingerprint") or {}).get("weights_sha256")
    return f"{name} [{sha[:8]}]" if sha else name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_columns(kind: str, results: list[dict]) -> list[tuple[str, str]]:
    """(column title, dotted path into metrics) for one kind of eval result."""
    if kind == "eval.ppl":
        return [("ppl", "ppl"), ("nll", "nll"), ("tokens", "tokens")]
    if kind == "eval.suite":
        tasks = sorted({t for r in results for t in (r["metrics"].get("accuracy") or {})})
        return [(t, f"accuracy.{t}") for t in tasks] + [("mean", "mean_accuracy"), ("samples", "samples")]
    if kind == "eval.fixed":
        return [("accuracy", "accuracy"), ("exact", "exact_match"), ("questions", "questions"),
                ("s/question", "seconds_per_question")]
    if kind == "eval.longbench":
        sets = sorted({d for r in results for d in (r["metrics"].get("scores") or {})})
        return [(d, f"scores.{d}") for d in sets] + [("average", "average")]
    keys = sorted({k for r in results for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))})
    return [(k, k) for k in keys]


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _bench_rows(result: dict) -> tuple[list[dict], str | None]:
    """(rows, context key) of a benchmark result, or ([], None) when it has no latency-vs-context rows."""
    for key in ROW_LISTS:
        rows = result.get(key)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            for ck in CONTEXT_KEYS:
                if all(isinstance(r.get(ck), (int, float)) for r in rows) and _time_keys(rows):
                    return rows, ck
    return [], None


def _time_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (k == "ms" or k.endswith("_ms"))}
    return sorted(keys, key=lambda k: (k != "ms", k))


def _row_label(row: dict, varying: list[str]) -> str:
    """The row's values of the label keys that vary across its file (method names bare, others k=v)."""
    parts = [str(row[k]) if k in ("method", "impl", "name") else f"{k}={row[k]}" for k in varying if k in row]
    return ", ".join(parts)


def _varying(rows: list[dict]) -> list[str]:
    keys = [k for k in LABEL_KEYS if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]
    if not any(k in ("method", "impl", "name") for k in keys):  # name the series even when only one
        keys = [k for k in ("method", "impl", "name") if any(k in r for r in rows)][:1] + keys
    return keys


def _device(result: dict) -> str:
    dev = result.get("device", "?")
    return str(dev.get("name", "?")) if isinstance(dev, dict) else str(dev)


def _commit(result: dict) -> str:
    return str(result.get("git_commit") or result.get("commit") or "")[:10]


def markdown_report(results: list[dict]) -> str:
    """One section per kind of result: eval kinds get metric tables, benchmarks their latency rows."""
    parts = ["# lmsqueeze results", ""]
    kinds = sorted({r.get("kind", "") for r in results if str(r.get("kind", "")).startswith("eval.")})
    for kind in kinds:
        group = [r for r in results if r.get("kind") == kind and isinstance(r.get("metrics"), dict)]
        cols = _metric_columns(kind, group)
        header = ["method", "model", "data"] + [c for c, _ in cols] + ["commit", "date", "file"]
        rows = []
        for r in sorted(group, key=lambda r: (method_label(r.get("method") or {}), r["_file"])):
            data = r.get("data") or {}
            rows.append([method_label(r.get("method") or {}), _model_label(r), data.get("source", "")]
                        + [_get(r["metrics"], p) for _, p in cols]
                        + [_commit(r), r.get("date", ""), r["_file"]])
        parts += [f"## {HEADLINE.get(kind, (None, kind))[1]} (`{kind}`)", "", _table(header, rows), ""]
    for r in results:
        rows, ck = _bench_rows(r)
        if not rows:
            continue
        tkeys, varying = _time_keys(rows), _varying(rows)
        header = ["series", ck] + tkeys
        table = [[_row_label(row, varying), row[ck]] + [row.get(k) for k in tkeys] for row in rows]
        parts += [f"## latency: `{r['_file']}`", "", (f"device: {_device(r)}, commit: {_commit(r)}, "
                  f"date: {r.get('date', '')}"), "", _table(header, table), ""]
    if len(parts) == 2:
        parts.append("No eval or benchmark results found.")
    return "\n".join(parts) + "\n"


def _new_figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    return fig, fig.add_subplot(1, 1, 1)


def plot_quality(results: list[dict], out_dir: Path) -> list[Path]:
    """quality_<kind>_vs_<field>.png for each eval kind with results whose method has a bits/budget field."""
    paths = []
    for kind, (metric, title) in HEADLINE.items():
        group = [r for r in results if r.get("kind") == kind and _get(r.get("metrics") or {}, metric) is not None]
        for field, xlabel in X_FIELDS.items():
            with_x = [r for r in group if isinstance((r.get("method") or {}).get(field), (int, float))]
            if not with_x:
                continue
            fig, ax = _new_figure()
            series: dict[str, list[tuple[float, float]]] = {}
            for r in with_x:
                label = f"{r['method'].get('name', '?')} · {_model_label(r)}"
                series.setdefault(label, []).append((float(r["method"][field]), float(_get(r["metrics"], metric))))
            for label, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            marked = {id(r) for r in with_x}
            for r in group:
                if id(r) in marked:
                    continue
                ax.axhline(float(_get(r["metrics"], metric)), linestyle="--", linewidth=1,
                           label=f"{method_label(r.get('method') or {})} · {_model_label(r)}", color="gray")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(title)
            ax.set_title(f"{title} vs {xlabel}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = out_dir / f"quality_{kind.split('.', 1)[1]}_vs_{field}.png"
            fig.savefig(path)
            paths.append(path)
    return paths


def plot_latency(results: list[dict], out_dir: Path) -> list[Path]:
    """latency_<file stem>.png for each benchmark result with rows of context length and *_ms times."""
    paths = []
    for r in results:
        rows, ck = _bench_rows(r)
        if not rows:
            continue
        fig, ax = _new_figure()
        varying = _varying(rows)
        for tk in _time_keys(rows):
            by_label: dict[str, list[tuple[float, float]]] = {}
            for row in rows:
                if isinstance(row.get(tk), (int, float)):
                    by_label.setdefault(_row_label(row, varying), []).append((float(row[ck]), float(row[tk])))
            for label, pts in sorted(by_label.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{label} {tk}".strip())
        xs = [float(row[ck]) for row in rows]
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ys = [float(row[k]) for row in rows for k in _time_keys(rows) if isinstance(row.get(k), (int, float))]
        if ys and min(ys) > 0 and max(ys) / min(ys) >= 20:
            ax.set_yscale("log")
        ax.set_xlabel(ck)
        ax.set_ylabel("time (ms)")
        ax.set_title(f"latency vs {ck} · {_device(r)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        stem = Path(r["_file"]).with_suffix("").as_posix().replace("/", "_")
        path = out_dir / f"latency_{stem}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def make_report(directory: str | Path, out_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write report.md and the PNG plots for the results under `directory` into `out_dir` (default: it)."""
    results = load_results(directory)
    if not results:
        raise LmsqueezeError(f"no result JSON files under {directory}; run `lmsqueeze eval ... --out FILE` first")
    out = Path(out_dir) if out_dir is not None else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    from lmsqueeze.eval.results import atomic_write

    md_path = out / "report.md"
    pngs = plot_quality(results, out) + plot_latency(results, out)
    text = markdown_report(results)
    if pngs:
        text += "\n## plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    atomic_write(md_path, text)
    log.info("wrote %s and %d plots", md_path, len(pngs))
    return md_path, pngs


def report(directory: str | Path, out_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """What `lmsqueeze report DIR --out OUT` calls (same as `make_report`): returns (report.md, PNG paths)."""
    return make_report(directory, out_dir)
