"""The listed Squeezed decode (kept clusters listed per chunk on the GPU, dealt out over P programs: listed.py)
against the PyTorch reference under TRITON_INTERPRET=1 (fp32, tiny shapes, fresh random inputs): GQA 1/3/4, head
dims 64/128, odd sizes, batch 2 with per-sequence starts, empty clusters, several chunks and several requests of
list entries per program, sparsity 0 = dense."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.methods.squeezed import reference as R

pytest.importorskip("triton")

from test_decode_fused_merge import _case, _rel

from lmsqueeze.methods.squeezed.listed import select_list_triton, squeezed_decode_listed_triton


@pytest.mark.parametrize("G,D,P,block_s,block_e,block_n", [(1, 64, 3, 32, 4, 16), (4, 128, 5, 16, 32, 16),
                                                            (3, 64, 16, 64, 2, 32), (4, 64, 1, 128, 8, 16)])
def test_listed_decode_matches_reference(G, D, P, block_s, block_e, block_n, gen):
    args = _case(2, 2, G, D, 83, 5, 37, gen)
    o_r, lse_r, kept_r = R.squeezed_decode_reference(*args)
    o, lse, kept = squeezed_decode_listed_triton(*args, programs=P, select_block=block_s, block_e=block_e,
                                                 block_n=block_n, local_splits=2)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
    assert torch.equal(kept, kept_r) and (kept < args[1].shape[1]).all()       # really sparse


def test_listed_sparsity0_equals_dense(gen):
    """Threshold -inf keeps every cluster: dense attention over context + local slots."""
    q, keys, vals, offs, s, e, tau, lk, lv, lengths, sc, starts = _case(2, 2, 4, 64, 29, 3, 21, gen, keep_all=True)
    o, lse, kept = squeezed_decode_listed_triton(q, keys, vals, offs, s, e, tau, lk, lv, lengths, sc, starts,
                                                 programs=3, select_block=16, block_e=4, block_n=16, local_splits=1)
    n_ctx = offs[:, -1].long()
    for b in range(2):
        for h in range(2):
            kk = torch.cat([keys[h, :n_ctx[h]], lk[b, h, starts[b]:lengths[b]]])
            vv = torch.cat([vals[h, :n_ctx[h]], lv[b, h, starts[b]:lengths[b]]])
            logits = q[b, h * 4:(h + 1) * 4] @ kk.T * sc
            assert _rel(o[b, h * 4:(h + 1) * 4], torch.softmax(logits, -1) @ vv) < 1e-5
            assert _rel(lse[b, h * 4:(h + 1) * 4], torch.logsumexp(logits, -1)) < 1e-5
    assert torch.equal(kept, offs[:, -1].expand(2, -1).to(kept.dtype))


def test_list_selection_contents_and_stale_slots(gen):
    """The list holds exactly the kept non-empty clusters of each chunk, in order; slots past the counts are never
    read (filled with junk, the answer is unchanged)."""
    args = _case(2, 2, 4, 64, 83, 5, 37, gen)
    offs, s, e, tau = args[3], args[4], args[5], args[6]
    start, size, count, kept_rows = select_list_triton(s, e, tau, offs, 16)
    keep = R.cluster_keep(s, e, tau, 4)
    keep = torch.cat([keep, torch.ones_like(keep[..., :1])], -1)                          # + observation window
    sizes = (offs[:, 1:] - offs[:, :-1]).long()
    for b in range(2):
        for h in range(2):
            want = [c for c in range(84) if keep[b, h, c] and sizes[h, c] > 0]
            got = [int(start_) for j in range(start.shape[1])
                   for start_ in start[b * 2 + h, j, :int(count[b * 2 + h, j])]]
            assert got == [int(offs[h, c]) for c in want]
            assert int(kept_rows[b * 2 + h].sum()) == int(sizes[h, want].sum())
    o_r, lse_r, _ = R.squeezed_decode_reference(*args)
    for junk in range(2):
        st2, sz2 = start.clone(), size.clone()
        live = torch.arange(16)[None, None] < count[..., None]
        st2[~live] = torch.randint(0, 50, (int((~live).sum()),), generator=gen, dtype=torch.int32)
        sz2[~live] = torch.randint(1, 9, (int((~live).sum()),), generator=gen, dtype=torch.int32)
        o, lse, _ = squeezed_decode_listed_triton(*args, programs=4, block_e=4, block_n=16, local_splits=2,
                                                  listed=(st2, sz2, count, kept_rows))
        assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5
