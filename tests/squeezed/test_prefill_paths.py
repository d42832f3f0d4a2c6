"""Prefill pieces touched for speed: the centroid-scoring kernel at other tile configs (TRITON_INTERPRET=1, fp32)
against its reference, and the host-sync-free row selection against the synced one."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.methods.squeezed import kernels as K
from lmsqueeze.methods.squeezed import reference as R
from lmsqueeze.methods.squeezed.attention import prefill_rows
from lmsqueeze.methods.squeezed.index import SqueezedIndex, build_layer_index, row_clusters
from lmsqueeze.methods.squeezed.lookup import log_sizes

pytest.importorskip("triton")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("G,D,cfg", [(1, 64, (32, 16, 4, 2)), (4, 128, (16, 32, 2, 3)), (3, 64, (64, 16, 4, 1))])
def test_prefill_scores_configs_match_reference(G, D, cfg, gen):
    B, Hkv, T, C = 2, 2, 37, 45                      # odd: partial query and centroid tiles
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    cents = torch.randn(Hkv, C, D, generator=gen)
    sizes = torch.randint(0, 5, (Hkv, C), generator=gen)  # some empty clusters (-inf log size)
    ls = log_sizes(sizes)[None].expand(B, -1, -1).clone()
    ls[1, 0, :7] = float("-inf")                       # per-sequence exclusions
    p_r = R.prefill_scores_reference(q, cents, ls, D ** -0.5)
    for exp2 in (False, True):   # base e with selects, or base 2 with the scale in an FMA and -inf biases
        p = K.prefill_scores_triton(q, cents, ls, D ** -0.5, *cfg, exp2=exp2)
        assert _rel(p, p_r) < 1e-5
    assert (p[1, :G, :7] == 0).all() and (p[..., sizes[0] == 0][:, :G] == 0).all()


@pytest.mark.parametrize("B", [1, 2])
def test_sync_free_prefill_rows_equal_synced(B, gen):
    Hkv, G, N, D, W = 2, 2, 301, 64, 9
    keys, values = torch.randn(Hkv, N, D, generator=gen), torch.randn(Hkv, N, D, generator=gen)
    q_obs = torch.randn(Hkv * G, W, D, generator=gen)
    t, _ = build_layer_index(keys, values, torch.arange(N) - N, q_obs, D ** -0.5, centroids=0.1, sparsity=0.7,
                             observation=W, iters=4)
    idx = SqueezedIndex.from_tensors(t, torch.device("cpu"), torch.float32)
    q = torch.randn(B, Hkv * G, 13, D, generator=gen)
    rows, cnt = prefill_rows(q, idx, D ** -0.5, 0.7, 0.5, sync_free=False)
    rows_f, cnt_f = prefill_rows(q, idx, D ** -0.5, 0.7, 0.5, sync_free=True)
    assert torch.equal(cnt, cnt_f) and rows_f.shape[-1] == idx.keys.shape[1]
    assert (cnt < idx.keys.shape[1]).all() and (cnt >= W).all()   # sparse, window always read
    for b in range(B):
        for h in range(Hkv):
            n = int(cnt[b, h])
            assert torch.equal(rows[b, h, :n], rows_f[b, h, :n])


@pytest.mark.parametrize("B,width", [(1, None), (3, None), (2, "N")])
def test_rows_from_clusters_equals_mask_to_index(B, width, gen):
    """The cluster-scan row list equals the row-scan one (random keep masks incl. all / none kept, empty clusters,
    the observation window as cluster C)."""
    from lmsqueeze.methods.squeezed.lookup import keys_from_clusters, mask_to_index, rows_from_clusters

    H, C, W = 3, 23, 4
    offs, rc, _ = _clustered_rows(H, C, W, gen)
    n = rc.shape[1]
    keep = torch.rand(B, H, C + 1, generator=gen) < 0.4
    keep[0, 0] = True
    keep[-1, -1] = False
    w = n if width == "N" else None
    want = mask_to_index(keys_from_clusters(keep, rc), w)
    got = rows_from_clusters(keep, offs, rc, w)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert int(got[1][0, 0]) == n and int(got[1][-1, -1]) == 0


def _clustered_rows(H: int, C: int, W: int, gen):
    """Offsets [H, C + 2] and row clusters [H, N] of a random cluster-sorted layout (some empty clusters, the
    observation window of W rows as cluster C)."""
    sizes = torch.randint(0, 6, (H, C), generator=gen)
    sizes[:, 1] = 0
    n = int(sizes.sum(-1).max()) + W
    offs = torch.full((H, C + 2), n, dtype=torch.int32)
    offs[:, 0] = 0
    offs[:, 1:C + 1] = torch.cumsum(sizes, -1)
    return offs, row_clusters(offs, n), sizes


@pytest.mark.parametrize("B,G,C,budget", [(1, 4, 37, "tie"), (2, 1, 130, "exact"), (2, 2, 61, 90),
                                          (3, 2, 21, 10**6), (2, 3, 50, 0)])
def test_chunk_rows_kernel_matches_reference(B, G, C, budget, gen):
    """The two-kernel 'chunk' selection (binary search for the crossing weight, no sort) gives the same row lists
    and counts as budget_keep + rows_from_clusters: ties (many zero weights, a block of equal weights that the
    budget crosses: "tie"), a budget ending exactly at a cluster boundary ("exact": the next cluster is not
    read), empty clusters, a budget above every key, a zero budget."""
    H, W, T = 2, 3, 7
    offs, rc, sizes = _clustered_rows(H, C, W, gen)
    psum = torch.rand(B, H * G, C, generator=gen) * 0.5 + 0.5     # distinct weights in [0.5, 1)
    psum[:, :, : C // 3] = 0.0                                   # underflowed weights: eligible, ranked last
    psum[:, :, C // 3: C // 2] = 0.25                            # a block of equal weights
    if budget in ("tie", "exact"):
        top = int(sizes[0, C // 2:].sum())                       # keys of the weights above the tie block
        tie = sizes[0, C // 3: C // 2]
        if budget == "tie":
            budget = top + int(tie.sum()) // 2 + 1
        else:
            w = psum[0, :G].amax(0)
            order = torch.argsort(w, descending=True, stable=True)
            cum = torch.cumsum(sizes[0][order], 0)
            budget = int(cum[len(cum) // 4])                     # exactly the keys of the first quarter
    n = rc.shape[1]
    want = R.chunk_rows_reference(psum, offs, rc, T, budget, n)
    got = K.chunk_rows_triton(psum, offs, rc, budget)
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert torch.equal(got[0], want[0])
    if 0 < budget < 10**6:
        assert (want[1] < n).all()                               # the budget binds
    # exact budget: the crossing cluster gives only the keys that fill it, so every head reads budget + W rows
    want_x = R.chunk_rows_reference(psum, offs, rc, T, budget, n, exact=True)
    got_x = K.chunk_rows_triton(psum, offs, rc, budget, exact=True)
    assert torch.equal(got_x[1], want_x[1]) and torch.equal(got_x[0], want_x[0])
    held = sizes.sum(-1)                                         # clustered keys per head; the rest is the window
    assert torch.equal(want_x[1], (held.clamp(max=budget) + n - held).to(torch.int32)[None].expand(B, -1))
    for b in range(B):                                           # a subset of the full rule's rows
        for h in range(H):
            full = set(want[0][b, h, :int(want[1][b, h])].tolist())
            assert set(want_x[0][b, h, :int(want_x[1][b, h])].tolist()) <= full
