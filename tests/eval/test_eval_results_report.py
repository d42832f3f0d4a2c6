import csv
import json

import pytest

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.report import load_results, make_report, markdown_report, method_label
from lmsqueeze.eval.results import make_result, method_info, model_info, save_result
from lmsqueeze.models.tiny import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def eval_result(kind, method, metrics, path="/models/zoo-small"):
    return {"kind": kind, "version": 1, "command": "lmsqueeze eval ...", "git_commit": "abc123def4567",
            "date": "2026-11-24T08:00:00+00:00", "device": "cpu", "versions": {"torch": "2.13"},
            "model": {"path": path, "fingerprint": {"weights_sha256": "0123456789abcdef"}},
            "data": {"source": "heldout"}, "method": method, "config": {}, "metrics": metrics}


def write_fixtures(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval_ppl_dense.json").write_text(json.dumps(eval_result("eval.ppl", {"name": "dense"},
                                                                  {"ppl": 5.0, "nll": 1.609, "tokens": 4096})))
    for bits, ppl in [(2, 7.5), (3, 5.6), (4, 5.1)]:
        (d / f"eval_ppl_kvq{bits}.json").write_text(json.dumps(eval_result(
            "eval.ppl", {"name": "kvquant", "bits": bits, "outliers": 0.01}, {"ppl": ppl, "nll": 2.0, "tokens": 4096})))
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "eval_suite.json").write_text(json.dumps(eval_result(
        "eval.suite", {"name": "squeezed", "budget": 0.1},
        {"accuracy": {"passkey": 1.0, "vt": 0.5}, "mean_accuracy": 0.75, "samples": 8})))
    (d / "bench_decode.json").write_text(json.dumps({
        "schema": "lmsqueeze.bench/1", "kind": "decode_step", "commit": "fedcba987", "date": "2026-11-24",
        "device": {"name": "NVIDIA H100 80GB HBM3"},
        "rows": [{"method": m, "batch": 1, "length": n, "ms": t, "baseline": "sdpa", "baseline_ms": 2 * t}
                 for m, f in [("kvquant", 1.0), ("dense", 2.0)] for n, t in [(8192, f), (32768, 4 * f)]]}))
    (d / "broken.json").write_text("{not json")
    return d


def test_make_report_writes_tables_and_pngs(tmp_path):
    src = write_fixtures(tmp_path / "results")
    md, pngs = make_report(src, tmp_path / "out")
    text = md.read_text()
    assert "## perplexity (`eval.ppl`)" in text and "## suite accuracy (`eval.suite`)" in text
    assert "| kvquant(bits=3, outliers=0.01) | zoo-small [01234567] | heldout | 5.6 |" in text
    assert "| passkey | vt | mean |" in text.replace("| method | model | data ", "")
    assert "## latency: `bench_decode.json`" in text and "| kvquant | 32768 | 4 | 8 |" in text
    names = sorted(p.name for p in pngs)
    assert names == ["latency_bench_decode.png", "quality_ppl_vs_bits.png", "quality_suite_vs_budget.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
        assert f"![{p.stem}]({p.name})" in text


def test_load_results_skips_broken_files(tmp_path):
    results = load_results(write_fixtures(tmp_path))
    assert sorted(r["_file"] for r in results) == ["bench_decode.json", "eval_ppl_dense.json", "eval_ppl_kvq2.json",
                                                    "eval_ppl_kvq3.json", "eval_ppl_kvq4.json", "sub/eval_suite.json"]
    assert "No eval or benchmark results" in markdown_report([])


def test_report_needs_results(tmp_path):
    with pytest.raises(LmsqueezeError):
        make_report(tmp_path)
    with pytest.raises(LmsqueezeError):
        make_report(tmp_path / "missing")


def test_method_label():
    assert method_label({"name": "dense"}) == "dense"
    assert method_label({"name": "kvquant", "bits": 3, "artifact": "/x", "per_channel": [1]}) == "kvquant(bits=3)"


def test_save_result_json_and_csv(tmp_path):
    model = tiny_model("llama")
    result = make_result("eval.suite", {"mean_accuracy": 0.5}, model=model_info(model, "/m"),
                         method=method_info(None), data={"source": "heldout"}, config={"seed": 0}, device="cpu")
    records = [{"task": "passkey", "answers": ["1", "2"], "prediction": 'a, "b"\nc', "score": 1.0},
               {"task": "vt", "answers": ["X"], "prediction": "", "score": 0.0, "extra": 3}]
    path = save_result(tmp_path / "out" / "eval_suite.json", result, records)
    saved = json.loads(path.read_text())
    for key in ("kind", "command", "git_commit", "date", "device", "versions", "model", "data", "method",
                "config", "metrics"):
        assert key in saved
    assert saved["method"] == {"name": "dense"} and saved["model"]["fingerprint"]["num_layers"] == 2
    assert saved["versions"]["torch"] and saved["predictions_csv"] == "eval_suite.predictions.csv"
    with open(tmp_path / "out" / "eval_suite.predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["prediction"] == 'a, "b"\nc' and json.loads(rows[0]["answers"]) == ["1", "2"]
    assert rows[1]["extra"] == "3" and rows[0]["extra"] == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval_suite.json", "eval_suite.predictions.csv"]
