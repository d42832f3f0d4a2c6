"""Perplexity (per pass for looped models) and per-pass agreement with the final pass.

Protocol (the zoo cards use it): the text is tokenized without special tokens, cut into consecutive
chunks of `window - 1` tokens, and each chunk is scored as `<bos> + chunk`; every chunk token is
predicted (the first from `<bos>` alone). Perplexity = exp(total NLL / number of predicted tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor, int], list[torch.Tensor]]


def windows(tokens: np.ndarray, window: int, bos_id: int) -> list[np.ndarray]:
    """`<bos>` + consecutive chunks of window - 1 tokens (the last may be shorter)."""
    step = window - 1
    return [np.concatenate([[bos_id], tokens[i:i + step]]).astype(np.int64) for i in range(0, len(tokens), step)]


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, tokens: np.ndarray, window: int, bos_id: int, batch_size: int = 4,
               device: str | torch.device = "cpu", max_tokens: int | None = None) -> dict:
    """Per-pass perplexity and agreement of each pass's argmax with the last pass's.

    logits_fn(ids [B, T], keep) -> list of per-pass logits [B, keep, V] (keep = T here).
    Returns {"ppl": [per pass], "nll": [per pass], "agreement": [per pass], "tokens": n, "window": window}.
    """
    tokens = np.asarray(tokens if max_tokens is None else tokens[:max_tokens])
    wins = windows(tokens, window, bos_id)
    nll: list[float] = []
    agree: list[int] = []
    count = 0
    i = 0
    while i < len(wins):
        size = len(wins[i])
        chunk = [w for w in wins[i:i + batch_size] if len(w) == size]
        i += len(chunk)
        ids = torch.from_numpy(np.stack(chunk)).to(device)
        per_pass = logits_fn(ids, ids.shape[1])
        if not nll:
            nll, agree = [0.0] * len(per_pass), [0] * len(per_pass)
        targets = ids[:, 1:].reshape(-1)
        last = per_pass[-1][:, :-1].argmax(-1).reshape(-1)
        for r, logits in enumerate(per_pass):
            lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            nll[r] += float(F.cross_entropy(lg, targets, reduction="sum"))
            agree[r] += int((lg.argmax(-1) == last).sum())
        count += targets.numel()
    return {"ppl": [math.exp(x / count) for x in nll], "nll": [x / count for x in nll],
            "agreement": [a / count for a in agree], "tokens": count, "window": window}


def hf_logits_fn(model) -> LogitsFn:
    """logits_fn for a Hugging Face causal LM: one 'pass'."""
    def fn(ids: torch.Tensor, keep: int) -> list[torch.Tensor]:
        return [model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits]
    return fn


def looped_logits_fn(model) -> LogitsFn:
    """logits_fn for a `LoopedDecoder`: one entry per pass, the exit head applied to the last `keep` positions."""
    def fn(ids: torch.Tensor, keep: int) -> list[torch.Tensor]:
        return [model.exit_logits(h[:, -keep:]) for h in model.hidden_per_pass(ids)]
    return fn
