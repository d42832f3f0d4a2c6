"""The paired per-sequence comparison of benchmarks/scripts/eval_a2ats.py (the statistics behind #7's claim)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scripts" / "eval_a2ats.py"


@pytest.fixture(scope="module")
def paired():
    spec = importlib.util.spec_from_file_location("eval_a2ats", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.paired


def seqs(diffs, base=0.5):
    return [{("a", 0.03): base + d, ("b", 0.03): base} for d in diffs]


def test_consistent_gain_is_significant(paired):
    r = paired(seqs([0.01, 0.02, 0.015, 0.012, 0.011, 0.018, 0.013, 0.016, 0.014, 0.017]), "a", "b")["0.03"]
    assert r["wins"] == 10 and r["losses"] == 0 and r["sequences"] == 10
    assert r["mean_diff"] == pytest.approx(0.0146)
    assert 0 < r["ci95"][0] < r["mean_diff"] < r["ci95"][1]
    assert r["p_sign_flip"] < 0.01  # 2 / 2^10 of the sign patterns reach |mean| this large


def test_no_difference_and_mixed_signs(paired):
    zero = paired(seqs([0.0] * 6), "a", "b")["0.03"]
    assert zero["ties"] == 6 and zero["p_sign_flip"] == 1.0 and zero["ci95"] == [0.0, 0.0]
    mixed = paired(seqs([0.01, -0.01, 0.02, -0.02, 0.005, -0.005]), "a", "b")["0.03"]
    assert mixed["wins"] == 3 and mixed["losses"] == 3 and mixed["p_sign_flip"] > 0.5
    assert mixed["ci95"][0] < 0 < mixed["ci95"][1]


def test_missing_ratio_is_skipped(paired):
    assert paired([{("a", 0.01): 0.5, ("b", 0.01): 0.4}], "a", "b").keys() == {"0.01"}
