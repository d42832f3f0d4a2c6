"""SPEED on a static cache: pipelined and plain greedy decoding of a looped decoder, one CUDA graph per step.

The eager `pipeline.speed_decode_looped` keeps Python lists of in-flight tokens; this version keeps every
piece of state in preallocated device tensors so that one captured graph serves every step:

- KV: `kc, vc: [n_unique, R, Hkv, S + 1, D]`, entry (layer i, pass r) of position p at `[i, r, :, p]`; slot S
  is a spare that rows without a token write to.
- Pipeline slots (R rows, slot r = the token that runs pass r this step; in-flight tokens always sit at
  distinct passes): `tok, pos, wpos: [R] int64`, `valid: [R] int32`, `lens: [R] int32`, `h_in: [R, d]`.
  A step runs ONE batched pass of the shared block over the R rows (row r attends to its own pass-r KV up to
  its position: the batch dimension of the decode-attention kernel is the pass), the exit head on all rows,
  then `pipeline_update` (flush / commit / shift, on the device). Flushed tokens' KV writes are rolled back by
  length bookkeeping alone: a (pass, position) entry is always rewritten by the surviving token before any
  surviving token reads it, and `lens` masks everything past a row's own position.
- Plain greedy of the same model (the baseline): one step = R passes of the block at batch 1 + the exit head
  + `greedy_update`, also one graph per step, same kernels.

Host synchronisation: plain greedy replays exactly n - 1 step graphs with no sync. The pipeline does not know
its step count in advance; it replays a lower bound of the steps still needed (each step commits at most one
token), reads the commit counter (one sync), and repeats: a handful of syncs per decode, never an extra step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.rmsnorm import rms_norm, rms_norm_reference
from lmsqueeze.methods.speed.pipeline import FlushCounts
from lmsqueeze.methods.speed.static_kernels import greedy_update, pipeline_update, rope_write
from lmsqueeze.models.looped import LoopedCache, LoopedDecoder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StaticLayer:
    """One unique block with fused projections: w_qkv: [(Hq + 2 Hkv) D, d]; w_gu: [2 F, d]."""

    w_in: torch.Tensor
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    w_post: torch.Tensor
    w_gu: torch.Tensor
    w_down: torch.Tensor


@dataclass(slots=True)
class StaticLooped:
    """Weights, KV buffers and the pipeline / greedy step state of one looped model (batch 1)."""

    layers: list[StaticLayer]
    norm_w: torch.Tensor
    emb: torch.Tensor  # [V, d], also the tied LM head
    eps: float
    hq: int
    hkv: int
    head_dim: int
    passes: int
    max_len: int  # positions 0 .. max_len - 1; slot max_len is the spare
    cos_tab: torch.Tensor  # [max_len + 1, D]
    sin_tab: torch.Tensor
    kc: torch.Tensor  # [n_unique, R, Hkv, max_len + 1, D]
    vc: torch.Tensor
    triton: bool
    # pipeline state (R rows)
    tok: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    wpos: torch.Tensor
    lens: torch.Tensor
    h_in: torch.Tensor
    out: torch.Tensor  # [max_len + 2] int64 token ids by position
    stats: torch.Tensor  # [3] int64: committed, flushes, flushed tokens
    last_pos: torch.Tensor  # [1] int64
    # plain greedy state (1 row)
    g_pos: torch.Tensor
    g_wpos: torch.Tensor
    g_lens: torch.Tensor
    g_h: torch.Tensor
    g_out: torch.Tensor
    g_stats: torch.Tensor
    t0: int = 0
    new_tokens: int = 0

    @property
    def dummy(self) -> int:
        return self.max_len


@dataclass(slots=True)
class StaticStats(FlushCounts):
    """Counters of one static pipelined decode: `FlushCounts` plus the host synchronizations it needed."""

    host_syncs: int = 0

    def as_dict(self) -> dict:
        return {**FlushCounts.as_dict(self), "host_syncs": self.host_syncs}


def build_static(model: LoopedDecoder, max_len: int, triton: bool | None = None) -> StaticLooped:
    """Fuse the model's weights and allocate every buffer for positions < max_len (on the model's device).

    triton: None = Triton kernels on CUDA, PyTorch references elsewhere; False = references everywhere.
    """
    cfg = model.config
    if max_len < 2 or max_len > cfg.max_position_embeddings:
        raise LmsqueezeError(f"max_len must be in 2..{cfg.max_position_embeddings}, got {max_len}")
    emb = model.embed_tokens.weight.detach()
    dev, dt = emb.device, emb.dtype
    with torch.no_grad():
        layers = [StaticLayer(
            w_in=b.input_layernorm.weight.detach(),
            w_qkv=torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]),
            w_o=b.self_attn.o_proj.weight.detach(),
            w_post=b.post_attention_layernorm.weight.detach(),
            w_gu=torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]),
            w_down=b.mlp.down_proj.weight.detach()) for b in model.layers]
        cos, sin = model.rope(torch.arange(max_len + 1, device=dev), dt)
    r, s1 = cfg.num_loops, max_len + 1
    kv_shape = (cfg.num_unique_layers, r, cfg.num_kv_heads, s1, cfg.head_dim)

    def z(*shape, dtype=torch.int64):
        return torch.zeros(shape, dtype=dtype, device=dev)

    return StaticLooped(
        layers=layers, norm_w=model.norm.weight.detach(), emb=emb, eps=cfg.rms_norm_eps, hq=cfg.num_heads,
        hkv=cfg.num_kv_heads, head_dim=cfg.head_dim, passes=r, max_len=max_len,
        cos_tab=cos.contiguous(), sin_tab=sin.contiguous(),
        kc=torch.zeros(kv_shape, dtype=dt, device=dev), vc=torch.zeros(kv_shape, dtype=dt, device=dev),
        triton=dev.type == "cuda" if triton is None else triton,
        tok=z(r), pos=z(r), valid=z(r, dtype=torch.int32), wpos=z(r), lens=z(r, dtype=torch.int32),
        h_in=z(r, cfg.hidden_size, dtype=dt), out=z(max_len + 2), stats=z(3), last_pos=z(1),
        g_pos=z(1), g_wpos=z(1), g_lens=z(1, dtype=torch.int32), g_h=z(1, cfg.hidden_size, dtype=dt),
        g_out=z(max_len + 2), g_stats=z(3))


def _attend(st: StaticLooped, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """q: [m, Hq, D]; kc, vc: [m, Hkv, S + 1, D]; lens: [m] int32 -> [m, Hq, D]."""
    scaling = st.head_dim ** -0.5
    if st.triton:
        from lmsqueeze.kernels.decode_attention import decode_attention_triton

        return decode_attention_triton(q, kc, vc, lens, scaling)
    mask = torch.arange(kc.shape[2], device=q.device)[None, :] < lens[:, None]  # [m, S + 1]
    g = st.hq // st.hkv
    k, v = kc.repeat_interleave(g, dim=1), vc.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=scaling)
    return out[:, :, 0]


def _norm(st: StaticLooped, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, w, st.eps) if st.triton else rms_norm_reference(x, w, st.eps)


def layer_forward(st: StaticLooped, i: int, x: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  rpos: torch.Tensor, wpos: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Unique block i on m rows, each one token with its own cache row. x: [m, d]; kc, vc: [m, Hkv, S + 1, D];
    rpos (RoPE position), wpos (cache slot written): [m] int64; lens: [m] int32 keys attended. -> [m, d]."""
    w = st.layers[i]
    m = x.shape[0]
    qkv = F.linear(_norm(st, x, w.w_in), w.w_qkv)
    q = rope_write(qkv, st.cos_tab, st.sin_tab, rpos, wpos, kc, vc, st.hq, st.hkv, triton=st.triton)
    o = _attend(st, q, kc, vc, lens).reshape(m, st.hq * st.head_dim)
    x = torch.addmm(x, o, w.w_o.t())
    gu = F.linear(_norm(st, x, w.w_post), w.w_gu)
    f = gu.shape[1] // 2
    return torch.addmm(x, F.silu(gu[:, :f]) * gu[:, f:], w.w_down.t())


def block_pass(st: StaticLooped, x: torch.Tensor, rows: slice, rpos: torch.Tensor, wpos: torch.Tensor,
               lens: torch.Tensor) -> torch.Tensor:
    """One pass of the unique blocks over x: [m, d]; row b uses KV pass `rows`[b] (a slice of the R passes)."""
    for i in range(len(st.layers)):
        x = layer_forward(st, i, x, st.kc[i, rows], st.vc[i, rows], rpos, wpos, lens)
    return x


def exit_argmax(st: StaticLooped, x: torch.Tensor) -> torch.Tensor:
    """The shared exit head's greedy token for each row: x: [m, d] -> [m] int64."""
    return F.linear(_norm(st, x, st.norm_w), st.emb).argmax(-1)


def pipeline_step(st: StaticLooped) -> None:
    """One pipelined step (graph-capturable): the R slots run one batched pass, then flush / commit / shift."""
    h = block_pass(st, st.h_in, slice(None), st.wpos, st.wpos, st.lens)
    pipeline_update(exit_argmax(st, h), st.tok, st.pos, st.valid, st.wpos, st.lens, h, st.h_in, st.emb,
                    st.out, st.stats, st.last_pos, st.dummy, triton=st.triton)


def greedy_step(st: StaticLooped) -> None:
    """One plain greedy step (graph-capturable): R passes at batch 1, the exit head, commit."""
    x = st.g_h
    for r in range(st.passes):
        x = block_pass(st, x, slice(r, r + 1), st.g_wpos, st.g_wpos, st.g_lens)
    greedy_update(exit_argmax(st, x), st.g_pos, st.g_wpos, st.g_lens, st.g_h, st.emb, st.g_out, st.g_stats,
                  triton=st.triton)


@torch.no_grad()
def start_static(st: StaticLooped, model: LoopedDecoder, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Prefill `input_ids` [1, T] eagerly, copy its KV into the static buffers and reset both step states."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LmsqueezeError(f"static looped decoding runs batch 1; got input_ids of shape {tuple(input_ids.shape)}")
    t0, n = input_ids.shape[1], max_new_tokens
    if n < 1 or t0 + n > st.max_len:
        raise LmsqueezeError(f"need 1 <= max_new_tokens and prompt + new tokens <= max_len {st.max_len}; "
                             f"got {t0} + {n}: build_static with a larger max_len")
    cache = LoopedCache()
    first = model(input_ids, cache=cache)[-1][0, -1].argmax()
    for (r, i), (k, v) in cache.kv.items():
        st.kc[i, r, :, :t0] = k[0]
        st.vc[i, r, :, :t0] = v[0]
    st.t0, st.new_tokens = t0, n
    for out in (st.out, st.g_out):
        out.fill_(-1)
        out[:t0] = input_ids[0]
        out[t0] = first
    st.last_pos.fill_(t0 + n - 2)
    st.tok.zero_()
    st.tok[0] = first
    st.pos.fill_(t0)
    st.valid.zero_()
    st.valid[0] = int(t0 <= t0 + n - 2)
    st.wpos.copy_(torch.where(st.valid.bool(), st.pos, torch.full_like(st.pos, st.dummy)))
    st.lens.copy_(torch.where(st.valid.bool(), st.pos + 1, torch.ones_like(st.pos)).to(torch.int32))
    st.h_in.copy_(st.emb[first].expand_as(st.h_in))
    st.stats.zero_()
    st.g_pos.fill_(t0)
    st.g_wpos.fill_(t0)
    st.g_lens.fill_(t0 + 1)
    st.g_h.copy_(st.emb[first][None])
    st.g_stats.zero_()


def run_pipeline(st: StaticLooped, step: Callable[[], object]) -> tuple[int, int]:
    """Replay `step` until every token is committed; returns (steps, host syncs)."""
    target = st.new_tokens - 1
    steps = syncs = 0
    need = target + st.passes - 1 if target > 0 else 0  # the first commit comes at step R, then <= 1 per step
    while need > 0:
        for _ in range(need):
            step()
        steps += need
        done = int(st.stats[0])
        syncs += 1
        need = target - done
        if steps > (target + 1) * st.passes + 2:
            raise AssertionError(f"pipeline stuck: {done} of {target} tokens after {steps} steps")
    return steps, syncs


def run_greedy(st: StaticLooped, step: Callable[[], object]) -> int:
    """Replay `step` n - 1 times (no host sync); returns the steps."""
    for _ in range(st.new_tokens - 1):
        step()
    return st.new_tokens - 1


def capture_step(step: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Warm `step` up on a side stream, then capture one call. Both change the state: re-run `start_static`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def static_ids(st: StaticLooped, greedy: bool = False) -> torch.Tensor:
    """The prompt + generated ids of the last run: [1, T + n]."""
    return (st.g_out if greedy else st.out)[:st.t0 + st.new_tokens][None].clone()


@torch.no_grad()
def speed_decode_static(model: LoopedDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                        max_len: int | None = None, use_graph: bool = False, triton: bool | None = None,
                        ) -> tuple[torch.Tensor, StaticStats]:
    """Pipelined (SPEED) greedy decoding on static buffers; equals `greedy_decode` token for token.

    input_ids: [1, T] -> ([1, T + max_new_tokens], stats). use_graph: capture one CUDA graph per step (CUDA).
    """
    st = build_static(model, max_len or input_ids.shape[1] + max_new_tokens, triton)
    step: Callable[[], object] = lambda: pipeline_step(st)
    if use_graph:
        start_static(st, model, input_ids, max_new_tokens)
        step = capture_step(step).replay
    start_static(st, model, input_ids, max_new_tokens)
    steps, syncs = run_pipeline(st, step)
    c = st.stats.tolist()
    stats = StaticStats(new_tokens=1 + c[0], num_passes=st.passes, steps=steps, flushes=c[1],
                        flushed_tokens=c[2], host_syncs=syncs)
    return static_ids(st), stats


@torch.no_grad()
def greedy_decode_static(model: LoopedDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                         max_len: int | None = None, use_graph: bool = False, triton: bool | None = None,
                         ) -> torch.Tensor:
    """Plain greedy decoding of the looped model on the same static buffers and kernels: [1, T + n]."""
    st = build_static(model, max_len or input_ids.shape[1] + max_new_tokens, triton)
    step: Callable[[], object] = lambda: greedy_step(st)
    if use_graph:
        start_static(st, model, input_ids, max_new_tokens)
        step = capture_step(step).replay
    start_static(st, model, input_ids, max_new_tokens)
    run_greedy(st, step)
    return static_ids(st, greedy=True)
