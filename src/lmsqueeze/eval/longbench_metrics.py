"""LongBench's metrics (English datasets), written without extra dependencies.

Same definitions as THUDM/LongBench `metrics.py` except where noted:
- rouge_l: ROUGE-L F1 from the longest common subsequence of whitespace tokens (LongBench calls the
  `rouge` package, which splits sentences on '.' and takes a summary-level union LCS; values can differ).
- code_sim_score: 2 * LCS(chars) / (len(a) + len(b)), the Levenshtein ratio with substitution cost 2 that
  fuzzywuzzy's `fuzz.ratio` computes, without rounding to an integer percent.
- classification_score: matched class names that are strict substrings of the answer are dropped, and the
  score is 1 / (number of remaining matches) when the answer is among them (LongBench's intent; its loop
  removes items from the list it iterates over).
A sample's score is the maximum over its reference answers; a dataset's score is 100 x the mean.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from lmsqueeze.errors import LmsqueezeError

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD style)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    """Token F1 of the normalized prediction and reference."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(reference).split())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F1: P = LCS / len(prediction tokens), R = LCS / len(reference tokens), F = 2PR / (P + R)."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """Edit similarity of the first prediction line that holds no '`', '#' or '//' with the reference."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    if not line or not reference:
        return 0.0
    return 2 * lcs_length(line, reference) / (len(line) + len(reference))


def classification_score(prediction: str, reference: str, all_classes: Sequence[str] | None = None,
                         **_) -> float:
    """1 / (number of class names found in the prediction) if the reference class is among them, else 0."""
    if not all_classes:
        raise LmsqueezeError("classification_score needs all_classes; the record must list them")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _count_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Fraction of the numbers in the prediction equal to N of the reference 'Paragraph N'."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise LmsqueezeError(f"retrieval reference {reference!r} has no 'Paragraph N'")
    return _count_equal(prediction, found[0])


def count_score(prediction: str, reference: str, **_) -> float:
    """Fraction of the numbers in the prediction equal to the reference count."""
    return _count_equal(prediction, str(reference).strip())


Metric = Callable[..., float]
DATASET_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "triviaqa": qa_f1_score,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "samsum": rouge_l,
    "trec": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})  # few-shot: score the first line only


def metric_for(dataset: str) -> Metric:
    if dataset not in DATASET_METRICS:
        raise LmsqueezeError(f"no metric for LongBench dataset {dataset!r}; supported: "
                             f"{', '.join(sorted(DATASET_METRICS))}")
    return DATASET_METRICS[dataset]


def score_sample(dataset: str, prediction: str, answers: Sequence[str],
                 all_classes: Sequence[str] | None = None) -> float:
    """The sample's score in [0, 1]: the best over its reference answers."""
    metric = metric_for(dataset)
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(metric(prediction, a, all_classes=all_classes) for a in answers)


def score_dataset(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                  all_classes: Sequence[Sequence[str] | None] | None = None) -> float:
    """100 x the mean sample score, rounded to 2 decimals (LongBench's `eval.py`)."""
    if not predictions or len(predictions) != len(answers):
        raise LmsqueezeError("score_dataset needs one prediction per answer list, and at least one")
    classes = all_classes or [None] * len(predictions)
    total = sum(score_sample(dataset, p, a, c) for p, a, c in zip(predictions, answers, classes))
    return round(100 * total / len(predictions), 2)
