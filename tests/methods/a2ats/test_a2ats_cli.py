"""A²ATS through the CLI: `lmsqueeze calibrate a2ats`, then `lmsqueeze eval suite --method-dir` on the artifact."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lmsqueeze.cli import _mount_subapps, app


def test_calibrate_then_eval_with_the_artifact(tmp_path):
    _mount_subapps()  # `lmsqueeze eval` is mounted by the entry point
    runner = CliRunner()
    art = tmp_path / "a2ats"
    r = runner.invoke(app, ["calibrate", "a2ats", "--out", str(art), "--samples", "2", "--seq-len", "160",
                            "--set", "codebook=32", "--set", "bands=[96, 128]", "--set", "window=16",
                            "--set", "kmeans_iters=3", "--set", "offload=false"])
    assert r.exit_code == 0, r.output
    config = json.loads((art / "config.json").read_text())
    assert config["method"]["name"] == "a2ats" and config["method"]["bands"] == [96, 128]
    out = tmp_path / "suite.json"
    r = runner.invoke(app, ["eval", "suite", "--method-dir", str(art), "--tasks", "passkey", "--lengths", "300",
                            "--samples", "1", "--max-new-tokens", "3", "--chunk-size", "128", "--device", "cpu",
                            "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["method"]["name"] == "a2ats" and "passkey" in result["metrics"]["accuracy"]
