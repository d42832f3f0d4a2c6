"""SPEED pipelined decoding on a looped (parameter-shared) decoder, greedy and lossless.

With R passes of the shared block, up to R tokens are in flight: every step runs ONE batched pass of the
shared block over them, each token at its own pass, position and (pass, layer) KV entries, so one read of
the block's weights serves them all. After every pass the exit head re-predicts the following token; if the
prediction changed, the successor and every later speculative token are flushed and their KV writes are
rolled back (`LoopedCache.crop(pos)`: per (pass, layer) entries only ever hold a contiguous prefix of
positions). A token's final-pass prediction commits the next token, so the output equals
`greedy_decode` of the same model token for token (up to floating-point differences of batched vs
single-token matmuls; exact in float64).

This eager version keeps Python lists and syncs every step; `static_pipeline.speed_decode_static` is the same
schedule on preallocated device state, one CUDA graph per step (the fast path on a GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.looped import LoopedCache, LoopedDecoder, apply_rope

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FlushCounts:
    """What every pipelined decode counts (batch 1). `steps`: batched passes of the shared block after prefill
    (each reads the block's weights once); `flushes`: changed predictions that flushed in-flight tokens;
    `flushed_tokens`: tokens thrown away."""

    new_tokens: int = 0
    num_passes: int = 0
    steps: int = 0
    flushes: int = 0
    flushed_tokens: int = 0

    @property
    def tokens_per_step(self) -> float:
        """Committed tokens (after the first, which prefill gives) per batched block pass."""
        return (self.new_tokens - 1) / self.steps if self.steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per R block passes (one full forward of weight reads); greedy: 1.0."""
        return self.tokens_per_step * self.num_passes

    @property
    def flush_rate(self) -> float:
        """Flushes per committed token (after the first)."""
        return self.flushes / max(self.new_tokens - 1, 1)

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "num_passes": self.num_passes, "steps": self.steps,
                "flushes": self.flushes, "flushed_tokens": self.flushed_tokens,
                "tokens_per_step": self.tokens_per_step, "tokens_per_forward": self.tokens_per_forward,
                "flush_rate": self.flush_rate}


@dataclass(slots=True)
class PipelineStats(FlushCounts):
    """Counters of one eager pipelined decode: `FlushCounts`, plus `token_passes` (token x pass work done),
    `checks` (predictions re-checked against an in-flight successor) and the in-flight histogram;
    `block_passes_greedy`: passes plain greedy decoding needs for the same tokens ((n - 1) * R)."""

    token_passes: int = 0
    checks: int = 0
    in_flight_hist: list[int] = field(default_factory=list)

    @property
    def block_passes_greedy(self) -> int:
        return max(self.new_tokens - 1, 0) * self.num_passes

    def as_dict(self) -> dict:
        return {**FlushCounts.as_dict(self), "block_passes_greedy": self.block_passes_greedy,
                "token_passes": self.token_passes, "checks": self.checks,
                "mean_in_flight": (sum(self.in_flight_hist) / len(self.in_flight_hist)
                                   if self.in_flight_hist else 0.0)}


@dataclass(slots=True)
class _Slot:
    """One in-flight token: its id, position, next pass to run and residual stream h: [d]."""

    token: int
    pos: int
    pass_idx: int
    h: torch.Tensor


def mixed_pass(model: LoopedDecoder, h: torch.Tensor, positions: torch.Tensor, passes: list[int],
               cache: LoopedCache) -> torch.Tensor:
    """One pass of the shared block over m in-flight tokens, each at its own pass.

    h: [m, d] residual streams; positions: [m]; passes[j]: the pass token j runs. Projections and MLPs run
    batched (one weight read); attention runs per token against its own (pass, layer) KV entry, to which
    it appends its k, v. Tokens must be in distinct passes or the same pass at increasing positions.
    Returns h: [m, d] after the pass.
    """
    cfg = model.config
    m = h.shape[0]
    cos, sin = model.rope(positions, h.dtype)  # [m, D]
    groups = cfg.num_heads // cfg.num_kv_heads
    for i, layer in enumerate(model.layers):
        att = layer.self_attn
        x = layer.input_layernorm(h)[None]  # [1, m, d]
        q = att.q_proj(x).view(1, m, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [1, H, m, D]
        k = att.k_proj(x).view(1, m, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(1, m, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outs = []
        for j in range(m):
            kk, vv = cache.update((passes[j], i), k[:, :, j:j + 1], v[:, :, j:j + 1])
            if groups > 1:
                kk = kk.repeat_interleave(groups, dim=1)
                vv = vv.repeat_interleave(groups, dim=1)
            outs.append(F.scaled_dot_product_attention(q[:, :, j:j + 1], kk, vv))  # [1, H, 1, D]
        o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, m, cfg.num_heads * cfg.head_dim)
        h = h + att.o_proj(o)[0]
        h = h + layer.mlp(layer.post_attention_layernorm(h[None]))[0]
    return h


@torch.no_grad()
def speed_decode_looped(model: LoopedDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                        cache: LoopedCache | None = None, max_in_flight: int | None = None,
                        ) -> tuple[torch.Tensor, PipelineStats]:
    """Greedy pipelined (SPEED) decoding of a looped model at batch 1.

    input_ids: [1, T] -> ([1, T + max_new_tokens], stats). `cache`: an empty LoopedCache to fill (left
    holding the KV of positions < T + max_new_tokens - 1 at every pass), or None. `max_in_flight`: at most
    this many tokens per batched pass (default: the number of passes R; 1 gives sequential decoding).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LmsqueezeError(f"speed_decode_looped decodes batch 1; got input_ids of shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise LmsqueezeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    n_pass = model.config.num_loops
    depth = n_pass if max_in_flight is None else max_in_flight
    if not 1 <= depth <= n_pass:
        raise LmsqueezeError(f"max_in_flight must be in 1..{n_pass} (the number of passes), got {depth}")
    cache = LoopedCache() if cache is None else cache
    if cache.kv:
        raise LmsqueezeError("speed_decode_looped needs an empty LoopedCache")
    stats = PipelineStats(num_passes=n_pass)
    if max_new_tokens == 0:
        return input_ids, stats
    dev = input_ids.device
    t0 = input_ids.shape[1]
    last_pos = t0 + max_new_tokens - 2  # the last position that has to run (it predicts the last token)
    first = int(model(input_ids, cache=cache)[-1][0, -1].argmax())
    out = input_ids[0].tolist() + [first]
    stats.new_tokens = 1
    emb = model.embed_tokens.weight

    def start(token: int, pos: int) -> _Slot | None:
        if pos > last_pos:
            return None
        return _Slot(token, pos, 0, emb[token].clone())

    flight: list[_Slot] = [s for s in [start(first, t0)] if s is not None]
    while flight:
        stats.steps += 1
        stats.token_passes += len(flight)
        stats.in_flight_hist.append(len(flight))
        h = torch.stack([s.h for s in flight])
        pos = torch.tensor([s.pos for s in flight], device=dev)
        h = mixed_pass(model, h, pos, [s.pass_idx for s in flight], cache)
        preds = model.exit_logits(h[None])[0].argmax(-1).tolist()
        nxt: list[_Slot] = []
        flushed_at: int | None = None
        for j, s in enumerate(flight):
            if flushed_at is not None and s.pos >= flushed_at:
                break
            s.h = h[j]
            s.pass_idx += 1
            pred = preds[j]
            succ = flight[j + 1] if j + 1 < len(flight) else None
            if succ is not None:
                stats.checks += 1
                if succ.token != pred:  # flush the successor and everything after it; undo their KV
                    stats.flushes += 1
                    stats.flushed_tokens += len(flight) - j - 1
                    flushed_at = succ.pos
                    cache.crop(succ.pos)
                    succ = None
            if s.pass_idx == n_pass:  # final pass: commit the next token
                out.append(pred)
                stats.new_tokens += 1
            else:
                nxt.append(s)
            if succ is None and len(nxt) < depth:
                new = start(pred, s.pos + 1)
                if new is not None:
                    nxt.append(new)
        flight = nxt
    if stats.new_tokens != max_new_tokens:
        raise AssertionError(f"committed {stats.new_tokens} tokens, expected {max_new_tokens}")
    return torch.tensor([out], device=dev, dtype=input_ids.dtype), stats
