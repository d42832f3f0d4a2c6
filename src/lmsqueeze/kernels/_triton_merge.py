"""Triton kernel of `merge.merge_attention_states` (imported lazily: this module needs triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _merge_pair_kernel(OA, LA, OB, LB, Out, R, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r < R of OA, OB [R, D] (each normalised over its own keys) with log-sum-exps LA, LB [R] (float32,
    natural log, -inf: no key) -> Out [R, D] = the attention over both key sets; both empty gives 0."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rm = r < R
    m2 = rm[:, None] & (d < D)[None, :]
    la = tl.load(LA + r, mask=rm, other=float("-inf"))
    lb = tl.load(LB + r, mask=rm, other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    tot = wa + wb
    inv = tl.where(tot > 0, 1.0 / tl.where(tot > 0, tot, 1.0), 0.0)
    offs = r[:, None].to(tl.int64) * D + d[None, :]
    oa = tl.load(OA + offs, mask=m2 & (wa > 0)[:, None], other=0.0).to(tl.float32)
    ob = tl.load(OB + offs, mask=m2 & (wb > 0)[:, None], other=0.0).to(tl.float32)
    out = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + offs, out, mask=m2)
