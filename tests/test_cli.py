"""The CLI: user errors exit non-zero with one line on stderr and no traceback."""

import subprocess
import sys

import pytest

from lmsqueeze.cli import main
from lmsqueeze.models.tiny import save_tiny_model


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lmsqueeze", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, fragment):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and fragment in err, err
    assert len([line for line in err.splitlines() if line.startswith("lmsqueeze: error")]) == 1


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("demo", "generate", "calibrate", "methods", "report"):
        assert cmd in proc.stdout


def test_generate_missing_model(tmp_path):
    assert_one_line_error(run_cli("generate", "hi", "--model", str(tmp_path / "none")), "does not exist")


def test_generate_without_tokenizer(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    assert_one_line_error(run_cli("generate", "hi", "--model", str(path)), "tokenizer")


def test_calibrate_unknown_method(tmp_path):
    assert_one_line_error(run_cli("calibrate", "nope", "--out", str(tmp_path / "a")), "unknown method")


def test_calibrate_bad_option(tmp_path):
    proc = run_cli("calibrate", "dense", "--out", str(tmp_path / "a"), "--set", "bits")
    assert_one_line_error(proc, "key=value")


def test_bad_dtype(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    assert_one_line_error(run_cli("generate", "x", "--model", str(path), "--dtype", "int3"), "unknown dtype")


def test_usage_error_exit_code(capsys):
    assert main(["generate"]) == 2  # missing argument: click's usage message, exit 2


@pytest.mark.parametrize("args", [["methods"]])
def test_in_process(args, capsys):
    assert main(args) == 0
    assert "dense" in capsys.readouterr().out


def test_demo_bad_tokens():
    assert_one_line_error(run_cli("demo", "--tokens", "10"), "--tokens")


def test_calibration_batches_bad_inputs(tmp_path):
    from lmsqueeze.data.calibration import calibration_batches
    from lmsqueeze.errors import LmsqueezeError

    with pytest.raises(LmsqueezeError, match="num_samples"):
        calibration_batches(None, 0, 16)
    (tmp_path / "t.txt").write_text("tiny")

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(LmsqueezeError, match="fewer than seq_len"):
        calibration_batches(Tok(), 2, 1000, roots=[tmp_path / "t.txt"])
    batches = calibration_batches(Tok(), 3, 4, roots=[tmp_path / "t.txt"])
    assert len(batches) == 3 and all(b.shape == (1, 4) for b in batches)
