"""Deterministic RULER-style long-context tasks with haystacks cut from a corpus text.

Tasks: passkey, niah_single, niah_multikey, niah_multivalue (needles in a haystack), kv_retrieval (a JSON
object / dict literal of random keys and values) and vt (variable tracking). Each comes in two formats:
'prose' (RULER's wording: "One of the special magic numbers for X is: 1234567.") and 'code'
(`NAME = "value"` ... `assert NAME == "`). A prompt holds at most `length` tokens of the given tokenizer
(counted as the model will see them, special tokens included), and needles sit at `depth` (0 = start of the
haystack, 1 = end). Every random choice comes from a seed derived from (seed, task, format, length, depth,
index), so the same seed gives identical prompts, and adding tasks does not change the others.

`fixed_context_sample` builds one long context holding many facts and many questions about them, for the
fixed-context mode (one prefill, many answers).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from lmsqueeze.errors import LmsqueezeError

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_retrieval", "vt")
FORMATS = ("prose", "code")
KEY_STYLES = ("uuid", "hex")
MAX_LINE_CHARS = 400  # haystack lines are cut to this, so the length can be matched finely

_ADJECTIVES = ("amber", "bitter", "brave", "bright", "calm", "clever", "crimson", "dusty", "eager", "faint",
               "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow",
               "misty", "noble", "odd", "pale", "proud", "quiet", "rapid", "rusty", "silent", "silver",
               "sleepy", "smooth", "solar", "stormy", "swift", "tidy", "vivid", "wary", "wild", "witty")
_NOUNS = ("anchor", "badger", "beacon", "canyon", "cedar", "comet", "falcon", "fern", "glacier", "harbor",
          "heron", "island", "jaguar", "lantern", "maple", "meadow", "nebula", "orchid", "otter", "panda",
          "pebble", "pepper", "quartz", "raven", "river", "saddle", "salmon", "spruce", "summit", "thistle",
          "tiger", "tulip", "valley", "violet", "walnut", "willow", "wombat", "yarrow", "zebra", "zephyr")


@dataclass(slots=True)
class TaskOptions:
    """Task sizes: num_keys needles in niah_multikey (one is asked), num_values values in niah_multivalue,
    num_hops assignments after the first in vt, key_style of kv_retrieval keys/values ('uuid' or 'hex')."""

    num_keys: int = 4
    num_values: int = 4
    num_hops: int = 4
    key_style: str = "uuid"

    def __post_init__(self) -> None:
        if self.num_keys < 2 or self.num_values < 1 or self.num_hops < 1:
            raise LmsqueezeError("task options need num_keys >= 2, num_values >= 1 and num_hops >= 1")
        if self.key_style not in KEY_STYLES:
            raise LmsqueezeError(f"unknown key_style {self.key_style!r}; use one of {', '.join(KEY_STYLES)}")


@dataclass(slots=True)
class TaskSample:
    """One prompt. answers: strings the prediction must contain (all of them); length: target tokens;
    num_tokens: actual prompt tokens (<= length); depth in [0, 1]."""

    task: str
    prompt: str
    answers: list[str]
    length: int
    depth: float
    format: str
    num_tokens: int
    seed: int
    index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class FixedContextSample:
    """One context and many questions about it. questions[i] is appended to the context alone;
    answers[i] are the strings its answer must contain."""

    context: str
    questions: list[str]
    answers: list[list[str]]
    length: int
    num_tokens: int
    kind: str
    format: str
    seed: int
    index: int = 0
    keys: list[str] = field(default_factory=list)


# --- helpers -------------------------------------------------------------------------------------------

def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` as the model sees them (the tokenizer's special tokens included)."""
    return len(tokenizer(text)["input_ids"])


def sample_seed(seed: int, *parts) -> int:
    """A 63-bit seed from `seed` and the parts naming one sample (stable across runs and machines)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def haystack_lines(text: str) -> list[str]:
    """The corpus text as lines (each cut to MAX_LINE_CHARS), ready to fill prompts."""
    lines = [line[:MAX_LINE_CHARS] for line in text.splitlines()]
    if not any(line.strip() for line in lines):
        raise LmsqueezeError("the haystack text is empty; pass a corpus text with some content")
    return lines


def _words_key(rng: random.Random, used: set[str]) -> str:
    for _ in range(10_000):
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in used:
            used.add(key)
            return key
    raise LmsqueezeError("ran out of distinct needle keys; use fewer keys or facts")


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _hex_key(rng: random.Random, style: str) -> str:
    if style == "uuid":
        h = f"{rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return f"{rng.getrandbits(64):016x}"


def _var_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def _code_name(key: str) -> str:
    return key.replace("-", "_").upper()


def _insert(hay: list[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """Insert needle lines at fractional depths of `hay` (stable: equal depths keep their order)."""
    out = list(hay)
    slots = sorted(((round(d * len(hay)), i, text) for i, (d, text) in enumerate(needles)), reverse=True)
    for pos, _, text in slots:
        out.insert(pos, text)
    return out


def _fill(tokenizer, source: Callable[[int], str], build: Callable[[list[str]], str], length: int,
          what: str) -> tuple[str, int]:
    """Largest prompt build(source(0), ..., source(k-1)) with at most `length` tokens.

    Returns (prompt, its token count). Lines are taken until their summed token estimates overshoot,
    then k is found by bisection on exactly measured prompts.
    """
    fixed = count_tokens(tokenizer, build([]))
    if fixed > length:
        raise LmsqueezeError(f"length {length} is too small for {what} ({fixed} tokens without haystack); "
                             "use a larger length")
    budget = length - fixed
    lines: list[str] = []
    estimate = 0

    def extend(target: float) -> None:
        nonlocal estimate
        while estimate < target:
            batch = [source(len(lines) + j) for j in range(64)]
            enc = tokenizer([b + "\n" for b in batch], add_special_tokens=False)["input_ids"]
            for line, ids in zip(batch, enc):
                lines.append(line)
                estimate += max(1, len(ids))

    def measure(k: int) -> tuple[str, int]:
        prompt = build(lines[:k])
        return prompt, count_tokens(tokenizer, prompt)

    extend(1.1 * budget + 16)
    while measure(len(lines))[1] <= length:
        extend(estimate + 0.5 * budget + 16)
    lo, hi = 0, len(lines)  # lines[:lo] fits, lines[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid)[1] <= length:
            lo = mid
        else:
            hi = mid
    return measure(lo)


def _check(task: str, fmt: str, length: int, depth: float) -> None:
    if task not in TASKS:
        raise LmsqueezeError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise LmsqueezeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if length <= 0:
        raise LmsqueezeError(f"length must be positive, got {length}")
    if not 0.0 <= depth <= 1.0:
        raise LmsqueezeError(f"depth must be in [0, 1], got {depth}")


# --- needle texts --------------------------------------------------------------------------------------

def _needle(fmt: str, key: str, value: str) -> str:
    if fmt == "code":
        return f'{_code_name(key)} = "{value}"'
    return f"One of the special magic numbers for {key} is: {value}."


def _needle_question(fmt: str, key: str) -> str:
    if fmt == "code":
        return f'assert {_code_name(key)} == "'
    return (f"What is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


_NEEDLE_INTRO = {
    "prose": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.\n",
    "code": "# Some constants holding secret values are defined in the code below. Remember their values.\n",
}


# --- the tasks -----------------------------------------------------------------------------------------

def _needle_task(task: str, fmt: str, rng: random.Random, depth: float, opts: TaskOptions):
    """(intro, needles [(depth, line)], question, answers) of the passkey / niah tasks."""
    if task == "passkey":
        value = _number(rng, 5)
        if fmt == "code":
            return ("# A constant named PASS_KEY is defined somewhere in the code below. Remember its value.\n",
                    [(depth, f'PASS_KEY = "{value}"')], 'assert PASS_KEY == "', [value])
        return (("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the pass key.\n"),
                [(depth, f"The pass key is {value}. Remember it. {value} is the pass key.")],
                "What is the pass key? The pass key is", [value])
    used: set[str] = set()
    key = _words_key(rng, used)
    if task == "niah_single":
        value = _number(rng, 7)
        return _NEEDLE_INTRO[fmt], [(depth, _needle(fmt, key, value))], _needle_question(fmt, key), [value]
    if task == "niah_multikey":
        value = _number(rng, 7)
        needles = [(depth, _needle(fmt, key, value))]
        needles += [(rng.random(), _needle(fmt, _words_key(rng, used), _number(rng, 7)))
                    for _ in range(opts.num_keys - 1)]
        return _NEEDLE_INTRO[fmt], needles, _needle_question(fmt, key), [value]
    # niah_multivalue
    values: list[str] = []
    while len(values) < opts.num_values:
        v = _number(rng, 7)
        if v not in values:
            values.append(v)
    depths = [depth] + [rng.random() for _ in values[1:]]
    if fmt == "code":
        name = _code_name(key)
        needles = [(d, f'{name}.add("{v}")') for d, v in zip(depths, values)]
        return _NEEDLE_INTRO[fmt], needles, f'assert {name} == {{"', values
    needles = [(d, _needle(fmt, key, v)) for d, v in zip(depths, values)]
    question = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
                f"The special magic numbers for {key} mentioned in the provided text are")
    return _NEEDLE_INTRO[fmt], needles, question, values


def _vt_task(fmt: str, rng: random.Random, depth: float, opts: TaskOptions):
    value = _number(rng, 5)
    used: set[str] = set()
    names = [_var_name(rng, used) for _ in range(opts.num_hops + 1)]
    n = len(names)
    depths = [depth + (1.0 - depth) * i / n for i in range(n)]
    if fmt == "code":
        lines = [f"{names[0]} = {value}"] + [f"{b} = {a}" for a, b in itertools.pairwise(names)]
        intro = "# Track the chain of assignments hidden in the code below.\n"
        question = f"# The {n} variables above that hold the value {value}, in order of assignment:"
    else:
        lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)]
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = (f"Question: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {n} variables "
                    f"are assigned the value {value}, they are:")
    return intro, list(zip(depths, lines)), question, names


def _kv_prompt(fmt: str, pairs: list[str], key: str) -> str:
    if fmt == "code":
        return ("# Find the value stored under the given key in the dict below.\nTABLE = {\n"
                + "".join(p + "\n" for p in pairs) + f'}}\nassert TABLE["{key}"] == "')
    return ("Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{\n"
            + "".join(p + "\n" for p in pairs)
            + f'}}\n\nKey: "{key}"\nThe value associated with the specified key is: "')


def _kv_task(tokenizer, fmt: str, rng: random.Random, length: int, depth: float, opts: TaskOptions):
    used: set[str] = set()

    def new_key() -> str:
        while (k := _hex_key(rng, opts.key_style)) in used:
            pass
        used.add(k)
        return k

    key, value = new_key(), _hex_key(rng, opts.key_style)
    target = f'"{key}": "{value}",'
    pool: dict[int, str] = {}

    def source(i: int) -> str:
        if i not in pool:
            pool[i] = f'"{new_key()}": "{_hex_key(rng, opts.key_style)}",'
        return pool[i]

    def build(lines: list[str]) -> str:
        return _kv_prompt(fmt, _insert(lines, [(depth, target)]), key)

    prompt, n = _fill(tokenizer, source, build, length, "kv_retrieval")
    return prompt, n, [value]


def make_sample(task: str, tokenizer, haystack: str | list[str], length: int, depth: float = 0.5,
                seed: int = 0, index: int = 0, fmt: str = "prose",
                options: TaskOptions | None = None) -> TaskSample:
    """One prompt of `task` with at most `length` tokens and its needle(s) at `depth`.

    haystack: a corpus text (or its `haystack_lines`); kv_retrieval does not use it.
    """
    _check(task, fmt, length, depth)
    opts = options or TaskOptions()
    s = sample_seed(seed, task, fmt, length, f"{depth:.6f}", index)
    rng = random.Random(s)
    if task == "kv_retrieval":
        prompt, n, answers = _kv_task(tokenizer, fmt, rng, length, depth, opts)
        return TaskSample(task, prompt, answers, length, depth, fmt, n, s, index)
    lines = haystack if isinstance(haystack, list) else haystack_lines(haystack)
    if task == "vt":
        intro, needles, question, answers = _vt_task(fmt, rng, depth, opts)
    else:
        intro, needles, question, answers = _needle_task(task, fmt, rng, depth, opts)
    start = rng.randrange(len(lines))

    def build(hay: list[str]) -> str:
        body = _insert(hay, needles)
        return intro + "".join(line + "\n" for line in body) + question

    prompt, n = _fill(tokenizer, lambda i: lines[(start + i) % len(lines)], build, length, task)
    return TaskSample(task, prompt, answers, length, depth, fmt, n, s, index)


def make_samples(tasks: Sequence[str], tokenizer, haystack: str, lengths: Sequence[int],
                 depths: Sequence[float] = (0.5,), samples: int = 1, seed: int = 0,
                 formats: Sequence[str] = ("prose",), options: TaskOptions | None = None) -> list[TaskSample]:
    """Every combination of tasks x formats x lengths x depths, `samples` prompts each, in that order."""
    lines = haystack_lines(haystack)
    return [make_sample(t, tokenizer, lines, n, d, seed, i, f, options)
            for t in tasks for f in formats for n in lengths for d in depths for i in range(samples)]


def fixed_context_sample(tokenizer, haystack: str | list[str], length: int, num_facts: int = 16,
                         num_questions: int = 8, seed: int = 0, index: int = 0, kind: str = "needles",
                         fmt: str = "code", key_style: str = "uuid") -> FixedContextSample:
    """A context of at most `length` tokens holding `num_facts` facts, and `num_questions` questions.

    kind 'needles': facts are needles (`fmt` 'code' or 'prose') spread evenly through a corpus haystack;
    kind 'kv': the context is a JSON object ('prose') or dict literal ('code') of random keys/values.
    Each question is meant to follow the context directly (the context ends with a newline).
    """
    if kind not in ("needles", "kv"):
        raise LmsqueezeError(f"unknown fixed-context kind {kind!r}; use 'needles' or 'kv'")
    if fmt not in FORMATS:
        raise LmsqueezeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not 1 <= num_questions <= num_facts:
        raise LmsqueezeError(f"need 1 <= num_questions <= num_facts, got {num_questions} and {num_facts}")
    s = sample_seed(seed, "fixed", kind, fmt, length, num_facts, num_questions, index)
    rng = random.Random(s)
    if kind == "kv":
        opts = TaskOptions(key_style=key_style)
        used: set[str] = set()
        keys = []
        while len(keys) < num_facts:
            k = _hex_key(rng, opts.key_style)
            if k not in used:
                used.add(k)
                keys.append(k)
        values = [_hex_key(rng, opts.key_style) for _ in keys]
        facts = [f'"{k}": "{v}",' for k, v in zip(keys, values)]
        pool: dict[int, str] = {}

        def source(i: int) -> str:
            if i not in pool:
                pool[i] = f'"{_hex_key(rng, opts.key_style)}": "{_hex_key(rng, opts.key_style)}",'
            return pool[i]

        head = ("TABLE = {\n" if fmt == "code" else
                "Extract the values corresponding to the specified keys in the JSON object below.\n\n"
                "JSON data:\n{\n")

        def build(hay: list[str]) -> str:
            body = _insert(hay, [((i + 0.5) / num_facts, f) for i, f in enumerate(facts)])
            return head + "".join(line + "\n" for line in body) + "}\n"

        context, n = _fill(tokenizer, source, build, length, "the fixed context")
        if fmt == "code":
            questions_for = [f'assert TABLE["{k}"] == "' for k in keys]
        else:
            questions_for = [f'\nKey: "{k}"\nThe value associated with the specified key is: "' for k in keys]
    else:
        lines = haystack if isinstance(haystack, list) else haystack_lines(haystack)
        used = set()
        keys = [_words_key(rng, used) for _ in range(num_facts)]
        values = [_number(rng, 7) for _ in keys]
        needles = [((i + 0.5) / num_facts, _needle(fmt, k, v)) for i, (k, v) in enumerate(zip(keys, values))]
        start = rng.randrange(len(lines))

        def build(hay: list[str]) -> str:
            return _NEEDLE_INTRO[fmt] + "".join(line + "\n" for line in _insert(hay, needles))

        context, n = _fill(tokenizer, lambda i: lines[(start + i) % len(lines)], build, length,
                           "the fixed context")
        questions_for = [_needle_question(fmt, k) for k in keys]
    asked = rng.sample(range(num_facts), num_questions)
    return FixedContextSample(context=context, questions=[questions_for[i] for i in asked],
                              answers=[[values[i]] for i in asked], length=length, num_tokens=n, kind=kind,
                              format=fmt, seed=s, index=index, keys=[keys[i] for i in asked])
