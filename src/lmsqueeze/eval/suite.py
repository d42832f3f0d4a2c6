"""The synthetic long-context suite: tasks x formats x lengths x depths, greedy answers, string-match scores.

Each prompt is prefilled in chunks through a fresh cache of the method, then answered greedily (batch 1).
The primary score is RULER's string_match_all (fraction of expected strings found in the answer).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lmsqueeze.data.tasks import FORMATS, TASKS, TaskOptions, TaskSample, make_samples
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids
from lmsqueeze.eval.scoring import exact_match, mean_by, string_match_all

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SuiteConfig:
    """What to run. max_new_tokens None: the answers' token count + 8 per prompt."""

    tasks: Sequence[str] = TASKS
    lengths: Sequence[int] = (1024,)
    depths: Sequence[float] = (0.5,)
    samples: int = 1
    seed: int = 0
    formats: Sequence[str] = ("prose",)
    chunk_size: int = 2048
    max_new_tokens: int | None = None
    options: TaskOptions = field(default_factory=TaskOptions)

    def __post_init__(self) -> None:
        self.tasks, self.lengths = tuple(self.tasks), tuple(int(n) for n in self.lengths)
        self.depths, self.formats = tuple(float(d) for d in self.depths), tuple(self.formats)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise LmsqueezeError(f"unknown or no tasks {bad}; use some of {', '.join(TASKS)}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise LmsqueezeError(f"unknown or no formats {bad}; use some of {', '.join(FORMATS)}")
        if not self.lengths or min(self.lengths) <= 0:
            raise LmsqueezeError(f"lengths must be positive token counts, got {self.lengths}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise LmsqueezeError(f"depths must be in [0, 1], got {self.depths}")
        if self.samples <= 0:
            raise LmsqueezeError(f"samples must be positive, got {self.samples}")
        if self.chunk_size <= 0:
            raise LmsqueezeError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise LmsqueezeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "lengths": list(self.lengths), "depths": list(self.depths),
                "samples": self.samples, "seed": self.seed, "formats": list(self.formats),
                "chunk_size": self.chunk_size, "max_new_tokens": self.max_new_tokens,
                "options": asdict(self.options)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def answer_budget(tokenizer, answers: Sequence[str], max_new_tokens: int | None = None) -> int:
    """Tokens to generate for these answers: `max_new_tokens`, or their token count + 8."""
    if max_new_tokens is not None:
        return max_new_tokens
    return len(tokenizer(", ".join(answers), add_special_tokens=False)["input_ids"]) + 8


@torch.inference_mode()
def answer_prompt(model, tokenizer, session, prompt_ids: list[int], max_new_tokens: int,
                  chunk_size: int) -> str:
    """Prefill prompt_ids in chunks through a fresh cache of `session`, decode greedily, return the text."""
    cache = session.new_cache(batch_size=1, max_length=len(prompt_ids) + max_new_tokens)
    logits = prefill(model, torch.tensor(prompt_ids), cache, chunk_size)
    out = greedy_decode(model, cache, logits, max_new_tokens, stop_token_ids(tokenizer))
    return tokenizer.decode(out, skip_special_tokens=True)


def run_samples(model, tokenizer, samples: Sequence[TaskSample], method=None, chunk_size: int = 2048,
                max_new_tokens: int | None = None, progress: bool = True) -> list[dict]:
    """Answer each sample with `model` patched by `method`; one record (sample + prediction + scores) each."""
    from tqdm.auto import tqdm

    import lmsqueeze

    records = []
    with lmsqueeze.apply(model, method) as session:
        for s in tqdm(samples, desc="suite", unit="prompt", disable=not progress):
            ids = tokenizer(s.prompt)["input_ids"]
            budget = answer_budget(tokenizer, s.answers, max_new_tokens)
            t0 = time.perf_counter()
            pred = answer_prompt(model, tokenizer, session, ids, budget, chunk_size)
            records.append({
                "task": s.task, "format": s.format, "length": s.length, "depth": s.depth, "index": s.index,
                "seed": s.seed, "num_tokens": len(ids), "prompt_sha256": _sha(s.prompt), "answers": list(s.answers), "prediction": pred,
                "string_match_all": string_match_all(pred, s.answers), "exact_match": exact_match(pred, s.answers),
                "seconds": time.perf_counter() - t0,
            })
    return records


def summarize(records: Sequence[dict]) -> dict:
    """Per-task accuracy (string_match_all, the headline), exact match, and breakdowns by length/depth/format."""
    if not records:
        raise LmsqueezeError("no suite records to summarize; run at least one sample")
    acc = mean_by(records, ["task"], "string_match_all")
    return {
        "accuracy": acc,
        "mean_accuracy": sum(acc.values()) / len(acc),
        "exact_match": mean_by(records, ["task"], "exact_match"),
        "by_length": mean_by(records, ["task", "length"], "string_match_all"),
        "by_depth": mean_by(records, ["task", "depth"], "string_match_all"),
        "by_format": mean_by(records, ["task", "format"], "string_match_all"),
        "samples": len(records),
    }


def run_suite(model, tokenizer, haystack: str, method=None, config: SuiteConfig | None = None,
              progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate the suite from `haystack` (a corpus text), answer it, return (summary, records)."""
    config = config or SuiteConfig()
    samples = make_samples(config.tasks, tokenizer, haystack, config.lengths, config.depths, config.samples,
                           config.seed, config.formats, config.options)
    log.info("suite: %d prompts", len(samples))
    records = run_samples(model, tokenizer, samples, method, config.chunk_size, config.max_new_tokens, progress)
    return summarize(records), records
