"""The fused decode prologue (RoPE + cache write) and RMSNorm kernels equal their references."""

import pytest
import torch

from lmsqueeze.kernels.rmsnorm import rms_norm_reference
from lmsqueeze.kernels.rope_append import rope_append_reference, rope_append_triton


def rope_tables(B, D, pos):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = pos.float()[:, None, None] * inv[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("B,Hq,Hkv,D", [(1, 4, 4, 64), (3, 8, 2, 128), (2, 4, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_append_matches_reference(B, Hq, Hkv, D, dtype):
    S = 37
    q = torch.randn(B, 1, Hq, D).to(dtype).transpose(1, 2)  # strided, as in the model
    k = torch.randn(B, 1, Hkv, D).to(dtype).transpose(1, 2)
    v = torch.randn(B, 1, Hkv, D).to(dtype).transpose(1, 2)
    cos, sin = rope_tables(B, D, torch.randint(0, 5000, (B,)))
    cos, sin = cos.to(dtype), sin.to(dtype)
    slot = torch.tensor([int(torch.randint(0, S, ()))])
    kc, vc = torch.randn(B, Hkv, S, D).to(dtype), torch.randn(B, Hkv, S, D).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = rope_append_reference(q, k, v, cos, sin, kc, vc, slot)
    out = rope_append_triton(q, k, v, cos, sin, kc2, vc2, slot)
    tol = 0 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out, ref, atol=tol + 1e-6, rtol=tol)
    torch.testing.assert_close(kc2, kc, atol=tol + 1e-6, rtol=tol)
    assert torch.equal(vc2, vc)


@pytest.mark.parametrize("H", [64, 96, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_kernel_matches_reference(H, dtype):
    from lmsqueeze.kernels._triton_small import rms_norm_kernel

    x = (torch.randn(5, H) * 3).to(dtype)
    w = torch.randn(H).to(dtype)
    out = torch.empty_like(x)
    rms_norm_kernel[(5,)](x, w, out, x.stride(0), out.stride(0), 1e-6, H=H, BLOCK=1 << (H - 1).bit_length())
    ref = rms_norm_reference(x, w, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
