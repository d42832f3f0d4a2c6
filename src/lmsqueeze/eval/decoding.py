"""Chunked prefill and greedy decoding through one cache: the only way the harness calls a model.

Every evaluation (perplexity, the suite, fixed-context QA, LongBench) feeds tokens through these two
functions inside `lmsqueeze.apply(...)`, so every method runs the same code path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.compat import cache_kw


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise LmsqueezeError(f"chunk_size must be positive, got {chunk_size}")


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, chunk_size: int = 2048,
            on_logits: Callable[[int, torch.Tensor], None] | None = None,
            keep: Callable[[int, int], int] | None = None) -> torch.Tensor:
    """Feed ids: [1, T] (or [T]) through `cache` in chunks of `chunk_size`; return the last logits: [V].

    keep(start, end): how many logits (a suffix of the chunk [start, end)) the caller needs; default 1.
    on_logits(start, logits): receives logits: [k, V] for the last k positions of each chunk (k >= 1).
    """
    check_chunk_size(chunk_size)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1 or ids.shape[1] == 0:
        raise LmsqueezeError(f"prefill takes one non-empty sequence, got ids of shape {tuple(ids.shape)}")
    ids = ids.to(model.device)
    T = ids.shape[1]
    last = None
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        k = 1 if keep is None else max(1, min(keep(start, end), end - start))
        logits = model(input_ids=ids[:, start:end], **cache_kw(model, cache), use_cache=True,
                       logits_to_keep=k).logits[0]
        if on_logits is not None:
            on_logits(end - k, logits)
        last = logits[-1]
    return last


@torch.inference_mode()
def greedy_decode(model, cache, first_logits: torch.Tensor, max_new_tokens: int,
                  stop_ids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens after a prefill: first_logits: [V] are the logits of the last prompt token.

    Stops after `max_new_tokens` or at a token in `stop_ids` (not included). The cache grows by the
    number of tokens fed back (all generated tokens but the last).
    """
    out: list[int] = []
    logits = first_logits
    for step in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok in stop_ids:
            break
        out.append(tok)
        if step + 1 == max_new_tokens:
            break
        ids = torch.tensor([[tok]], device=model.device)
        logits = model(input_ids=ids, **cache_kw(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    return out


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's end-of-sequence ids (empty when it has none)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])
