"""`lmsqueeze.generate`: chunked prefill, then a one-token decode step replayed from a CUDA graph.

The decode step (model forward on one token per sequence, token selection, advancing positions and the
cache's device-side lengths) is captured once per (model, method, batch, max length, sampling) and replayed
per token. On the CPU the same step runs eagerly. See docs/architecture.md for what a backend must do to be
captured.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.compat import cache_kw
from lmsqueeze.sampling import Sampling, select_tokens
from lmsqueeze.session import apply

log = logging.getLogger(__name__)

LENGTH_BUCKET = 1024
MAX_RUNNERS = 2
CAPTURES = {"count": 0}  # number of decode steps prepared (graphs captured on CUDA); read by tests


@dataclass
class GenerationOutput:
    """sequences: [B, L + n] prompt and new tokens; new_tokens: [B, n]; timings in seconds."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    prefill_s: float
    decode_s: float
    steps: int
    graph: bool

    @property
    def decode_tokens_per_s(self) -> float:
        return self.steps * self.sequences.shape[0] / self.decode_s if self.decode_s > 0 else float("nan")


def left_padding_starts(mask: torch.Tensor) -> torch.Tensor:
    """mask: [B, L] (1 = token) -> [B] int32 index of the first token; refuses padding that is not a prefix."""
    mask = mask.bool()
    starts = (~mask).long().cumprod(dim=1).sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None] >= starts[:, None]
    if not torch.equal(expected, mask):
        raise LmsqueezeError("attention_mask must be left padding (zeros before the tokens, ones after)")
    if bool((starts == mask.shape[1]).any()):
        raise LmsqueezeError("a sequence in the batch has no tokens (its attention_mask is all zeros)")
    return starts.to(torch.int32)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions as transformers' generate makes them: cumulative count of tokens, padding at 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


class DecodeRunner:
    """One cache, static input buffers and (on CUDA) one captured decode graph for a (batch, max length)."""

    def __init__(self, model, session, batch: int, max_length: int, sampling: Sampling, use_graph: bool):
        self.model, self.sampling, self.use_graph = model, sampling, use_graph
        self.batch, self.max_length = batch, max_length
        device = model.device
        self.cache = session.new_cache(batch_size=batch, max_length=max_length)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.prepared = False

    def step_eager(self) -> None:
        """The decode step: forward one token per sequence, pick the next, advance device-side state."""
        logits = self.model(input_ids=self.tokens, position_ids=self.positions, **cache_kw(self.model, self.cache),
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        self.tokens.copy_(select_tokens(logits, self.sampling)[:, None])
        self.positions.add_(1)
        self.cache.advance_device()

    def prepare(self) -> None:
        """Capture the decode graph (CUDA) once; the state it disturbs while warming up is put back."""
        CAPTURES["count"] += 1
        self.prepared = True
        if not self.use_graph:
            return
        saved = [t.clone() for t in (self.tokens, self.positions, self.cache.slot, self.cache.lengths)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles kernels, warms allocators
                self.step_eager()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step_eager()
        for t, s in zip((self.tokens, self.positions, self.cache.slot, self.cache.lengths), saved):
            t.copy_(s)

    def step(self) -> None:
        if not self.prepared:
            self.prepare()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step_eager()
        self.cache.advance_host(1)


def _runner(model, session, batch: int, needed: int, sampling: Sampling, use_graph: bool) -> DecodeRunner:
    max_length = -(-needed // LENGTH_BUCKET) * LENGTH_BUCKET
    art = session.artifact
    key = (session.method.to_dict().__repr__(), id(art), batch, max_length, sampling, use_graph,
           model.dtype, str(model.device))
    runners = model.__dict__.setdefault("_lmsqueeze_runners", {})
    if key not in runners:
        while len(runners) >= MAX_RUNNERS:
            runners.pop(next(iter(runners)))
        runners[key] = DecodeRunner(model, session, batch, max_length, sampling, use_graph)
    return runners[key]


def clear_runners(model) -> None:
    """Free the caches and graphs kept for reuse on `model`."""
    model.__dict__.pop("_lmsqueeze_runners", None)


def _check_inputs(input_ids, attention_mask, max_new_tokens) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise LmsqueezeError("input_ids must be a non-empty [batch, length] tensor of token ids")
    if max_new_tokens < 1:
        raise LmsqueezeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise LmsqueezeError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    return attention_mask


def _check_memory(model, batch: int, length: int) -> None:
    """Refuse, before allocating, a dense cache that cannot fit in the GPU's free memory."""
    if model.device.type != "cuda":
        return
    cfg = model.config
    head_dim = model.model.layers[0].self_attn.head_dim
    need = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * length * head_dim * model.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(model.device)
    if need > 0.9 * free:
        raise LmsqueezeError(
            f"a {length}-token cache for batch {batch} needs {need / 2**30:.1f} GiB of KV but only "
            f"{free / 2**30:.1f} GiB is free; shorten the context, lower the batch or use a compressing method"
        )


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, method=None, *, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: Sequence[int] | None = None, pad_token_id: int | None = None,
             prefill_chunk: int = 2048, use_graph: bool | None = None, seed: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> GenerationOutput:
    """Generate up to `max_new_tokens` per sequence with `method` (None = Dense).

    input_ids, attention_mask: [B, L] (left padding). stop_tokens defaults to the model's EOS ids; a
    sequence that stopped is filled with `pad_token_id`. on_token(tokens: [B]) streams each step.
    use_graph: None = CUDA graphs when the model is on a GPU.
    """
    mask = _check_inputs(input_ids, attention_mask, max_new_tokens)
    sampling = Sampling(temperature, top_p)
    if prefill_chunk < 1:
        raise LmsqueezeError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    device = model.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    if use_graph and device.type != "cuda":
        raise LmsqueezeError("CUDA graphs need the model on a GPU; pass use_graph=False")
    gen_cfg = model.generation_config
    if stop_tokens is None:
        eos = gen_cfg.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if pad_token_id is None:
        pad_token_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (
            stop_tokens[0] if stop_tokens else 0)
    batch, length = input_ids.shape
    starts = left_padding_starts(mask)
    _check_memory(model, batch, length + max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)

    patched = getattr(model, "_lmsqueeze_session", None)
    ctx = contextlib.nullcontext(patched) if patched is not None and method is None else apply(model, method)
    with ctx as session:
        runner = _runner(model, session, batch, length + max_new_tokens, sampling, use_graph)
        cache = runner.cache
        cache.reset()
        positions = mask_positions(mask)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        for a in range(0, length, prefill_chunk):
            b = min(length, a + prefill_chunk)
            logits = model(input_ids=input_ids[:, a:b], attention_mask=mask[:, :b],
                           position_ids=positions[:, a:b], **cache_kw(model, cache), use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        first = select_tokens(logits, sampling)
        runner.tokens.copy_(first[:, None])
        runner.positions.copy_(positions[:, -1:] + 1)
        cache.start_static(starts)
        stops = torch.tensor(stop_tokens or [-1], device=device)
        out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        out[:, 0] = first
        done = torch.isin(first, stops)
        sync()
        t1 = time.perf_counter()
        if on_token is not None:
            on_token(first)
        steps = 1
        while steps < max_new_tokens:
            if steps % 16 == 0 and bool(done.all()):
                break
            runner.step()
            token = torch.where(done, pad_token_id, runner.tokens[:, 0])
            out[:, steps] = token
            done = done | torch.isin(token, stops)
            steps += 1
            if on_token is not None:
                on_token(token)
        sync()
        t2 = time.perf_counter()
    # trim the columns generated after every sequence had stopped (as transformers' generate does)
    finished_at = steps
    if stop_tokens:
        hit = torch.isin(out[:, :steps], stops).cumsum(dim=1) > 0  # [B, steps]: stopped at or before
        all_done = hit.all(dim=0).nonzero()
        if len(all_done):
            finished_at = int(all_done[0]) + 1
    new = out[:, :finished_at]
    return GenerationOutput(sequences=torch.cat([input_ids, new], dim=1), new_tokens=new,
                            prefill_s=t1 - t0, decode_s=t2 - t1, steps=steps, graph=runner.graph is not None)
