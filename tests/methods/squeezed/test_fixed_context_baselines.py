"""The fixed-context baselines (Quest, StreamingLLM, SnapKV, random) and the lookup helpers."""

from __future__ import annotations

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import load_artifact
from lmsqueeze.methods.baselines.quest import Quest, page_bounds, quest_scores, quest_select
from lmsqueeze.methods.baselines.random_select import RandomSelect
from lmsqueeze.methods.baselines.snapkv import SnapKV
from lmsqueeze.methods.baselines.streaming import StreamingLLM, streaming_rows
from lmsqueeze.methods.squeezed.cluster import spherical_kmeans
from lmsqueeze.methods.squeezed.lookup import budget_keep, mask_to_index
from lmsqueeze.methods.squeezed.thresholds import weighted_log_threshold
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw

S = 64
METHODS = [lambda b: Quest(budget=b, page_size=8), lambda b: StreamingLLM(budget=b),
           lambda b: SnapKV(budget=b, window=8), lambda b: RandomSelect(budget=b)]


@torch.no_grad()
def _logits(model, art, q):
    with lmsqueeze.apply(model, art) as session:
        cache = session.new_cache()
        out = torch.cat([model(q[:, :3], **cache_kw(model, cache)).logits[0]] +
                        [model(q[:, i:i + 1], **cache_kw(model, cache)).logits[0] for i in range(3, q.shape[1])])
    return out, cache


@pytest.mark.parametrize("make", METHODS)
def test_baselines_full_budget_is_dense_and_small_budget_is_sparse(make, tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 256, (1, S + 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits[0, S:]
    small = make(0.25).prepare(model, ids[:, :S])
    small.save(tmp_path / "a")
    out, cache = _logits(model, load_artifact(tmp_path / "a"), ids[:, S:])
    rows = [layer.rows_read / layer.rows_calls for layer in cache.layers]
    assert all(r <= 0.25 * S for r in rows), rows                    # the budget holds (metadata included)
    assert (out - ref).abs().max() > 1e-4
    if not isinstance(small.method, Quest):                           # Quest's page bounds take budget
        out, _ = _logits(model, make(1.0).prepare(model, ids[:, :S]), ids[:, S:])
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_quest_bound_and_selection():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 50, 16, generator=g)                        # [Hkv, N, D], last page partial
    q = torch.randn(3, 4, 16, generator=g)                            # [B, Hq=4, D], G = 2
    lo, hi = page_bounds(keys, 8)
    bound = quest_scores(q, lo, hi)                                   # [B, Hkv, P]
    true = torch.einsum("bhgd,hnd->bhgn", q.reshape(3, 2, 2, 16), keys).amax(2)
    true = torch.nn.functional.pad(true, (0, 6), value=-1e9).reshape(3, 2, 7, 8).amax(-1)
    assert (bound >= true - 1e-5).all()                               # an upper bound of every page's q·k
    top = quest_select(q, lo, hi, 2)
    assert top.shape == (3, 2, 2) and (top == bound.argmax(-1, keepdim=True)).any(-1).all()
    with pytest.raises(LmsqueezeError):
        Quest(budget=0)


def test_streaming_rows_and_helpers():
    assert streaming_rows(10, 5, 2).tolist() == [0, 1, 7, 8, 9]
    mask = torch.tensor([[[True, False, True, True]]])
    idx, cnt = mask_to_index(mask)
    assert idx.tolist() == [[[0, 2, 3]]] and cnt.tolist() == [[3]]
    keep = budget_keep(torch.tensor([[[0.1, 3.0, float("-inf"), 2.0]]]), torch.tensor([[5, 5, 5, 0]]), 6)
    assert keep.tolist() == [[[True, True, False, False]]]            # best first, crossing cluster kept
    a = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])                        # one query, four clusters
    tau = weighted_log_threshold(a, torch.tensor([[1, 1, 1, 1]]), 0.5)
    assert (a > tau).sum() == 2
    assert weighted_log_threshold(a, torch.tensor([[1, 1, 1, 1]]), 0.0).isneginf().all()


def test_spherical_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(2)
    dirs = torch.nn.functional.normalize(torch.randn(2, 4, 16, generator=g), dim=-1)
    which = torch.randint(0, 4, (2, 200), generator=g)
    x = dirs.gather(1, which[..., None].expand(-1, -1, 16)) * (1 + torch.rand(2, 200, 1, generator=g))
    labels = spherical_kmeans(x + 0.01 * torch.randn(2, 200, 16, generator=g), 4, iters=10)
    for h in range(2):                                                # same partition up to renaming
        pairs = set(zip(which[h].tolist(), labels[h].tolist()))
        assert len(pairs) == 4
    with pytest.raises(LmsqueezeError):
        spherical_kmeans(x, 500)


def test_prepare_from_a_shared_capture_equals_fresh():
    from lmsqueeze.methods.squeezed import SqueezedAttention
    from lmsqueeze.methods.squeezed.context import capture_context

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(3))
    cap = capture_context(model, ids, 16)
    for method in (SqueezedAttention(centroids=0.2, observation=8), SnapKV(budget=0.3, window=8), Quest(budget=0.5)):
        a, b = method.prepare(model, ids), method.prepare(model, ids, captured=cap)
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k])
    with pytest.raises(LmsqueezeError):                               # too few observation queries captured
        SqueezedAttention(observation=32).prepare(model, ids, captured=cap)
