import itertools
import re

import pytest

from lmsqueeze.data.tasks import (
    FORMATS,
    TASKS,
    TaskOptions,
    count_tokens,
    fixed_context_sample,
    make_sample,
    make_samples,
)
from lmsqueeze.errors import LmsqueezeError

LENGTH = 700


def test_same_seed_gives_identical_prompts(tokenizer, haystack):
    a = make_samples(TASKS, tokenizer, haystack, [LENGTH], [0.2, 0.8], samples=2, seed=7, formats=FORMATS)
    b = make_samples(TASKS, tokenizer, haystack, [LENGTH], [0.2, 0.8], samples=2, seed=7, formats=FORMATS)
    assert len(a) == len(TASKS) * len(FORMATS) * 2 * 2
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    c = make_samples(TASKS, tokenizer, haystack, [LENGTH], [0.2, 0.8], samples=2, seed=8, formats=FORMATS)
    assert all(x.prompt != y.prompt for x, y in zip(a, c))
    assert len({s.prompt for s in a}) == len(a)  # samples differ from each other too


def test_a_sample_does_not_depend_on_the_other_tasks_asked(tokenizer, haystack):
    alone = make_samples(["vt"], tokenizer, haystack, [LENGTH], seed=3)
    among = make_samples(["passkey", "vt"], tokenizer, haystack, [LENGTH], seed=3)
    assert alone[0].prompt == among[1].prompt


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("length", [700, 1501])
def test_prompt_fits_the_length_and_holds_the_answers(tokenizer, haystack, task, fmt, length):
    s = make_sample(task, tokenizer, haystack, length, depth=0.4, seed=1, fmt=fmt)
    assert (s.task, s.format, s.length, s.depth) == (task, fmt, length, 0.4)
    assert s.num_tokens == count_tokens(tokenizer, s.prompt)
    assert 0.85 * length <= s.num_tokens <= length
    assert s.answers and all(a in s.prompt for a in s.answers)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "kv_retrieval"])
def test_needle_sits_at_the_depth(tokenizer, haystack, task):
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = make_sample(task, tokenizer, haystack, 1500, depth=depth, seed=2)
        where = s.prompt.find(s.answers[0]) / len(s.prompt)
        assert abs(where - depth) < 0.2, (depth, where)
        positions.append(where)
    assert positions == sorted(positions)


def test_code_format_asks_like_code(tokenizer, haystack):
    s = make_sample("niah_single", tokenizer, haystack, LENGTH, seed=4, fmt="code")
    name = re.search(r"assert (\w+) == \"$", s.prompt).group(1)
    assert f'{name} = "{s.answers[0]}"' in s.prompt
    p = make_sample("passkey", tokenizer, haystack, LENGTH, seed=4, fmt="prose")
    assert p.prompt.endswith("What is the pass key? The pass key is")
    assert f"The pass key is {p.answers[0]}. Remember it." in p.prompt


def test_multikey_has_distractors_and_multivalue_all_values(tokenizer, haystack):
    opts = TaskOptions(num_keys=5, num_values=3)
    mk = make_sample("niah_multikey", tokenizer, haystack, 1000, seed=5, options=opts)
    assert mk.prompt.count("One of the special magic numbers for") == 5
    mv = make_sample("niah_multivalue", tokenizer, haystack, 1000, seed=5, options=opts)
    assert len(mv.answers) == 3 and len(set(mv.answers)) == 3
    key = re.search(r"numbers for (\S+) mentioned", mv.prompt).group(1)
    assert all(f"for {key} is: {v}." in mv.prompt for v in mv.answers)


def test_variable_tracking_chain(tokenizer, haystack):
    s = make_sample("vt", tokenizer, haystack, 1000, depth=0.3, seed=6, options=TaskOptions(num_hops=3))
    names = s.answers
    assert len(names) == 4
    value = re.search(rf"VAR {names[0]} = (\d+)", s.prompt).group(1)
    order = [s.prompt.index(f"VAR {names[0]} = {value}")]
    order += [s.prompt.index(f"VAR {b} = VAR {a}") for a, b in itertools.pairwise(names)]
    assert order == sorted(order)
    assert s.prompt.endswith("they are:")


@pytest.mark.parametrize("style,pattern", [("uuid", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
                                           ("hex", r"[0-9a-f]{16}")])
def test_kv_retrieval_key_styles(tokenizer, haystack, style, pattern):
    s = make_sample("kv_retrieval", tokenizer, haystack, 800, seed=1, options=TaskOptions(key_style=style))
    assert re.fullmatch(pattern, s.answers[0])
    key = re.search(r'Key: "([^"]+)"', s.prompt).group(1)
    assert re.fullmatch(pattern, key)
    assert f'"{key}": "{s.answers[0]}",' in s.prompt
    assert s.prompt.count(f'"{key}"') == 2  # once in the object, once in the question


@pytest.mark.parametrize("kind,fmt", [("needles", "code"), ("needles", "prose"), ("kv", "prose"), ("kv", "code")])
def test_fixed_context_sample(tokenizer, haystack, kind, fmt):
    a = fixed_context_sample(tokenizer, haystack, 1200, num_facts=6, num_questions=4, seed=1, kind=kind, fmt=fmt)
    b = fixed_context_sample(tokenizer, haystack, 1200, num_facts=6, num_questions=4, seed=1, kind=kind, fmt=fmt)
    assert a == b
    assert len(a.questions) == len(a.answers) == len(a.keys) == 4 and len(set(a.keys)) == 4
    assert a.num_tokens == count_tokens(tokenizer, a.context) <= 1200 and a.context.endswith("\n")
    for q, ans, key in zip(a.questions, a.answers, a.keys):
        assert ans[0] in a.context
        assert (key.replace("-", "_").upper() if kind == "needles" and fmt == "code" else key) in q


@pytest.mark.parametrize("kwargs", [{"task": "nope"}, {"fmt": "yaml"}, {"depth": 1.5}, {"length": 0},
                                    {"length": 20}])
def test_bad_inputs_are_user_errors(tokenizer, haystack, kwargs):
    args = {"task": "passkey", "length": LENGTH, "depth": 0.5, "fmt": "prose"} | kwargs
    with pytest.raises(LmsqueezeError):
        make_sample(args["task"], tokenizer, haystack, args["length"], args["depth"], fmt=args["fmt"])


def test_bad_options_are_user_errors():
    with pytest.raises(LmsqueezeError):
        TaskOptions(num_keys=1)
    with pytest.raises(LmsqueezeError):
        TaskOptions(key_style="base64")
