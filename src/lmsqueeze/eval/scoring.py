"""Scores of generated answers for the synthetic tasks (RULER's string match, plus a strict exact match)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")
_EDGE = " \t\"'`.,;:!?()[]{}<>"


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, surrounding whitespace goes."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` contained in the prediction (case-insensitive); RULER's NIAH/VT metric."""
    pred = clean_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any answer is contained in the prediction (case-insensitive); RULER's QA metric."""
    pred = clean_prediction(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


def first_answer(prediction: str) -> str:
    """The first line of the prediction without surrounding quotes, brackets and punctuation."""
    lines = clean_prediction(prediction).split("\n")
    return lines[0].strip(_EDGE) if lines else ""


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """Strict: one answer -> the first line, stripped of quotes/punctuation, equals it; several answers ->
    each appears as a separate item (split on commas, spaces, quotes) of the first line."""
    first = first_answer(prediction)
    if len(answers) == 1:
        return float(first == answers[0].strip())
    items = {t for t in re.split(r"[\s,;\"'\[\]{}()]+", first) if t}
    items |= {t.rstrip(".") for t in items}
    return float(all(a in items for a in answers))


def _natural(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def mean_by(records: Iterable[dict], keys: Sequence[str], metric: str) -> dict:
    """Mean of `metric` grouped by `keys` (nested dicts, one level per key; keys become strings)."""
    sums: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        sums[tuple(str(r[k]) for k in keys)].append(float(r[metric]))
    out: dict = {}
    for group, values in sorted(sums.items(), key=lambda kv: tuple(map(_natural, kv[0]))):
        node = out
        for g in group[:-1]:
            node = node.setdefault(g, {})
        node[group[-1]] = sum(values) / len(values)
    return out
