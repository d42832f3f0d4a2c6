import pytest
import torch

import lmsqueeze
from lmsqueeze.data.tasks import TASKS, make_sample
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.decoding import greedy_decode, prefill
from lmsqueeze.eval.scoring import exact_match, mean_by, string_match_all, string_match_part
from lmsqueeze.eval.suite import SuiteConfig, run_samples, run_suite, summarize
from lmsqueeze.models.tiny import tiny_model


def test_string_match_scores():
    assert string_match_all(" 123, 456 and 789", ["123", "456", "000"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert string_match_part("nothing", ["a-b", "x"]) == 0.0
    assert string_match_part("the x", ["a-b", "x"]) == 1.0


def test_exact_match():
    assert exact_match(' 68142"\nassert FOO == "1"', ["68142"]) == 1.0
    assert exact_match(" 68142.", ["68142"]) == 1.0
    assert exact_match(" 681423", ["68142"]) == 0.0          # contained, but not equal
    assert exact_match("\n68142", ["68142"]) == 1.0          # leading whitespace is stripped first
    assert exact_match(" 1, 2 and 3", ["1", "2", "3"]) == 1.0
    assert exact_match(" 1, 2\n3", ["1", "2", "3"]) == 0.0   # only the first line counts
    assert exact_match(' {"12", "34"}', ["34", "12"]) == 1.0


def test_mean_by_groups_and_sorts_numbers():
    recs = [{"t": "a", "n": 1024, "s": 1.0}, {"t": "a", "n": 512, "s": 0.0}, {"t": "a", "n": 512, "s": 1.0},
            {"t": "b", "n": 512, "s": 0.25}]
    assert mean_by(recs, ["t"], "s") == {"a": pytest.approx(2 / 3), "b": 0.25}
    by = mean_by(recs, ["t", "n"], "s")
    assert by == {"a": {"512": 0.5, "1024": 1.0}, "b": {"512": 0.25}}
    assert list(by["a"]) == ["512", "1024"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_and_greedy_decode_equal_generate(family):
    model = tiny_model(family, seed=3)
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(4))
    want = model.generate(ids, max_new_tokens=9, do_sample=False, min_new_tokens=9)[0, 37:].tolist()
    with lmsqueeze.apply(model, None) as session:
        cache = session.new_cache()
        logits = prefill(model, ids, cache, chunk_size=8)
        got = greedy_decode(model, cache, logits, 9)
        assert cache.get_seq_length() == 37 + 8
    assert got == want


def test_suite_runs_every_task(model_and_tokenizer, haystack):
    model, tok = model_and_tokenizer
    config = SuiteConfig(tasks=TASKS, lengths=(500, 600), depths=(0.5,), samples=1, seed=0, formats=("code",),
                         chunk_size=128, max_new_tokens=3)
    summary, records = run_suite(model, tok, haystack, None, config, progress=False)
    assert set(summary["accuracy"]) == set(TASKS) == set(summary["exact_match"])
    assert len(records) == len(TASKS) * 2 == summary["samples"]
    for r in records:
        assert 0.0 <= r["string_match_all"] <= 1.0 and r["num_tokens"] <= r["length"]
        assert r["string_match_all"] == string_match_all(r["prediction"], r["answers"])
    assert list(summary["by_length"]["vt"]) == ["500", "600"] and list(summary["by_format"]["vt"]) == ["code"]


def test_suite_scores_a_model_that_knows_the_answer(model_and_tokenizer, haystack, monkeypatch):
    """With a decode that returns the answer, every task scores 1; a wrong one scores 0."""
    from lmsqueeze.eval import suite

    model, tok = model_and_tokenizer
    samples = [make_sample(t, tok, haystack, 600, 0.5, seed=1) for t in TASKS]
    answers = {s.prompt: s.answers for s in samples}
    ids_to_prompt = {tuple(tok(p)["input_ids"]): p for p in answers}

    def oracle(model, tokenizer, session, prompt_ids, max_new_tokens, chunk_size):
        return " " + ", ".join(answers[ids_to_prompt[tuple(prompt_ids)]]) + "."

    monkeypatch.setattr(suite, "answer_prompt", oracle)
    summary = summarize(run_samples(model, tok, samples, None, progress=False))
    assert summary["accuracy"] == {t: 1.0 for t in TASKS} and summary["mean_accuracy"] == 1.0
    assert summary["exact_match"] == {t: 1.0 for t in TASKS}
    monkeypatch.setattr(suite, "answer_prompt", lambda *a: " 0")
    assert summarize(run_samples(model, tok, samples, None, progress=False))["mean_accuracy"] == 0.0


@pytest.mark.parametrize("kwargs", [{"tasks": ["nope"]}, {"formats": ["yaml"]}, {"lengths": [0]},
                                    {"depths": [-0.1]}, {"samples": 0}, {"chunk_size": 0},
                                    {"max_new_tokens": 0}, {"tasks": []}])
def test_bad_suite_config_is_a_user_error(kwargs):
    with pytest.raises(LmsqueezeError):
        SuiteConfig(**kwargs)
