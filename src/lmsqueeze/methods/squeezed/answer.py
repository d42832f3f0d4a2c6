"""Answer many questions about one prepared fixed context (the Squeezed Attention use case in one function)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmsqueeze.errors import LmsqueezeError


@torch.inference_mode()
def answer_many(model, tokenizer, artifact, questions: Sequence[str], max_new_tokens: int = 32,
                chunk_size: int = 2048) -> list[str]:
    """Greedy answers to `questions` (text) after the context `artifact` holds (a prepared Squeezed Attention
    or fixed-context baseline artifact). One cache; cropped back to the context after every question, so each
    question sees exactly the prepared context and nothing is prefilled twice."""
    import lmsqueeze
    from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids

    if "context_ids" not in getattr(artifact, "tensors", {}):
        raise LmsqueezeError("answer_many needs a prepared fixed context: art = SqueezedAttention(...).prepare("
                             "model, context_ids) (or lmsqueeze.load_artifact(dir))")
    if max_new_tokens < 1:
        raise LmsqueezeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
    if any(not x for x in ids):
        raise LmsqueezeError("every question must hold at least one token")
    stops = stop_token_ids(tokenizer)
    answers = []
    with lmsqueeze.apply(model, artifact) as session:
        cache = session.new_cache(batch_size=1, max_length=max(len(x) for x in ids) + max_new_tokens)
        for x in ids:
            logits = prefill(model, torch.tensor(x), cache, chunk_size)
            out = greedy_decode(model, cache, logits, max_new_tokens, stops)
            cache.crop(-cache.get_seq_length())
            answers.append(tokenizer.decode(out, skip_special_tokens=True))
    return answers
