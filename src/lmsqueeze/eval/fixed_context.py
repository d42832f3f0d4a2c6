"""Fixed-context mode: one long context prefilled once, many questions answered after it.

Each question sees exactly the prepared context: after answering, the cache is cropped back to the context
length (`cache.crop(-n)`), or, for a method whose cache cannot roll back, every question starts from a
copy of the cache taken right after the context prefill. This is how Squeezed Attention and serving use
a cache: the context is prepared offline, the questions arrive later.

A method that prepares a fixed context (Squeezed Attention, the fixed-context baselines: anything with a
`prepare(model, ids)`) is prepared once per context here; an artifact that already holds its context's KV
(`tensors["context_ids"]`) is used as is: the context is not prefilled again, the cache starts empty after it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmsqueeze.data.tasks import FixedContextSample
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids
from lmsqueeze.eval.scoring import exact_match, string_match_all
from lmsqueeze.eval.suite import answer_budget

log = logging.getLogger(__name__)
ROLLBACKS = ("auto", "crop", "copy")


@dataclass(slots=True)
class FixedContextConfig:
    """rollback: 'crop' (cache.crop back to the context), 'copy' (a copy of the prepared cache per question)
    or 'auto' (crop when the cache supports it); max_new_tokens None: answer tokens + 8."""

    chunk_size: int = 2048
    max_new_tokens: int | None = None
    rollback: str = "auto"

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise LmsqueezeError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise LmsqueezeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.rollback not in ROLLBACKS:
            raise LmsqueezeError(f"unknown rollback {self.rollback!r}; use one of {', '.join(ROLLBACKS)}")


def _croppable(cache) -> bool:
    return all(getattr(layer, "is_croppable", False) for layer in getattr(cache, "layers", [])) and hasattr(
        cache, "crop")


def prepared_context(method) -> torch.Tensor | None:
    """The fixed context's token ids ([S] int64) an artifact already holds, or None."""
    tensors = getattr(method, "tensors", None)
    return tensors.get("context_ids") if isinstance(tensors, dict) else None


def prepares_context(method) -> bool:
    """Whether `method` is a config that must prepare each fixed context (e.g. SqueezedAttention, Quest)."""
    return method is not None and not hasattr(method, "tensors") and callable(getattr(method, "prepare", None))


def check_prepared(method, context_ids: list[int]) -> bool:
    """True when `method` is an artifact holding exactly `context_ids`; raises if it holds another context."""
    held = prepared_context(method)
    if held is None:
        return False
    if held.numel() != len(context_ids) or not torch.equal(held.cpu().long(), torch.tensor(context_ids)):
        raise LmsqueezeError(f"the artifact was prepared for another fixed context ({held.numel()} tokens); pass "
                             "the method config to prepare each context, or an artifact of this context")
    return True


@torch.inference_mode()
def answer_questions(model, tokenizer, session, context_ids: list[int], questions: Sequence[list[int]],
                     budgets: Sequence[int], config: FixedContextConfig,
                     context_in_cache: bool = False) -> tuple[list[list[int]], dict]:
    """Prefill context_ids once (not when `context_in_cache`: the session's artifact already holds its KV),
    then answer each question (token ids) greedily from that same state.

    Returns (generated token ids per question, timings in seconds: 'context', 'questions').
    """
    stops = stop_token_ids(tokenizer)
    longest = max(len(q) + b for q, b in zip(questions, budgets))
    cache = session.new_cache(batch_size=1, max_length=(0 if context_in_cache else len(context_ids)) + longest)
    t0 = time.perf_counter()
    if not context_in_cache:
        prefill(model, torch.tensor(context_ids), cache, config.chunk_size)
    t_context = time.perf_counter() - t0
    ctx_len = cache.get_seq_length()
    mode = config.rollback
    if mode == "auto":
        mode = "crop" if _croppable(cache) else "copy"
    if mode == "crop" and not _croppable(cache):
        raise LmsqueezeError("this method's cache cannot be cropped; use rollback='copy'")
    prepared = copy.deepcopy(cache) if mode == "copy" else None
    outputs = []
    t1 = time.perf_counter()
    for q, budget in zip(questions, budgets):
        work = copy.deepcopy(prepared) if mode == "copy" else cache
        logits = prefill(model, torch.tensor(q), work, config.chunk_size)
        outputs.append(greedy_decode(model, work, logits, budget, stops))
        if mode == "crop":
            extra = work.get_seq_length() - ctx_len
            if extra > 0:
                work.crop(-extra)
            if work.get_seq_length() != ctx_len:
                raise LmsqueezeError(f"the cache did not roll back to the context ({work.get_seq_length()} "
                                     f"tokens, expected {ctx_len}); use rollback='copy'")
    timings = {"context": t_context, "questions": time.perf_counter() - t1, "rollback": mode}
    return outputs, timings


def run_fixed_context(model, tokenizer, samples: Sequence[FixedContextSample], method=None,
                      config: FixedContextConfig | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Answer every question of every sample after one prefill (or one `prepare`) of its context; return
    (summary, records). method: None (dense), an artifact, or a fixed-context method config (prepared per
    context; 'seconds_context_prefill' then counts the prepare)."""
    from tqdm.auto import tqdm

    import lmsqueeze

    config = config or FixedContextConfig()
    if not samples:
        raise LmsqueezeError("no fixed-context samples; generate at least one")
    records: list[dict] = []
    t_ctx = t_q = 0.0
    for s in tqdm(samples, desc="fixed-context", unit="context", disable=not progress):
        ctx = tokenizer(s.context)["input_ids"]
        qs = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in s.questions]
        budgets = [answer_budget(tokenizer, a, config.max_new_tokens) for a in s.answers]
        t0 = time.perf_counter()
        art = method.prepare(model, ctx, config.chunk_size) if prepares_context(method) else method
        t_prep = time.perf_counter() - t0
        in_cache = check_prepared(art, ctx)
        with lmsqueeze.apply(model, art) as session:
            outs, timings = answer_questions(model, tokenizer, session, ctx, qs, budgets, config, in_cache)
        t_ctx, t_q = t_ctx + t_prep + timings["context"], t_q + timings["questions"]
        for i, (q, ans, out) in enumerate(zip(s.questions, s.answers, outs)):
            pred = tokenizer.decode(out, skip_special_tokens=True)
            records.append({
                "context": s.index, "question": i, "kind": s.kind, "format": s.format, "length": s.length,
                "num_tokens": len(ctx), "key": s.keys[i] if i < len(s.keys) else "", "answers": list(ans),
                "prediction": pred, "string_match_all": string_match_all(pred, ans),
                "exact_match": exact_match(pred, ans), "rollback": timings["rollback"],
            })
    n = len(records)
    summary = {
        "accuracy": sum(r["string_match_all"] for r in records) / n,
        "exact_match": sum(r["exact_match"] for r in records) / n,
        "contexts": len(samples), "questions": n,
        "seconds_context_prefill": t_ctx, "seconds_questions": t_q, "seconds_per_question": t_q / n,
    }
    return summary, records
