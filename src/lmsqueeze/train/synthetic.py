"""Synthetic retrieval sequences mixed into training, so the model learns to use its whole context.

A retrieval sequence is filler text (a window of the code corpus, or English prose) with needles
inserted at random depths and, later, queries whose continuation is the needle's value:

- code:     `NAME = "value"` ... `assert NAME == "value"`  (also int values and dict entries)
- prose:    "The pass key is 68142. Remember it." ... "What is the pass key? The pass key is 68142."
- kv:       a block of `"key": "value",` lines (or `key: value`) ... `assert data["key"] == "value"`
- multikey: several "The special magic number for NAME is N." needles, a query for some of them

The loss is the ordinary next-token loss over the whole sequence. Values are random, so the answer
tokens can only be predicted by finding the needle: on average more than half of the queries sit at the
very end of the sequence, far from their needle.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

from lmsqueeze.errors import LmsqueezeError

CLASSIC_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs past the old mill.", "A small boat drifts across the lake.", "The library opens at nine.",
    "Rain fell all night on the quiet town.", "The train was late again this morning.",
    "She planted tomatoes along the fence.", "The committee met to discuss the budget.",
    "Birds gathered on the wire at dusk.", "The museum added a new wing last year.",
    "He kept his notes in a blue folder.", "The market was crowded on Saturday.",
    "Snow covered the mountain pass.", "The recipe calls for two eggs and some flour.",
    "Children played in the park after school.", "The bridge was painted red in the spring.",
    "An old clock ticked in the hallway.", "The report was finished before the deadline.",
    "Wind moved through the tall pine trees.", "The coffee shop on the corner closed early.",
    "A letter arrived with no return address.", "The orchestra tuned their instruments.",
    "Lanterns lit the path to the house.", "The team reviewed the results twice.",
    "Waves broke gently on the sandy shore.", "The garden gate squeaked when it opened.",
    "Most of the guests arrived by bus.", "The old road winds through the valley.",
    "He repaired the bicycle in the garage.", "The files were sorted by date.",
    "Clouds gathered over the hills in the afternoon.", "The shop sells bread, cheese and fruit.",
    "A cat slept on the warm windowsill.", "The meeting was moved to Thursday.",
    "Fresh paint dried slowly in the cold room.", "The map showed three roads to the coast.",
)
WORDS = (
    "apple", "river", "falcon", "copper", "meadow", "silver", "harbor", "lantern", "canyon", "maple",
    "orbit", "pepper", "quartz", "rocket", "saddle", "timber", "velvet", "walnut", "zephyr", "anchor",
    "beacon", "cobalt", "dragon", "ember", "fjord", "garnet", "hazel", "island", "jasper", "kettle",
    "lemon", "marble", "nectar", "onyx", "pirate", "quiver", "raven", "summit", "tulip", "umber",
    "violet", "willow", "yonder", "badger", "cactus", "dolphin", "eagle", "forest", "glacier", "honey",
)
ADJECTIVES = (
    "ancient", "blue", "bold", "broken", "cheerful", "cosmic", "curious", "dark", "distant", "electric",
    "empty", "fancy", "frozen", "fuzzy", "giant", "green", "happy", "hidden", "lazy", "little", "loud",
    "lunar", "magic", "narrow", "orange", "polite", "purple", "royal", "rough", "secret", "shiny", "soft",
    "spicy", "steady", "sunny", "tall", "tiny", "urban", "warm", "young",
)
PROSE_NOUNS = ("pass key", "secret code", "magic number", "access code", "special number", "secret number")
INTROS = {
    "code": ("# A constant named {name} is defined somewhere in the code below. Remember its value.",
             "# Some constants holding secret values are defined in the code below. Remember their values.",
             "# Remember the values assigned below."),
    "prose": ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about the pass key.",
              "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.", INSTRUCTION),
    "kv": ("# Find the value stored under the given key in the dict below.",
           "Extract the value corresponding to the specified key in the JSON object below."),
}
FORMATS = ("code", "prose", "kv", "multikey")
FILLERS = ("code", "prose_repeat", "prose_random")


@dataclass(slots=True)
class RetrievalMix:
    """Share of training sequences that are retrieval sequences, and their formats and fillers."""

    fraction: float = 0.5
    formats: dict[str, float] = field(default_factory=lambda: {"code": 0.4, "prose": 0.2, "kv": 0.15,
                                                                "multikey": 0.25})
    fillers: dict[str, float] = field(default_factory=lambda: {"code": 0.6, "prose_repeat": 0.15,
                                                                "prose_random": 0.25})
    needle_counts: dict[int, float] = field(default_factory=lambda: {1: 0.5, 2: 0.2, 3: 0.15, 4: 0.15})
    end_query_prob: float = 0.6  # a query at the very end (longest distance), else anywhere after its needle
    intro_prob: float = 0.3  # start the sequence with an instruction line
    early_fact_prob: float = 0.0  # put a fact in the first quarter of the filler (long distances to its query)

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise LmsqueezeError(f"retrieval fraction {self.fraction} must be in [0, 1]")
        for name, table, allowed in (("formats", self.formats, FORMATS), ("fillers", self.fillers, FILLERS)):
            bad = set(table) - set(allowed)
            if bad or not table or min(table.values()) < 0 or sum(table.values()) <= 0:
                raise LmsqueezeError(f"retrieval {name} {table} must be non-negative weights over {allowed}")
        if not 0 <= self.early_fact_prob <= 1:
            raise LmsqueezeError(f"early_fact_prob {self.early_fact_prob} must be in [0, 1]")
        if not self.needle_counts or min(self.needle_counts) < 1:
            raise LmsqueezeError(f"needle_counts {self.needle_counts} must map counts >= 1 to weights")

    def describe(self) -> dict:
        return {"fraction_of_sequences": self.fraction, "formats": self.formats, "fillers": self.fillers,
                "needles_per_sequence": {str(k): v for k, v in self.needle_counts.items()},
                "end_query_prob": self.end_query_prob, "intro_prob": self.intro_prob,
                "early_fact_prob": self.early_fact_prob}


@dataclass(slots=True)
class Needle:
    """One fact and its question: the query text is followed by `answer` then `after`."""

    fact: str
    query: str
    answer: str
    after: str


def _choice(rng: np.random.Generator, table: dict):
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def random_digits(rng: np.random.Generator, lo: int = 4, hi: int = 9) -> str:
    n = int(rng.integers(lo, hi + 1))
    return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, n - 1))


def random_alnum(rng: np.random.Generator, n: int, alphabet: str = string.ascii_lowercase + string.digits) -> str:
    return "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), n))


def random_hex_key(rng: np.random.Generator) -> str:
    """An 8- or 16-hex-digit key or a uuid-style key."""
    r = rng.random()
    if r < 0.35:
        return random_alnum(rng, 8, "0123456789abcdef")
    if r < 0.6:
        return random_alnum(rng, 16, "0123456789abcdef")
    h = random_alnum(rng, 32, "0123456789abcdef")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def random_key(rng: np.random.Generator) -> str:
    """A two-word key such as 'shiny-falcon'."""
    return f"{_pick(rng, ADJECTIVES)}-{_pick(rng, WORDS)}"


def random_name(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.15:
        return "PASS_KEY"
    if r < 0.5:
        return random_key(rng).replace("-", "_").upper()
    words = [_pick(rng, WORDS) for _ in range(int(rng.integers(1, 4)))]
    if rng.random() < 0.3:
        words.append(str(int(rng.integers(0, 100))))
    name = "_".join(words)
    return name.upper() if rng.random() < 0.6 else name


def random_value(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.5:
        return random_digits(rng, 4, 8)
    if r < 0.75:
        return random_alnum(rng, int(rng.integers(6, 11)))
    return "-".join(_pick(rng, WORDS) for _ in range(int(rng.integers(2, 4))))


def code_needle(rng: np.random.Generator, name: str | None = None) -> Needle:
    name = name or random_name(rng)
    value = random_value(rng)
    style = rng.random()
    if style < 0.7:
        return Needle(f'{name} = "{value}"', f'assert {name} == "', value, '"')
    if style < 0.85:
        value = random_digits(rng)
        return Needle(f"{name} = {value}", f"assert {name} == ", value, "")
    key = name.lower()
    return Needle(f'config["{key}"] = "{value}"', f'assert config["{key}"] == "', value, '"')


def prose_needle(rng: np.random.Generator, qualifier: str = "") -> Needle:
    noun = _pick(rng, PROSE_NOUNS) + qualifier
    value = random_digits(rng, 4, 8) if rng.random() < 0.85 else random_value(rng)
    style = rng.random()
    if style < 0.45:
        fact = f"The {noun} is {value}. Remember it. {value} is the {noun}."
    elif style < 0.8:
        fact = f"The {noun} is {value}. Remember it."
    else:
        fact = f"Remember this: the {noun} is {value}."
    return Needle(fact, f"What is the {noun}? The {noun} is", f" {value}", ".")


def magic_number_needle(rng: np.random.Generator, key: str) -> Needle:
    """A multi-key needle: 'The special magic number for KEY is N.' in one of two wordings."""
    value = random_digits(rng, 5, 8)
    if rng.random() < 0.5:
        return Needle(f"One of the special magic numbers for {key} is: {value}.",
                      f"What is the special magic number for {key} mentioned in the provided text? "
                      f"The special magic number for {key} mentioned in the provided text is", f" {value}", ".")
    return Needle(f"The special magic number for {key} is {value}.",
                  f"What is the special magic number for {key}? The special magic number for {key} is",
                  f" {value}", ".")


def multikey_needles(rng: np.random.Generator, k: int) -> list[Needle]:
    keys: list[str] = []
    while len(keys) < k:
        key = random_key(rng) if rng.random() < 0.6 else _pick(rng, WORDS)
        if key not in keys:
            keys.append(key)
    return [magic_number_needle(rng, key) for key in keys]


def kv_block(rng: np.random.Generator, n_pairs: int, n_queries: int) -> tuple[str, list[Needle]]:
    """A block of random hex key/value pairs and `n_queries` questions about some of them."""
    keys = [random_hex_key(rng) for _ in range(n_pairs)]
    vals = [random_hex_key(rng) for _ in range(n_pairs)]
    asked = rng.choice(n_pairs, size=min(n_queries, n_pairs), replace=False)
    style = rng.random()
    if style < 0.4:
        var = _pick(rng, ("data", "TABLE", "table", "mapping"))
        body = f"{var} = {{\n" + "".join(f'    "{k}": "{v}",\n' for k, v in zip(keys, vals)) + "}"
        qs = [Needle("", f'assert {var}["{keys[i]}"] == "', vals[i], '"') for i in asked]
    elif style < 0.75:
        body = "JSON data:\n{\n" + "".join(f'"{k}": "{v}",\n' for k, v in zip(keys, vals)) + "}"
        qs = [Needle("", f'Key: "{keys[i]}"\nThe value associated with the specified key is: "', vals[i], '"')
              for i in asked]
    else:
        body = "\n".join(f"{k}: {v}" for k, v in zip(keys, vals))
        qs = [Needle("", f"The value of {keys[i]} is", f" {vals[i]}", ".") for i in asked]
    return body, qs


class RetrievalSynth:
    """Builds retrieval sequences of exact token lengths from needles, queries and filler."""

    def __init__(self, encoder, mix: RetrievalMix = RetrievalMix()) -> None:
        """encoder: a `tokenizers.Tokenizer` (ids without special tokens)."""
        self.encoder = encoder
        self.mix = mix
        vocab = encoder.get_vocab_size()
        self.newline = np.zeros(vocab, dtype=bool)
        for tok, i in encoder.get_vocab().items():
            if "Ċ" in tok:  # byte-level encoding of "\n"
                self.newline[i] = True
        self.classic = self._enc(" " + CLASSIC_FILLER)
        self.sentences = [self._enc(" " + s) for s in SENTENCES]

    def _enc(self, text: str) -> np.ndarray:
        return np.asarray(self.encoder.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    # filler -----------------------------------------------------------------------------------
    def prose_filler(self, rng: np.random.Generator, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """n tokens of prose and the token offsets where a sentence starts."""
        parts, bounds, total = [], [], 0
        while total < n:
            piece = self.classic if kind == "prose_repeat" else self.sentences[int(rng.integers(0, len(self.sentences)))]
            bounds.append(total)
            parts.append(piece)
            total += len(piece)
        return np.concatenate(parts)[:n], np.asarray([b for b in bounds if b <= n], dtype=np.int64)

    def code_filler(self, rng: np.random.Generator, n: int, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """n tokens of a random window of the code stream and the offsets just after a newline."""
        if len(stream) < n + 1:
            raise LmsqueezeError(f"code stream has {len(stream)} tokens, fewer than the {n} needed for filler")
        start = int(rng.integers(0, len(stream) - n))
        toks = stream[start:start + n].astype(np.int64)
        return toks, np.nonzero(self.newline[toks])[0] + 1

    # needles ----------------------------------------------------------------------------------
    def _needles(self, rng: np.random.Generator, fmt: str, length: int,
                 k: int | None = None) -> tuple[list[str], list[tuple[int, Needle]]]:
        """Facts (texts) and queries (index of their fact, needle)."""
        k = k or int(_choice(rng, self.mix.needle_counts))
        if fmt == "kv":  # a small block, or one filling up to ~70% of the sequence (<= 60 tokens a pair)
            top = max(5, length * 7 // 10 // 60) if rng.random() < 0.4 else max(5, min(64, length // 100))
            body, qs = kv_block(rng, int(rng.integers(4, top)), k)
            return [body], [(0, q) for q in qs]
        if fmt == "multikey":
            needles = multikey_needles(rng, max(k, 2))
        elif fmt == "code":
            names = {random_name(rng) for _ in range(k)}
            needles = [code_needle(rng, name) for name in names]
        else:
            needles = [prose_needle(rng, f" for {WORDS[int(i)]}" if k > 1 else "")
                       for i in rng.choice(len(WORDS), size=k, replace=False)]
        k = len(needles)
        asked = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
        return [n.fact for n in needles], [(int(i), needles[int(i)]) for i in asked]

    def sequence(self, rng: np.random.Generator, length: int, stream: np.ndarray,
                 fmt: str | None = None, filler: str | None = None) -> np.ndarray:
        """A retrieval sequence of exactly `length` tokens (int64), without BOS."""
        fmt = fmt or _choice(rng, self.mix.formats)
        filler = filler or _choice(rng, self.mix.fillers)
        code = filler == "code"
        for attempt in range(4):  # resample needles that leave less than a quarter for filler
            facts, queries = self._needles(rng, fmt, length) if attempt < 3 else self._needles(rng, "prose", length, 1)
            wrap_fact = (lambda s: "\n" + s + "\n") if code else (lambda s: " " + s)
            fact_ids = [self._enc(wrap_fact(f)) for f in facts]
            query_ids = [self._enc(("\n" if code else " ") + q.query + q.answer + q.after + ("\n" if code else ""))
                         for _, q in queries]
            intro = np.zeros(0, dtype=np.int64)
            if rng.random() < self.mix.intro_prob:
                group = "prose" if fmt == "multikey" else fmt
                text = _pick(rng, INTROS[group]).replace("{name}", facts[0].split(" = ")[0])
                intro = self._enc(text + "\n")
            n_fill = length - len(intro) - sum(map(len, fact_ids)) - sum(map(len, query_ids))
            if n_fill >= length // 4:
                break
        else:
            raise LmsqueezeError(f"sequence length {length} is too short for retrieval needles; use >= 256")
        if code:
            toks, bounds = self.code_filler(rng, n_fill, stream)
        else:
            toks, bounds = self.prose_filler(rng, n_fill, filler)
        bounds = bounds if len(bounds) else np.arange(n_fill + 1)
        early = max(1, (len(bounds) + 3) // 4)
        fact_pos = [int(bounds[int(rng.integers(0, early if self.mix.early_fact_prob > 0 and rng.random() < self.mix.early_fact_prob else len(bounds)))])
                    for _ in fact_ids]
        events = [(p, 0, i, ids) for i, (p, ids) in enumerate(zip(fact_pos, fact_ids))]
        for j, ((fi, _), ids) in enumerate(zip(queries, query_ids)):
            after = bounds[bounds >= fact_pos[fi]]
            if rng.random() < self.mix.end_query_prob or len(after) == 0:
                p = n_fill
            else:
                p = int(after[int(rng.integers(0, len(after)))])
            events.append((p, 1, j, ids))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        out, prev = [intro], 0
        for p, _, _, ids in events:
            out.append(toks[prev:p])
            out.append(ids)
            prev = p
        out.append(toks[prev:])
        seq = np.concatenate(out)
        assert len(seq) == length, (len(seq), length)
        return seq
