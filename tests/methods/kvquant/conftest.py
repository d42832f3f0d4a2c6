"""Shared helpers for the KVQuant tests: a transformers-like rotary module and filled caches."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.methods.cache import Step
from lmsqueeze.methods.kvquant.cache import KVQuantState
from lmsqueeze.methods.kvquant.codebooks import snap
from lmsqueeze.methods.kvquant.quantizers import KeyQuantizer, ValueQuantizer
from lmsqueeze.methods.kvquant.rope import KernelRope


class Rotary:
    """Default RoPE with an attention scaling, called like transformers' rotary modules."""

    def __init__(self, head_dim: int, scale: float = 1.0, theta: float = 10000.0) -> None:
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.attention_scaling = scale
        self.rope_type = "default"

    def __call__(self, x, positions):
        fr = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([fr, fr], -1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def random_quantizers(bits: int, kv_heads: int, head_dim: int, n_out: int, g: torch.Generator,
                      token_scale: bool = False):
    kcb = snap(torch.sort(torch.randn(2**bits, generator=g)).values.clamp(-1.5, 1.5))
    vcb = snap(torch.sort(torch.randn(2**bits, generator=g)).values.clamp(-1.5, 1.5))
    lower = -torch.rand(kv_heads, head_dim, generator=g) - 0.5
    upper = torch.rand(kv_heads, head_dim, generator=g) + 0.5
    return KeyQuantizer(kcb, lower, upper, n_out, token_scale), ValueQuantizer(vcb, n_out)


def filled_state(bits: int, lens: list[int], kv_heads: int, head_dim: int, *, n_sink: int = 1, window: int = 0,
                 n_out: int = 2, seed: int = 0, rope_scale: float = 1.0, token_scale: bool = False):
    """A KVQuantState filled by one prefill of random keys/values; sequence b has lens[b] tokens, left padded
    (n_out = 2: both entries of each outlier word are used).

    Returns (state, rotary, starts [B] int32, slots)."""
    g = torch.Generator().manual_seed(seed)
    kq, vq = random_quantizers(bits, kv_heads, head_dim, n_out, g, token_scale)
    state = KVQuantState(kq, vq, n_sink, window)
    B, S = len(lens), max(lens)
    rot = Rotary(head_dim, rope_scale)
    k = torch.randn(B, kv_heads, S, head_dim, generator=g) * 1.5
    v = torch.randn(B, kv_heads, S, head_dim, generator=g)
    pad = torch.tensor([S - n for n in lens])
    valid = torch.arange(S)[None] >= pad[:, None]
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    cos, sin = rot(k, pos)
    step = Step(cos=cos, sin=sin, positions=pos, valid=None if bool(valid.all()) else valid,
                scaling=head_dim**-0.5, window=None, layer_idx=0, rotary=rot)
    state._setup(k, step)
    state.rope = KernelRope.from_rotary(rot)
    state._append_chunk(k, v, step)
    return state, rot, pad.to(torch.int32), S


@pytest.fixture
def make_state():
    return filled_state
