"""Perplexity over a token stream with sliding windows, one code path for every method.

Windows follow the Hugging Face perplexity guide: window i covers tokens [i*stride, i*stride + context_length)
and scores only the tokens no earlier window scored, each predicted from the tokens before it inside its
window. With stride < context_length every token after the first is scored exactly once; with disjoint
windows (stride == context_length) the first token of each window has no context and is not scored. Each window runs through a fresh cache of the method in
chunks of `chunk_size` tokens, so long windows fit in memory and the method's cache is filled incrementally.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.decoding import prefill

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PerplexityConfig:
    """context_length: tokens per window; stride: window step (None = context_length); chunk_size: tokens
    per forward call inside a window; max_tokens: cut the stream to this many tokens (None = all)."""

    context_length: int = 2048
    stride: int | None = None
    chunk_size: int = 2048
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise LmsqueezeError(f"context_length must be at least 2, got {self.context_length}")
        if self.stride is None:
            self.stride = self.context_length
        if not 1 <= self.stride <= self.context_length:
            raise LmsqueezeError(
                f"stride must be in [1, context_length={self.context_length}], got {self.stride}"
            )
        if self.chunk_size <= 0:
            raise LmsqueezeError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise LmsqueezeError(f"max_tokens must be at least 2, got {self.max_tokens}")


@dataclass(slots=True)
class PerplexityResult:
    """nll: mean negative log-likelihood per scored token (nats); ppl = exp(nll)."""

    nll: float
    ppl: float
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: the window is tokens [begin, end); tokens
    [first_scored, end) are scored, each predicted from the tokens before it inside the window."""
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return out


def _window_nll(model, session, ids: torch.Tensor, begin: int, end: int, first: int,
                chunk_size: int) -> float:
    """Sum of -log p(ids[t] | ids[begin:t]) for t in [first, end). ids: [N] on the model's device."""
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    cache = session.new_cache(batch_size=1, max_length=end - begin)

    def keep(start: int, stop: int) -> int:  # logits needed in chunk [start, stop) (window-relative)
        return stop - max(start, first - 1 - begin)

    def score(start: int, logits: torch.Tensor) -> None:  # logits: [k, V] for window positions start..
        nonlocal total
        pos = begin + start + torch.arange(logits.shape[0], device=ids.device)
        sel = (pos >= first - 1) & (pos < end - 1)
        if bool(sel.any()):
            targets = ids[pos[sel] + 1]
            nll = torch.nn.functional.cross_entropy(logits[sel].float(), targets, reduction="sum")
            total = total + nll.double()

    prefill(model, ids[begin:end], cache, chunk_size, on_logits=score, keep=keep)
    return float(total)


def perplexity(model, token_ids: Sequence[int] | torch.Tensor, method=None,
               config: PerplexityConfig | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` patched with `method` (an artifact, a method config, or None = Dense).

    token_ids: [N] one token stream. Each window runs inside `lmsqueeze.apply(model, method)`.
    """
    from tqdm.auto import tqdm

    import lmsqueeze

    config = config or PerplexityConfig()
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if config.max_tokens is not None:
        ids = ids[: config.max_tokens]
    if ids.numel() < 2:
        raise LmsqueezeError(f"perplexity needs at least 2 tokens, got {ids.numel()}; give more text")
    ids = ids.to(model.device)
    spans = sliding_windows(ids.numel(), config.context_length, config.stride)
    total, count = 0.0, 0
    with lmsqueeze.apply(model, method) as session, torch.inference_mode():
        bar = tqdm(total=sum(e - f for _, e, f in spans), unit="tok", desc="perplexity", disable=not progress)
        for begin, end, first in spans:
            total += _window_nll(model, session, ids, begin, end, first, config.chunk_size)
            count += end - first
            bar.update(end - first)
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
        bar.close()
    nll = total / count
    log.info("perplexity %.4f over %d tokens in %d windows", math.exp(nll), count, len(spans))
    return PerplexityResult(nll=nll, ppl=math.exp(nll), tokens=count, windows=len(spans))
