import json
import math
import os
import socket

import pytest

from lmsqueeze.bench import results
from lmsqueeze.bench.results import (
    build_result,
    command_line,
    git_state,
    read_result,
    timing_row,
    write_result,
)
from lmsqueeze.bench.timing import Timing
from lmsqueeze.errors import LmsqueezeError


def _rows():
    base, fast = Timing(4.0, 3.5, 4.5, 20, True), Timing(2.0, 1.9, 2.2, 20, True)
    return [timing_row("sdpa", base, baseline="sdpa", baseline_timing=base, bytes_moved=6e9, peak_tb_per_s=3.0,
                       batch=1, length=32768),
            timing_row("fast", fast, baseline="sdpa", baseline_timing=base, bytes_moved=6e9, peak_tb_per_s=3.0,
                       batch=1, length=32768, rel_err=float("nan"))]


def test_timing_row_ratios_and_bandwidth():
    row = _rows()[1]
    assert row["method"] == "fast" and row["baseline"] == "sdpa"
    assert row["ms"] == 2.0 and row["baseline_ms"] == 4.0 and row["speedup"] == 2.0
    assert math.isclose(row["tb_per_s"], 3.0) and math.isclose(row["frac_of_peak"], 1.0)
    assert math.isclose(row["floor_ms"], 2.0) and row["graph"] is True


def test_write_result_round_trip(tmp_path):
    path = write_result(tmp_path / "sub" / "r.json", "decode_attention", "lmsqueeze bench attention", _rows(),
                        {"peak_tb_per_s": 3.0}, device="cpu")
    doc = read_result(path)
    assert doc["kind"] == "decode_attention" and doc["command"] == "lmsqueeze bench attention"
    assert isinstance(doc["commit"], str) and doc["commit"]
    assert doc["date"].endswith("Z") and doc["device"]["type"] == "cpu"
    for lib in ("python", "torch", "triton", "transformers"):
        assert lib in doc["versions"]
    assert doc["versions"]["torch"]
    assert [r["method"] for r in doc["rows"]] == ["sdpa", "fast"]
    assert doc["rows"][1]["rel_err"] is None  # NaN is written as null: the file stays strict JSON
    assert doc["extra"] == {"peak_tb_per_s": 3.0}
    text = path.read_text()
    json.loads(text)
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in text


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_result(path, "k", "cmd", _rows())
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind


def test_rows_must_name_a_method():
    with pytest.raises(LmsqueezeError, match="method"):
        build_result("k", "cmd", [{"ms": 1.0}])
    with pytest.raises(LmsqueezeError, match="kind"):
        build_result("", "cmd", [])


def test_git_fallback_from_environment(monkeypatch):
    monkeypatch.setattr(results, "_git", lambda *a: None)
    monkeypatch.setenv("LMSQUEEZE_GIT_COMMIT", "abc123")
    monkeypatch.setenv("LMSQUEEZE_GIT_DIRTY", "0")
    assert git_state() == ("abc123", False)
    monkeypatch.delenv("LMSQUEEZE_GIT_COMMIT")
    monkeypatch.delenv("LMSQUEEZE_GIT_DIRTY")
    assert git_state() == ("unknown", None)


def test_command_line_and_read_result_checks(tmp_path):
    cmd = command_line(["/x/src/lmsqueeze/bench/cli.py", "attention", "--out", "a b"])
    assert cmd == "python -m lmsqueeze.bench.cli attention --out 'a b'"
    assert command_line(["/usr/bin/lmsqueeze", "bench", "step"]) == "lmsqueeze bench step"
    other = tmp_path / "o.json"
    other.write_text('{"a": 1}')
    with pytest.raises(LmsqueezeError, match="not an lmsqueeze bench result"):
        read_result(other)
    with pytest.raises(LmsqueezeError, match="cannot read"):
        read_result(tmp_path / "missing.json")


def test_plot_from_result_json(tmp_path):
    from lmsqueeze.bench.plot import plot_attention

    rows = [dict(r, preset="tiny") for r in _rows()]
    res = write_result(tmp_path / "a.json", "decode_attention", "cmd", rows, {"peak_tb_per_s": 3.0}, device="cpu")
    png = plot_attention(res, tmp_path / "plots" / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = write_result(tmp_path / "m.json", "memory", "cmd", [{"method": "hf"}], device="cpu")
    with pytest.raises(LmsqueezeError, match="decode_attention"):
        plot_attention(other, tmp_path / "m.png")


def test_environment_commit_wins_over_a_stale_git(monkeypatch):
    """A copied tree may carry an old .git: the commit the caller passes is the one recorded."""
    monkeypatch.setattr(results, "_git", lambda *a: "0" * 40 if a[0] == "rev-parse" else "")
    monkeypatch.setenv("LMSQUEEZE_GIT_COMMIT", "abc123")
    monkeypatch.setenv("LMSQUEEZE_GIT_DIRTY", "1")
    assert git_state() == ("abc123", True)
    monkeypatch.delenv("LMSQUEEZE_GIT_COMMIT")
    assert git_state() == ("0" * 40, False)
