"""The flat index's cluster numbering (`spread_order`): similar clusters go to different decode blocks, and the
renumbering changes nothing the lookup computes."""

from __future__ import annotations

import math

import torch

from lmsqueeze.methods.squeezed import reference as R
from lmsqueeze.methods.squeezed.index import SqueezedIndex, build_layer_index, spread_order
from lmsqueeze.methods.squeezed.lookup import log_sizes


def test_spread_order_deals_similar_clusters_into_different_blocks():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    H, groups, per, D, block = 2, 12, 5, 32, 8          # 60 clusters, 8 blocks: a group's 5 fit in 5 blocks
    dirs = torch.nn.functional.normalize(torch.randn(H, groups, D, generator=gen), dim=-1)
    cents = dirs.repeat_interleave(per, 1) + 0.01 * torch.randn(H, groups * per, D, generator=gen)
    cents = cents[:, torch.randperm(groups * per, generator=gen)]          # K-means' order: shuffled
    perm = spread_order(cents, block, group=per)
    C = cents.shape[1]
    for h in range(H):
        assert torch.equal(torch.sort(perm[h]).values, torch.arange(C))
        # recover the groups from the data: clusters whose centroids are within 0.2 of each other
        near = torch.cdist(cents[h], cents[h]) < 0.2
        for b0 in range(0, C, block):
            ids = perm[h, b0:b0 + block]
            sub = near[ids][:, ids]
            assert int(sub.sum()) == len(ids)           # no two clusters of one group in a block


def test_spread_numbering_changes_no_decode_output():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    Hkv, G, S, D = 2, 2, 700, 32
    dirs = torch.nn.functional.normalize(torch.randn(Hkv, 24, D, generator=gen), dim=-1) * math.sqrt(D)
    keys = dirs.gather(1, torch.randint(0, 24, (Hkv, S, 1), generator=gen).expand(-1, -1, D))
    keys = keys + 0.5 * torch.randn(Hkv, S, D, generator=gen)
    values = torch.randn(Hkv, S, D, generator=gen)
    q_obs = torch.randn(Hkv * G, 16, D, generator=gen)
    sc = D ** -0.5
    kw = {"centroids": 0.1, "sparsity": 0.7, "observation": 16, "iters": 4}
    pos = torch.arange(S) - S
    a, _ = build_layer_index(keys, values, pos, q_obs, sc, **kw)
    b, _ = build_layer_index(keys, values, pos, q_obs, sc, spread=None, **kw)
    assert not torch.equal(a["centroids"], b["centroids"])                 # really renumbered
    assert torch.equal(torch.sort(a["offsets"][:, 1:-1].diff(prepend=a["offsets"][:, :1]), -1).values,
                       torch.sort(b["offsets"][:, 1:-1].diff(prepend=b["offsets"][:, :1]), -1).values)
    q = torch.randn(3, Hkv * G, D, generator=gen)
    lk, lv = torch.randn(3, Hkv, 9, D, generator=gen), torch.randn(3, Hkv, 9, D, generator=gen)
    lengths = torch.tensor([9, 4, 7], dtype=torch.int32)
    outs = []
    for t in (a, b):
        ix = SqueezedIndex.from_tensors(t, torch.device("cpu"), torch.float32)
        s, e = R.centroid_scores_reference(q, ix.centroids, log_sizes(ix.sizes), sc, 16)
        outs.append(R.squeezed_decode_reference(q, ix.keys, ix.values, ix.offsets, s, e, ix.log_threshold, lk, lv,
                                                lengths, sc))
    assert torch.equal(outs[0][2], outs[1][2])                             # same kept rows per head
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
