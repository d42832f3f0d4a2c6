import csv
import json

import pytest
from typer.testing import CliRunner

from lmsqueeze.data.tasks import TASKS
from lmsqueeze.eval.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def suite_run(model_dir, out, seed):
    r = invoke("suite", "--model", model_dir, "--tasks", ",".join(TASKS), "--lengths", "600", "--samples", 1,
               "--formats", "prose,code", "--seed", seed, "--max-new-tokens", 3, "--chunk-size", 256,
               "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    with open(out.with_name(out.stem + ".predictions.csv"), newline="") as f:
        return json.loads(out.read_text()), list(csv.DictReader(f))


def test_suite_writes_json_with_every_task_and_is_seeded(model_dir, tmp_path):
    result, rows = suite_run(model_dir, tmp_path / "a" / "eval_suite.json", seed=3)
    assert result["kind"] == "eval.suite" and set(result["metrics"]["accuracy"]) == set(TASKS)
    assert result["model"]["path"] == str(model_dir) and result["method"] == {"name": "dense"}
    assert result["config"]["tasks"] == list(TASKS) and result["config"]["seed"] == 3
    assert {"git_commit", "date", "device", "versions", "command"} <= set(result)
    assert sorted({r["task"] for r in rows}) == sorted(TASKS) and len(rows) == 2 * len(TASKS)
    _again, rows_again = suite_run(model_dir, tmp_path / "b" / "eval_suite.json", seed=3)
    assert [r["prompt_sha256"] for r in rows] == [r["prompt_sha256"] for r in rows_again]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in rows_again]


def test_ppl_fixed_longbench_and_report(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 200)
    out = tmp_path / "results"
    r = invoke("ppl", "--model", model_dir, "--data", text, "--context-length", 64, "--stride", 32,
               "--max-tokens", 300, "--chunk-size", 16, "--out", out / "eval_ppl.json", "--quiet")
    assert r.exit_code == 0, r.output
    ppl = json.loads((out / "eval_ppl.json").read_text())
    assert ppl["metrics"]["tokens"] == 299 and ppl["metrics"]["ppl"] > 1 and ppl["data"]["source"] == str(text)
    assert ppl["config"] == {"context_length": 64, "stride": 32, "chunk_size": 16, "max_tokens": 300}

    r = invoke("fixed", "--model", model_dir, "--context-length", 700, "--facts", 4, "--questions", 3,
               "--samples", 2, "--kind", "kv", "--format", "code", "--max-new-tokens", 3,
               "--out", out / "eval_fixed.json", "--quiet")
    assert r.exit_code == 0, r.output
    fixed = json.loads((out / "eval_fixed.json").read_text())
    assert fixed["metrics"]["questions"] == 6 and fixed["metrics"]["contexts"] == 2

    lb = tmp_path / "lb"
    lb.mkdir()
    recs = [{"input": "Who?", "context": "Alice met Bob. " * 40, "answers": ["Alice"], "dataset": "hotpotqa",
             "length": 80, "all_classes": None, "_id": "h1"},
            {"input": "What?", "context": "x = 1\n" * 30, "answers": ["y = 2"], "dataset": "lcc", "length": 60,
             "all_classes": None, "_id": "l1"}]
    (lb / "mixed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    r = invoke("longbench", "--model", model_dir, "--data", lb, "--max-length", 128, "--max-new-tokens", 4,
               "--out", out / "eval_longbench.json", "--quiet")
    assert r.exit_code == 0, r.output
    lbr = json.loads((out / "eval_longbench.json").read_text())
    assert set(lbr["metrics"]["scores"]) == {"hotpotqa", "lcc"}

    r = invoke("suite", "--model", model_dir, "--tasks", "passkey", "--lengths", 400, "--samples", 1,
               "--max-new-tokens", 2, "--out", out / "eval_suite.json", "--quiet")
    assert r.exit_code == 0, r.output
    from typer import Typer

    from lmsqueeze.eval.cli import report

    rep = Typer()
    rep.command()(report)
    r = runner.invoke(rep, [str(out), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "report" / "report.md").read_text()
    for kind in ("eval.ppl", "eval.suite", "eval.fixed", "eval.longbench"):
        assert f"(`{kind}`)" in md


@pytest.mark.parametrize("args", [
    ["suite", "--tasks", "nope"],
    ["suite", "--lengths", "ten"],
    ["ppl", "--stride", "4096", "--context-length", "64"],
    ["ppl", "--method-dir", "/nonexistent/artifact"],
    ["ppl", "--method", "no-such-method"],
    ["fixed", "--rollback", "undo"],
    ["longbench", "--data", "/nonexistent.jsonl"],
])
def test_bad_inputs_exit_2_with_one_line(model_dir, args):
    r = invoke(*args, "--model", model_dir, "--quiet")
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "Traceback" not in r.output


def test_mounted_in_the_lmsqueeze_cli(model_dir, tmp_path):
    from lmsqueeze.cli import main

    text = tmp_path / "t.txt"
    text.write_text("print('hello')\n" * 100)
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(text), "--context-length", "32",
                 "--max-tokens", "100", "--quiet", "--out", str(tmp_path / "r" / "p.json")]) == 0
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "report.md").exists()
