import json

import pytest

from lmsqueeze.data.longbench import (
    PROMPTS,
    LongBenchSample,
    build_prompt,
    load_longbench,
    prompt_ids,
    truncate_middle,
)
from lmsqueeze.errors import LmsqueezeError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(dataset, i, **kw):
    return {"input": f"question {i}?", "context": f"context {i} " * 5, "answers": [f"answer {i}"],
            "length": 10 + i, "dataset": dataset, "language": "en", "all_classes": None, "_id": f"id{i}"} | kw


def test_load_a_file_and_a_directory(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [record("hotpotqa", i) for i in range(3)])
    write_jsonl(tmp_path / "trec_e.jsonl", [record("trec_e", i, all_classes=["A", "B"]) for i in range(2)])
    one = load_longbench(tmp_path / "hotpotqa.jsonl")
    assert [s.id for s in one] == ["id0", "id1", "id2"]
    assert one[1] == LongBenchSample(input="question 1?", context="context 1 " * 5, answers=["answer 1"],
                                     dataset="hotpotqa", all_classes=None, length=11, id="id1",
                                     extra={"language": "en"})
    both = load_longbench(tmp_path)
    assert sorted({s.dataset for s in both}) == ["hotpotqa", "trec"]  # '_e' files use the base dataset
    assert [s.dataset for s in load_longbench(tmp_path, datasets=["trec"])] == ["trec", "trec"]
    assert len(load_longbench(tmp_path, max_samples=1)) == 2


def test_dataset_name_falls_back_to_the_file_stem(tmp_path):
    r = record("x", 0)
    del r["dataset"]
    assert load_longbench(write_jsonl(tmp_path / "qasper.jsonl", [r]))[0].dataset == "qasper"


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", json.dumps({"input": "q", "context": "c"}),
                                  json.dumps({"input": "q", "context": "c", "answers": []})])
def test_bad_records_are_user_errors(tmp_path, line):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(LmsqueezeError):
        load_longbench(tmp_path / "bad.jsonl")


def test_missing_path_or_no_records_are_user_errors(tmp_path):
    with pytest.raises(LmsqueezeError):
        load_longbench(tmp_path / "nope.jsonl")
    with pytest.raises(LmsqueezeError):
        load_longbench(tmp_path)  # no jsonl files
    write_jsonl(tmp_path / "a.jsonl", [record("hotpotqa", 0)])
    with pytest.raises(LmsqueezeError):
        load_longbench(tmp_path, datasets=["qasper"])


def test_prompt_templates():
    s = LongBenchSample(input="Who?", context="{braces} stay", answers=["x"], dataset="hotpotqa")
    text = build_prompt(s)
    assert text.startswith("Answer the question based on the given passages.")
    assert "The following are given passages.\n{braces} stay\n\n" in text
    assert text.endswith("Question: Who?\nAnswer:")
    lcc = LongBenchSample(input="", context="def f():\n", answers=["x"], dataset="lcc")
    assert build_prompt(lcc) == "Please complete the code given below. \ndef f():\nNext line of code:\n"
    other = LongBenchSample(input="Q", context="C", answers=["x"], dataset="mine")
    assert build_prompt(other) == "C\n\nQuestion: Q\nAnswer:"
    assert all("{context}" in t for t in PROMPTS.values())


def test_truncate_middle():
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_middle(list(range(10)), 5) == [0, 1, 8, 9]  # LongBench keeps max_length // 2 each side
    assert truncate_middle([1, 2, 3], 8) == [1, 2, 3]
    with pytest.raises(LmsqueezeError):
        truncate_middle([1, 2], 1)


def test_prompt_ids_cut_long_prompts_in_the_middle(tokenizer):
    s = LongBenchSample(input="Who wrote it?", context="word " * 500 + "THE END", answers=["x"],
                        dataset="narrativeqa")
    full = tokenizer(build_prompt(s))["input_ids"]
    ids = prompt_ids(tokenizer, s, max_length=100)
    assert len(full) > 200 and len(ids) <= 100 + 3  # re-tokenizing at the cut may merge/split a token
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("You are given a story") and text.endswith("Question: Who wrote it?\n\nAnswer:")
    assert prompt_ids(tokenizer, s, max_length=10_000) == full
    with pytest.raises(LmsqueezeError):  # the test tokenizer has no chat template
        prompt_ids(tokenizer, s, max_length=100, chat_template=True)
