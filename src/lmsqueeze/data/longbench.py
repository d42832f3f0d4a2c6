"""LongBench-format data from local JSONL files: loading, prompt templates, middle truncation.

A record holds `input` (the question), `context`, `answers` (list), `all_classes` (list or null),
`dataset`, `length` and `_id` (LongBench v1 layout). Prompt templates and answer lengths are LongBench's
(THUDM/LongBench `config/dataset2prompt.json`, `dataset2maxlen.json`). Long prompts are cut in the middle
(keep the first and last max_length/2 tokens), as LongBench's `pred.py` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

_ANSWER = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_CONCISE = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."
_QASPER = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
           "answered based on the information in the article, write \"unanswerable\". If the question is a "
           "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")

PROMPTS: dict[str, str] = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    f"the question {_CONCISE}\n\nStory: {{context}}\n\nNow, answer the question based on the story "
                    f"{_CONCISE}\n\nQuestion: {{input}}\n\nAnswer:"),
    "qasper": (f"You are given a scientific article and a question. Answer the question {_QASPER}\n\nArticle: "
               f"{{context}}\n\n Answer the question based on the above article {_QASPER}\n\nQuestion: {{input}}"
               "\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": f"{_ANSWER}\n\nThe following are given passages.\n{{context}}\n\n{_ANSWER}\n\nQuestion: {{input}}\nAnswer:",
    "2wikimqa": f"{_ANSWER}\n\nThe following are given passages.\n{{context}}\n\n{_ANSWER}\n\nQuestion: {{input}}\nAnswer:",
    "musique": f"{_ANSWER}\n\nThe following are given passages.\n{{context}}\n\n{_ANSWER}\n\nQuestion: {{input}}\nAnswer:",
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                      "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                      "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                      "\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
                             "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract."
                             "\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
                             "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
                             "The answer is: "),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

# LongBench applies no chat template to these few-shot / completion datasets
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
GENERIC_PROMPT = "{context}\n\nQuestion: {input}\nAnswer:"


@dataclass(slots=True)
class LongBenchSample:
    """One LongBench record. dataset: the name without LongBench-E's '_e' suffix."""

    input: str
    context: str
    answers: list[str]
    dataset: str
    all_classes: list[str] | None = None
    length: int = 0
    id: str = ""
    extra: dict = field(default_factory=dict)


def base_dataset(name: str) -> str:
    """'hotpotqa_e' -> 'hotpotqa' (LongBench-E files use the same templates and metrics)."""
    return name.removesuffix("_e")


def _parse(line: str, where: str, default_dataset: str) -> LongBenchSample:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise LmsqueezeError(f"{where} is not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(rec, dict):
        raise LmsqueezeError(f"{where} is not a JSON object; each line must be one LongBench record")
    missing = [k for k in ("input", "context", "answers") if k not in rec]
    if missing:
        raise LmsqueezeError(f"{where} lacks {', '.join(missing)}; LongBench records need input, context, answers")
    answers = rec["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise LmsqueezeError(f"{where}: answers must be a non-empty list of strings")
    dataset = base_dataset(str(rec.get("dataset") or default_dataset))
    known = {"input", "context", "answers", "all_classes", "dataset", "length", "_id"}
    return LongBenchSample(input=str(rec["input"] or ""), context=str(rec["context"] or ""),
                           answers=[str(a) for a in answers], dataset=dataset,
                           all_classes=rec.get("all_classes"), length=int(rec.get("length") or 0),
                           id=str(rec.get("_id", "")), extra={k: v for k, v in rec.items() if k not in known})


def load_longbench(path: str | Path, datasets: list[str] | None = None,
                   max_samples: int | None = None) -> list[LongBenchSample]:
    """Records from a JSONL file, or from every `*.jsonl` in a directory (the file stem names the dataset
    when a record has none). datasets: keep only these; max_samples: at most this many per dataset."""
    path = Path(path)
    if not path.exists():
        raise LmsqueezeError(f"LongBench data {path} does not exist; pass a JSONL file or a directory of them")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise LmsqueezeError(f"{path} holds no *.jsonl files; pass LongBench-format JSONL data")
    wanted = {base_dataset(d) for d in datasets} if datasets else None
    out: list[LongBenchSample] = []
    counts: dict[str, int] = {}
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                s = _parse(line, f"{f}:{n}", f.stem)
                if wanted is not None and s.dataset not in wanted:
                    continue
                if max_samples is not None and counts.get(s.dataset, 0) >= max_samples:
                    continue
                counts[s.dataset] = counts.get(s.dataset, 0) + 1
                out.append(s)
    if not out:
        raise LmsqueezeError(f"no LongBench records in {path}" + (f" for {sorted(wanted)}" if wanted else ""))
    return out


def build_prompt(sample: LongBenchSample, template: str | None = None) -> str:
    """The prompt text: LongBench's template for the sample's dataset (or `template`, or a generic one)."""
    template = template or PROMPTS.get(sample.dataset, GENERIC_PROMPT)
    return template.format(context=sample.context, input=sample.input)


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """Keep the first and last max_length // 2 tokens when `ids` is longer than `max_length`."""
    if max_length < 2:
        raise LmsqueezeError(f"max_length must be at least 2, got {max_length}")
    if len(ids) <= max_length:
        return list(ids)
    half = max_length // 2
    return list(ids[:half]) + list(ids[-half:])


def prompt_ids(tokenizer, sample: LongBenchSample, max_length: int, chat_template: bool = False) -> list[int]:
    """Token ids of the sample's prompt, cut in the middle to `max_length` tokens (before any chat template,
    as LongBench does); `chat_template` wraps it as a user turn except for NO_CHAT_TEMPLATE datasets."""
    text = build_prompt(sample)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_length:
        ids = truncate_middle(ids, max_length)
        text = tokenizer.decode(ids, skip_special_tokens=True)
    if chat_template and sample.dataset not in NO_CHAT_TEMPLATE:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LmsqueezeError("the tokenizer has no chat template; run without --chat-template")
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return tokenizer(text)["input_ids"]
