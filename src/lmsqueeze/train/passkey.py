"""A small passkey / needle retrieval check for training-time validation (until `lmsqueeze eval` lands).

Each case is `<bos>` + filler with one fact (needle) at a given depth + a question, then the answer, in
exactly `length` tokens. A case counts as retrieved when the argmax at every answer position equals the
answer token, which is the same as greedy decoding producing the answer. Code filler comes from the
held-out text (never trained on); prose filler is the classic "The grass is green. ..." text.

Formats (their prompt texts, answers in brackets):
- code:          `NAME = "value"` ... `assert NAME == "` [value]       (value: 8 random [a-z0-9])
- prose:         "The pass key is 68142. Remember it." ... "What is the pass key? The pass key is" [ 68142]
- prose_in_code: the prose fact and question inside code filler
- multikey:      4 facts "The special magic number for WORD is N." in prose; one is asked
- kv:            a `data = {"key": "value", ...}` block of min(32, length/64) hex pairs in code; `assert data["key"] == "` [value]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.train.synthetic import CLASSIC_FILLER, WORDS, random_alnum, random_digits

EVAL_FORMATS = ("code", "prose", "prose_in_code", "multikey", "kv")
EVAL_LENGTHS = (1024, 2048, 4096, 8192)


@dataclass(slots=True)
class Case:
    ids: np.ndarray  # [length] int64: bos, prompt, answer
    answer_len: int
    depth: float


class CaseBuilder:
    """Builds retrieval cases from a `tokenizers.Tokenizer` and held-out code tokens."""

    def __init__(self, encoder, bos_id: int, code_tokens: np.ndarray) -> None:
        self.encoder = encoder
        self.bos_id = bos_id
        self.code = np.asarray(code_tokens, dtype=np.int64)
        self.newline = np.zeros(encoder.get_vocab_size(), dtype=bool)
        for tok, i in encoder.get_vocab().items():
            if "Ċ" in tok:
                self.newline[i] = True
        self.classic = self.enc(" " + CLASSIC_FILLER)

    def enc(self, text: str) -> np.ndarray:
        return np.asarray(self.encoder.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def split_answer(self, query: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of query and answer as they appear in `query + answer`."""
        both, q = self.enc(query + answer), self.enc(query)
        if not np.array_equal(both[: len(q)], q):
            raise LmsqueezeError(f"query {query!r} and answer {answer!r} merge into one token; change the template")
        return q, both[len(q):]

    def filler(self, kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if kind == "prose":
            reps = n // len(self.classic) + 1
            toks = np.tile(self.classic, reps)[:n]
            return toks, np.arange(0, n + 1, len(self.classic))
        if len(self.code) < n + 1:
            raise LmsqueezeError(f"held-out code has {len(self.code)} tokens; {n} needed for one case")
        start = int(rng.integers(0, len(self.code) - n))
        toks = self.code[start:start + n]
        return toks, np.concatenate([[0], np.nonzero(self.newline[toks])[0] + 1])

    def case(self, fmt: str, length: int, depth: float, rng: np.random.Generator) -> Case:
        code = fmt in ("code", "prose_in_code", "kv")
        nl = "\n" if code else " "
        extra: list[np.ndarray] = []
        if fmt == "code":
            name = "_".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 2)).upper()
            value = random_alnum(rng, 8)
            fact = f'\n{name} = "{value}"\n'
            query, answer = f'\nassert {name} == "', value
        elif fmt in ("prose", "prose_in_code"):
            value = random_digits(rng, 5, 5)
            fact = f"{nl}The pass key is {value}. Remember it.{nl if code else ''}"
            query, answer = f"{nl}What is the pass key? The pass key is", f" {value}"
        elif fmt == "multikey":
            words = [WORDS[int(i)] for i in rng.choice(len(WORDS), size=4, replace=False)]
            values = [random_digits(rng, 6, 6) for _ in words]
            fact = f" The special magic number for {words[0]} is {values[0]}."
            extra = [self.enc(f" The special magic number for {w} is {v}.") for w, v in zip(words[1:], values[1:])]
            query = f" What is the special magic number for {words[0]}? The special magic number for {words[0]} is"
            answer = f" {values[0]}"
        elif fmt == "kv":
            n_pairs = max(2, min(32, length // 64))
            keys = [random_alnum(rng, 8, "0123456789abcdef") for _ in range(n_pairs)]
            vals = [random_alnum(rng, 8, "0123456789abcdef") for _ in range(n_pairs)]
            fact = "\ndata = {\n" + "".join(f'    "{k}": "{v}",\n' for k, v in zip(keys, vals)) + "}\n"
            i = int(rng.integers(0, n_pairs))
            query, answer = f'\nassert data["{keys[i]}"] == "', vals[i]
        else:
            raise LmsqueezeError(f"unknown passkey format {fmt!r}; use one of {', '.join(EVAL_FORMATS)}")
        fact_ids = self.enc(fact)
        q_ids, a_ids = self.split_answer(query, answer)
        n_fill = length - 1 - len(fact_ids) - len(q_ids) - len(a_ids) - sum(map(len, extra))
        if n_fill < 16:
            raise LmsqueezeError(f"length {length} is too short for a {fmt} case")
        toks, bounds = self.filler("code" if code else "prose", n_fill, rng)
        pos = int(bounds[np.argmin(np.abs(bounds - depth * n_fill))])
        events = [(pos, 0, fact_ids)]
        events += [(int(bounds[int(rng.integers(0, len(bounds)))]), 1 + j, e) for j, e in enumerate(extra)]
        events.sort(key=lambda e: (e[0], e[1]))
        parts, prev = [np.asarray([self.bos_id])], 0
        for p, _, ids in events:
            parts += [toks[prev:p], ids]
            prev = p
        parts += [toks[prev:], q_ids, a_ids]
        ids = np.concatenate(parts)
        assert len(ids) == length, (len(ids), length)
        return Case(ids, len(a_ids), depth)


def score_cases(logits_fn: Callable[[torch.Tensor, int], list[torch.Tensor]], cases: list[Case],
                batch_size: int, device: str | torch.device) -> list[float]:
    """Exact-match accuracy per pass. logits_fn(ids [B, T], keep) -> per-pass logits [B, keep, V] of the
    last `keep` positions."""
    hits: list[int] = []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i:i + batch_size]
        ids = torch.from_numpy(np.stack([c.ids for c in chunk])).to(device)
        keep = max(c.answer_len for c in chunk) + 1
        with torch.no_grad():
            per_pass = logits_fn(ids, keep)
        if not hits:
            hits = [0] * len(per_pass)
        for r, logits in enumerate(per_pass):
            pred = logits.argmax(-1).cpu()  # pred[:, j] predicts token T - keep + j + 1
            for b, c in enumerate(chunk):
                a = c.answer_len
                got = pred[b, keep - a - 1: keep - 1].numpy()
                hits[r] += int(np.array_equal(got, c.ids[-a:]))
    return [h / len(cases) for h in hits]


def passkey_suite(logits_fn, builder: CaseBuilder, lengths=EVAL_LENGTHS, formats=EVAL_FORMATS, n: int = 40,
                  seed: int = 1234, batch_size: int = 8, device: str | torch.device = "cpu") -> dict:
    """{format: {length: {"acc": [per pass], "n": n}}}; depths evenly spaced over (0, 1)."""
    out: dict = {}
    for fmt in formats:
        out[fmt] = {}
        for length in lengths:
            rng = np.random.default_rng([seed, length, EVAL_FORMATS.index(fmt) if fmt in EVAL_FORMATS else 99])
            cases = [builder.case(fmt, length, (j + 0.5) / n, rng) for j in range(n)]
            out[fmt][str(length)] = {"acc": score_cases(logits_fn, cases, batch_size, device), "n": n}
    return out
