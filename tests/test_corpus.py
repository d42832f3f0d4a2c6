"""The offline corpus: deterministic hash split, local files, bad inputs."""

import pytest

from lmsqueeze.data.corpus import SplitFractions, iter_files, python_source_roots, read_texts, split_of
from lmsqueeze.errors import LmsqueezeError


def test_split_is_deterministic_and_covers_all():
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    assert counts["train"] > 1800 and 10 < counts["test"] < 90 and 10 < counts["validation"] < 90


def test_stdlib_splits_are_disjoint():
    roots = python_source_roots()
    test = {rel for rel, _ in iter_files(roots, "test")}
    train = {rel for rel, _ in iter_files(roots, "train")}
    assert test and train and not (test & train)
    assert "os.py" in train | test | {rel for rel, _ in iter_files(roots, "validation")}


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 10)
    for i in range(50):
        (tmp_path / f"f{i}.txt").write_text(f"text {i}")
    assert list(read_texts([tmp_path / "a.txt"], split="test")) == ["hello world " * 10]
    train = list(read_texts([tmp_path], split="train"))
    assert 30 < len(train) <= 51
    assert sum(len(t) for t in read_texts([tmp_path], split="train", max_chars=25)) == 25


def test_bad_inputs(tmp_path):
    with pytest.raises(LmsqueezeError, match="does not exist"):
        list(read_texts([tmp_path / "missing"]))
    with pytest.raises(LmsqueezeError, match="unknown split"):
        list(read_texts(None, split="dev"))
    with pytest.raises(LmsqueezeError, match="split fractions"):
        SplitFractions(validation=0.6, test=0.6)
