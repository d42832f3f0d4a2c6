"""The one-launch Squeezed decode of a flat index (scores, keep decision, listing and attention in one kernel:
fused.py) against the PyTorch reference (centroid scores, then the sparse decode) under TRITON_INTERPRET=1, run
as its three phase launches (the interpreter runs programs one after another, so the barrier of the one-launch
form is checked on the GPU: benchmarks/scripts/bench_squeezed.py): GQA 1/3/4, head dims 64/128, odd sizes, batch
2 with per-sequence starts, empty clusters, one and several score tiles per program, sparsity 0 = dense."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.squeezed import reference as R

pytest.importorskip("triton")

from test_decode_fused_merge import _case_with_centroids, _rel

from lmsqueeze.methods.squeezed.fused import squeezed_decode_fused_triton


def _run(args, cents, lsizes, **kw):
    q, keys, vals, offs, _s, _e, tau, lk, lv, lengths, sc, starts = args
    return squeezed_decode_fused_triton(q, cents, lsizes, keys, vals, offs, tau, lk, lv, lengths, sc, starts,
                                        one_launch=False, **kw)


@pytest.mark.parametrize("G,D,C,P,block_e,block_n", [(1, 64, 83, 3, 4, 16), (4, 128, 83, 5, 32, 16),
                                                     (3, 64, 301, 2, 2, 32), (4, 64, 40, 16, 8, 16)])
def test_one_launch_decode_matches_reference(G, D, C, P, block_e, block_n, gen):
    """P = 2 at C = 301: 151 clusters per program, two score tiles of 128 each (scores stored and re-read)."""
    args, cents, lsizes = _case_with_centroids(2, 2, G, D, C, 5, 37, gen)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(*args)
    o, lse, kept = _run(args, cents, lsizes, programs=P, block_e=block_e, block_n=block_n, local_splits=2)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    assert torch.equal(kept, kept_r) and (kept < args[1].shape[1]).all()       # really sparse


def test_one_launch_sparsity0_equals_dense(gen):
    """Threshold -inf keeps every cluster: dense attention over context + local slots."""
    args, cents, lsizes = _case_with_centroids(2, 2, 4, 64, 29, 3, 21, gen, keep_all=True)
    q, keys, vals, offs, _s, _e, _tau, lk, lv, lengths, sc, starts = args
    o, lse, kept = _run(args, cents, lsizes, programs=3, block_e=4, block_n=16, local_splits=1)
    n_ctx = offs[:, -1].long()
    for b in range(2):
        for h in range(2):
            kk = torch.cat([keys[h, :n_ctx[h]], lk[b, h, starts[b]:lengths[b]]])
            vv = torch.cat([vals[h, :n_ctx[h]], lv[b, h, starts[b]:lengths[b]]])
            logits = q[b, h * 4:(h + 1) * 4] @ kk.T * sc
            assert _rel(o[b, h * 4:(h + 1) * 4], torch.softmax(logits, -1) @ vv) < 1e-5
            assert _rel(lse[b, h * 4:(h + 1) * 4], torch.logsumexp(logits, -1)) < 1e-5
    assert torch.equal(kept, offs[:, -1].expand(2, -1).to(kept.dtype))


def test_one_launch_needs_a_gpu(gen):
    args, cents, lsizes = _case_with_centroids(1, 1, 1, 64, 9, 2, 5, gen)
    q, keys, vals, offs, _s, _e, tau, lk, lv, lengths, sc, starts = args
    with pytest.raises(LmsqueezeError, match="one_launch=False"):
        squeezed_decode_fused_triton(q, cents, lsizes, keys, vals, offs, tau, lk, lv, lengths, sc, starts,
                                     one_launch=True)
