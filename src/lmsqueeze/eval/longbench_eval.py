"""Run LongBench-format samples through a model patched with a method, and score them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lmsqueeze.data.longbench import MAX_NEW_TOKENS, LongBenchSample, prompt_ids
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.longbench_metrics import metric_for, score_sample
from lmsqueeze.eval.suite import answer_prompt

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LongBenchConfig:
    """max_length: prompt tokens kept (middle truncation); max_new_tokens None: LongBench's per-dataset
    value (64 for unknown datasets); chat_template: wrap prompts as a user turn (instruct models)."""

    max_length: int = 31500
    chunk_size: int = 2048
    max_new_tokens: int | None = None
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise LmsqueezeError(f"max_length must be at least 2, got {self.max_length}")
        if self.chunk_size <= 0:
            raise LmsqueezeError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise LmsqueezeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")


def run_longbench(model, tokenizer, samples: Sequence[LongBenchSample], method=None,
                  config: LongBenchConfig | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Answer every sample greedily with `model` patched by `method`; return (summary, records).

    summary: {'scores': {dataset: 0-100}, 'average': mean over datasets, 'samples': {dataset: n}}.
    """
    from tqdm.auto import tqdm

    import lmsqueeze

    config = config or LongBenchConfig()
    if not samples:
        raise LmsqueezeError("no LongBench samples to run")
    for s in samples:
        metric_for(s.dataset)  # fail before any model work on an unsupported dataset
    records = []
    with lmsqueeze.apply(model, method) as session:
        for s in tqdm(samples, desc="longbench", unit="sample", disable=not progress):
            ids = prompt_ids(tokenizer, s, config.max_length, config.chat_template)
            budget = config.max_new_tokens or MAX_NEW_TOKENS.get(s.dataset, 64)
            pred = answer_prompt(model, tokenizer, session, ids, budget, config.chunk_size)
            records.append({"dataset": s.dataset, "id": s.id, "length": s.length, "num_tokens": len(ids),
                            "answers": list(s.answers), "prediction": pred,
                            "score": score_sample(s.dataset, pred, s.answers, s.all_classes)})
    scores: dict[str, list[float]] = {}
    for r in records:
        scores.setdefault(r["dataset"], []).append(r["score"])
    by_dataset = {d: round(100 * sum(v) / len(v), 2) for d, v in sorted(scores.items())}
    return ({"scores": by_dataset, "average": round(sum(by_dataset.values()) / len(by_dataset), 2),
             "samples": {d: len(v) for d, v in sorted(scores.items())}}, records)
