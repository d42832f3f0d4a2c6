"""KVQuant rows for `lmsqueeze bench attention --variants sdpa,kvquant-nuq3,...` (nuq2 / nuq3 / nuq4).

The benchmark's random keys are post-RoPE; they are rotated back to positions 0..N-1 and quantized through the
cache's real append path (per-channel key ranges and nuq datatypes fitted on the data itself, per-token values,
1% outliers = max(1, round(0.01 * D)) slots per vector, one fp16 sink), so the kernel, which re-applies
RoPE on the fly, computes the same attention up to quantization error. The timed call is the fused Triton
decode kernel on CUDA (the PyTorch reference on the CPU). Bytes moved: every byte the kernel must read.
"""

from __future__ import annotations

import torch

from lmsqueeze.bench.attention import AttentionBench, AttentionInputs, register_attention_variant
from lmsqueeze.methods.cache import Step
from lmsqueeze.methods.kvquant.cache import KVQuantState
from lmsqueeze.methods.kvquant.calibrate import key_ranges, value_normalise
from lmsqueeze.methods.kvquant.codebooks import Histogram, fit_codebook
from lmsqueeze.methods.kvquant.quantizers import KeyQuantizer, ValueQuantizer, outlier_slots
from lmsqueeze.methods.kvquant.rope import KernelRope
from lmsqueeze.models.rope import apply_rope

APPEND_CHUNK = 16384  # tokens quantized per append (bounds the temporaries at long lengths)
STATS_TOKENS = 4096   # tokens of sequence 0 the key ranges and datatypes are fitted on


class _Rotary:
    """Default RoPE (theta 500000, as Llama 3), called like a transformers rotary module."""

    rope_type = "default"
    attention_scaling = 1.0

    def __init__(self, head_dim: int, device) -> None:
        self.inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor):
        fr = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([fr, fr], -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_back(k: torch.Tensor, rot: _Rotary, pos: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys [B, H, T, D] at positions pos [B, T] -> pre-RoPE keys R(p)^-1 k."""
    cos, sin = rot(k, pos)
    return apply_rope(k.float(), cos.float(), -sin.float()).to(k.dtype)


def packed_state(k: torch.Tensor, v: torch.Tensor, bits: int, outliers: float = 0.01) -> KVQuantState:
    """A filled KVQuantState from post-RoPE keys k and values v: [B, Hkv, N, D] at positions 0..N-1.

    Key ranges (1% outliers) and both datatypes (plain k-means, no Fisher weights) are fitted on the first
    STATS_TOKENS tokens of sequence 0, the way calibration fits them on calibration data."""
    B, _, N, D = k.shape
    rot = _Rotary(D, k.device)
    pos = torch.arange(N, device=k.device)[None].expand(B, N)
    n_out = outlier_slots(outliers, D)
    n = min(N, STATS_TOKENS)
    ks = _rotate_back(k[:1, :, :n], rot, pos[:1, :n])[0].transpose(0, 1).float()    # [n, H, D]
    lo, hi = key_ranges([ks], outliers)
    lo, hi = lo.to(k.device), hi.to(k.device)
    hk, hv = Histogram(device=k.device), Histogram(device=k.device)
    xk = (ks - (hi + lo) / 2) / ((hi - lo) / 2)
    hk.add(xk[xk.abs() <= 1], torch.ones_like(xk[xk.abs() <= 1]))
    xv, inl, _ = value_normalise(v[0, :, :n].transpose(0, 1), n_out)
    hv.add(xv[inl], torch.ones_like(xv[inl]))
    kq = KeyQuantizer(fit_codebook("nuq", bits, hk), lo.cpu(), hi.cpu(), n_out)
    st = KVQuantState(kq, ValueQuantizer(fit_codebook("nuq", bits, hv), n_out), n_sink=1, window=0, max_length=N)
    st.rope = KernelRope.from_rotary(rot, k.device)
    for a in range(0, N, APPEND_CHUNK):
        b = min(N, a + APPEND_CHUNK)
        cos, sin = rot(k, pos[:, a:b])
        k_pre = _rotate_back(k[:, :, a:b], rot, pos[:, a:b])
        step = Step(cos=cos, sin=sin, positions=pos[:, a:b], valid=None, scaling=D**-0.5, window=None,
                    layer_idx=0, rotary=rot)
        if st.kv is None:
            st._setup(k_pre, step)
        st._append_chunk(k_pre, v[:, :, a:b], step)
    return st


def read_bytes(st: KVQuantState, q: torch.Tensor) -> int:
    """Bytes the decode kernel must read for one step (codes, outliers, value metadata, kinds; q and out)."""
    kv = st.kv
    B, H, _, _ = kv.kcodes.shape
    N = st.length
    per_token = (kv.kcodes.shape[-1] + kv.vcodes.shape[-1] + kv.kout.shape[-1] + kv.vout.shape[-1]) * 4 + 4
    return B * H * N * per_token + B * N + 2 * q.numel() * q.element_size()


def _variant(bits: int):
    def build(inp: AttentionInputs) -> AttentionBench:
        st = packed_state(inp.k, inp.v, bits)
        q = inp.q[:, :, 0].contiguous()
        B = q.shape[0]
        lengths = torch.full((B,), st.length, dtype=torch.int32, device=q.device)
        if q.is_cuda:
            from lmsqueeze.methods.kvquant.kernels import kvquant_decode_attention as attend
        else:
            from lmsqueeze.methods.kvquant.reference import decode_attention_reference as attend

        def fn() -> torch.Tensor:
            return attend(q, st.kv, lengths, inp.scale, st.rope)[:, :, None]
        return AttentionBench(fn, read_bytes(st, inp.q), exact=False)
    return build


for _bits in (2, 3, 4):
    register_attention_variant(f"kvquant-nuq{_bits}")(_variant(_bits))
