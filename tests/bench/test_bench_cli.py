import json
import sys

import pytest
from typer.testing import CliRunner

from lmsqueeze.bench import cli
from lmsqueeze.errors import LmsqueezeError

runner = CliRunner()
CPU = ["--preset", "tiny", "--device", "cpu"]


def _run(*args):
    return runner.invoke(cli.app, list(args))


def test_attention_command_writes_json(tmp_path):
    out = tmp_path / "att.json"
    r = _run("attention", *CPU, "--lengths", "17,33", "--batch", "1,2", "--variants", "sdpa-pack-gqa,sdpa",
             "--iters", "20", "--warmup", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "decode_attention" and len(doc["rows"]) == 8
    assert {row["method"] for row in doc["rows"]} == {"sdpa", "sdpa-pack-gqa"}
    assert doc["extra"]["correctness_failures"] == [] and doc["extra"]["options"]["lengths"] == [17, 33]
    assert "sdpa-pack-gqa" in r.output  # the table


@pytest.mark.parametrize("command,extra", [
    ("step", ["--lengths", "19", "--batch", "2", "--variants", "hf-static-graph,hf-dynamic-eager"]),
    ("prefill", ["--lengths", "40", "--chunk", "16"]),
    ("memory", ["--lengths", "19", "--chunk", "8"]),
])
def test_model_commands_write_json(tmp_path, command, extra):
    out = tmp_path / f"{command}.json"
    iters = ["--iters", "20", "--warmup", "0"] if command != "memory" else []
    r = _run(command, *CPU, *extra, *iters, "--num-layers", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["rows"] and all(row["method"] for row in doc["rows"])
    assert doc["extra"]["options"]["preset"] == "tiny"


@pytest.mark.parametrize("args,match", [
    (["attention", "--preset", "nope", "--device", "cpu"], "unknown preset"),
    (["attention", "--preset", "llama3-8b", "--device", "cpu"], "needs a CUDA GPU"),
    (["attention", *CPU, "--lengths", "12,x"], "bad lengths"),
    (["attention", *CPU, "--variants", "flash9"], "unknown attention variant"),
    (["step", *CPU, "--baseline", "nope"], "unknown baseline variant"),
    (["prefill", *CPU, "--batch", "0"], "batch"),
    (["memory", *CPU, "--chunk", "0"], "chunk"),
    (["attention", *CPU, "--iters", "5", "--lengths", "8"], "iters"),
])
def test_bad_inputs_raise_lmsqueeze_error(args, match):
    r = _run(*args)
    assert isinstance(r.exception, LmsqueezeError), r.output
    assert match in str(r.exception)


def test_main_prints_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lmsqueeze-bench", "step", "--preset", "nope"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown preset 'nope'; use one of llama3-8b, llama2-7b, mistral-7b, qwen2.5-7b, tiny"]
