"""Small fused Triton kernels of the decode step (imported lazily: needs triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rope_append_kernel(Q, K, V, Cos, Sin, KC, VC, Slot, QO,
                       sqb, sqh, skb, skh, svb, svh, scb, ssb,
                       skcb, skch, skcs, svcb, svch, svcs,
                       HQ: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    c1 = tl.load(Cos + b * scb + offs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + b * scb + HALF + offs, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + b * ssb + offs, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + b * ssb + HALF + offs, mask=m, other=0.0).to(tl.float32)
    if h < HQ:
        base = Q + b * sqb + h * sqh
        x1 = tl.load(base + offs, mask=m, other=0.0)
        x2 = tl.load(base + HALF + offs, mask=m, other=0.0)
        # as apply_rope in the input dtype: x*cos + rotate_half(x)*sin, each product rounded
        o1 = (x1 * c1.to(x1.dtype)).to(tl.float32) - (x2 * s1.to(x1.dtype)).to(tl.float32)
        o2 = (x2 * c2.to(x1.dtype)).to(tl.float32) + (x1 * s2.to(x1.dtype)).to(tl.float32)
        out = QO + (b * HQ + h) * (2 * HALF)
        tl.store(out + offs, o1.to(x1.dtype), mask=m)
        tl.store(out + HALF + offs, o2.to(x1.dtype), mask=m)
    else:
        hk = h - HQ
        slot = tl.load(Slot)
        base = K + b * skb + hk * skh
        x1 = tl.load(base + offs, mask=m, other=0.0)
        x2 = tl.load(base + HALF + offs, mask=m, other=0.0)
        o1 = (x1 * c1.to(x1.dtype)).to(tl.float32) - (x2 * s1.to(x1.dtype)).to(tl.float32)
        o2 = (x2 * c2.to(x1.dtype)).to(tl.float32) + (x1 * s2.to(x1.dtype)).to(tl.float32)
        kc = KC + b.to(tl.int64) * skcb + hk.to(tl.int64) * skch + slot * skcs
        tl.store(kc + offs, o1.to(x1.dtype), mask=m)
        tl.store(kc + HALF + offs, o2.to(x1.dtype), mask=m)
        vb = V + b * svb + hk * svh
        vc = VC + b.to(tl.int64) * svcb + hk.to(tl.int64) * svch + slot * svcs
        tl.store(vc + offs, tl.load(vb + offs, mask=m, other=0.0), mask=m)
        tl.store(vc + HALF + offs, tl.load(vb + HALF + offs, mask=m, other=0.0), mask=m)


@triton.jit
def rms_norm_kernel(X, W, Y, sx, sy, eps, H: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = tl.load(X + row.to(tl.int64) * sx + offs, mask=m, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(W + offs, mask=m, other=0.0)
    tl.store(Y + row.to(tl.int64) * sy + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=m)
