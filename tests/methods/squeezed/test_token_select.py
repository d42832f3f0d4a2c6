"""Per-token prefill selection (token_select.py, kernels.token_select_attention): the rule per token, the
reference against per-token attention, the Triton kernel (TRITON_INTERPRET=1) against the reference, and the
model end to end (sparsity 0 equals dense in every prefill mode; per-token differs from one set per chunk)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.squeezed import SqueezedAttention
from lmsqueeze.methods.squeezed import kernels as K
from lmsqueeze.methods.squeezed import reference as R
from lmsqueeze.methods.squeezed.index import SqueezedIndex, row_clusters
from lmsqueeze.methods.squeezed.lookup import group_log_scores
from lmsqueeze.methods.squeezed.token_select import block_union, kept_rows, token_keep
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _rows(Hkv, C, W, gen):
    sizes = torch.randint(0, 6, (Hkv, C), generator=gen)
    n = int(sizes.sum(-1).max()) + W
    offs = torch.zeros(Hkv, C + 2, dtype=torch.int32)
    offs[:, 1:C + 1] = torch.cumsum(sizes, -1).to(torch.int32)
    offs[:, C + 1] = n
    return offs, row_clusters(offs, n), n


def _toy_index(Hkv, D, C, W, gen, tau: float) -> SqueezedIndex:
    offs, _, n = _rows(Hkv, C, W, gen)
    t = {"keys": torch.randn(Hkv, n, D, generator=gen), "values": torch.randn(Hkv, n, D, generator=gen),
         "positions": torch.arange(n, dtype=torch.int32).expand(Hkv, n) - n, "offsets": offs,
         "centroids": torch.randn(Hkv, C, D, generator=gen), "log_threshold": torch.full((Hkv,), tau)}
    return SqueezedIndex.from_tensors(t, "cpu", torch.float32)


@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (3, 64)])
def test_token_keep_is_the_decode_rule_per_token(G, D, gen):
    B, Hkv, T, C = 2, 2, 5, 13
    idx = _toy_index(Hkv, D, C, 4, gen, tau=-3.0)
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    keep = token_keep(q, idx, D ** -0.5, 0.9, 0.5, "threshold")
    assert keep.shape == (B, Hkv, T, C + 1) and keep[..., -1].all()
    for t in range(T):                                   # token t alone = the decode lookup of its query
        s = torch.einsum("bhgd,hcd->bhgc", q[:, :, t].reshape(B, Hkv, G, D), idx.centroids) * D ** -0.5
        a = group_log_scores(s[:, :, :, None], idx.log_sizes[None, :, None, None])[:, :, 0]
        assert torch.equal(keep[:, :, t, :-1], a > -3.0)
    assert 0 < keep[..., :-1].float().mean() < 1                      # the test can tell
    budget = token_keep(q, idx, D ** -0.5, 0.7, 0.5, "budget")
    rows = kept_rows(budget, idx.offsets) - (idx.offsets[:, -1] - idx.offsets[:, -2]).float()[None, :, None]
    assert (rows >= 0.3 * idx.clustered).all()                        # each token reaches its own budget
    with pytest.raises(LmsqueezeError):
        token_keep(q, idx, 1.0, 0.9, 0.5, "nope")


def test_block_union_covers_each_blocks_tokens(gen):
    B, Hkv, T, K_ = 2, 3, 9, 7
    keep = torch.rand(B, Hkv, T, K_, generator=gen) < 0.2
    for G, bm in [(1, 4), (4, 16), (3, 16)]:
        u = block_union(keep, G, bm)
        assert u.shape[2] == -(-(T * G) // bm)
        for m in range(u.shape[2]):
            toks = sorted({r // G for r in range(m * bm, min((m + 1) * bm, T * G))})
            assert torch.equal(u[:, :, m], keep[:, :, toks].any(2))


@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (3, 64)])
def test_token_select_attention_reference_is_per_token_indexed_attention(G, D, gen):
    B, Hkv, T, C, L = 2, 2, 6, 11, 17
    _, rc, n = _rows(Hkv, C, 3, gen)
    keys, vals = torch.randn(Hkv, n, D, generator=gen), torch.randn(Hkv, n, D, generator=gen)
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    lk, lv = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    lengths = torch.tensor([T + 3, L], dtype=torch.int32)
    keep = torch.rand(B, Hkv, T, C + 1, generator=gen) < 0.4
    o, lse = R.token_select_attention_reference(q, keys, vals, keep, rc, lk, lv, lengths, D ** -0.5)
    from lmsqueeze.methods.squeezed.lookup import mask_to_index

    for t in range(T):                                   # token t = one query over its own rows
        idx, cnt = mask_to_index(keep[:, :, t].gather(-1, rc[None].expand(B, -1, -1)))
        o_t, lse_t = R.indexed_attention_reference(q[:, :, t:t + 1], keys, vals, idx, cnt, lk, lv,
                                                   lengths - (T - 1 - t), D ** -0.5)
        assert _rel(o[:, :, t:t + 1], o_t) < 1e-5 and _rel(lse[:, :, t:t + 1], lse_t) < 1e-5


@pytest.mark.parametrize("G,D,bm", [(1, 64, 16), (4, 128, 16), (3, 64, 16), (2, 64, None)])
def test_token_select_kernel_matches_reference(G, D, bm, gen):
    pytest.importorskip("triton")
    B, Hkv, T, C, L = 2, 2, 7, 23, 21
    _, rc, n = _rows(Hkv, C, 5, gen)
    keys, vals = torch.randn(Hkv, n, D, generator=gen), torch.randn(Hkv, n, D, generator=gen)
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    lk, lv = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    lengths = torch.tensor([T + 2, L], dtype=torch.int32)
    starts = torch.tensor([1, 0], dtype=torch.int32)
    keep = torch.rand(B, Hkv, T, C + 1, generator=gen) < 0.3
    keep[0, 0, 0] = False                                # a token with no fixed row at all
    sc = D ** -0.5
    o, lse = K.token_select_attention_triton(q, keys, vals, keep, rc, lk, lv, lengths, sc, starts, return_lse=True,
                                             block_m=bm, block_n=16)
    o_r, lse_r = R.token_select_attention_reference(q, keys, vals, keep, rc, lk, lv, lengths, sc, starts)
    assert _rel(o, o_r) < 1e-5 and _rel(lse, lse_r) < 1e-5


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, art, ids):
    with lmsqueeze.apply(model, art) as session:
        cache = session.new_cache()
        out = [model(ids[:, :6], **cache_kw(model, cache)).logits[0]]
        out += [model(ids[:, i:i + 1], **cache_kw(model, cache)).logits[0] for i in range(6, ids.shape[1])]
    return torch.cat(out)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_modes_sparsity_zero_equal_dense_and_differ_when_sparse(family):
    model = tiny_model(family)
    S = 96
    ids = _ids(7, S + 9)
    with torch.no_grad():
        ref = model(ids).logits[0, S:]
    cfg = {"centroids": 0.2, "observation": 8}
    base = SqueezedAttention(sparsity=0.0, **cfg).prepare(model, ids[:, :S])
    sparse = SqueezedAttention(sparsity=0.9, **cfg).prepare(model, ids[:, :S], reuse=base)
    outs = {}
    for mode in ("token", "token-budget", "chunk"):
        dense_art = SqueezedAttention(sparsity=0.0, prefill=mode, **cfg).prepare(model, ids[:, :S], reuse=base)
        torch.testing.assert_close(_logits(model, dense_art, ids[:, S:]), ref, atol=2e-5, rtol=1e-4)
        art = SqueezedAttention(sparsity=0.9, prefill=mode, **cfg).prepare(model, ids[:, :S], reuse=sparse)
        outs[mode] = _logits(model, art, ids[:, S:])
    assert (outs["token"][:6] - outs["chunk"][:6]).abs().max() > 1e-4    # the prefill selection differs
    assert (outs["token"][:6] - ref[:6]).abs().max() > 1e-4               # and is sparse
    with pytest.raises(LmsqueezeError):
        SqueezedAttention(prefill="all")


def test_decode_reselects_every_step(monkeypatch):
    import lmsqueeze.methods.squeezed.attention as att

    model = tiny_model("llama")
    S = 96
    ids = _ids(11, S + 10)
    art = SqueezedAttention(centroids=0.2, sparsity=0.8, observation=8).prepare(model, ids[:, :S])
    calls, kept = [], []
    real_scores = att.decode_scores

    def spy(q, idx, scaling, count=None):
        calls.append(q.shape)
        return real_scores(q, idx, scaling, count)
    monkeypatch.setattr(att, "decode_scores", spy)
    real_note = att.SqueezedState.note_rows
    monkeypatch.setattr(att.SqueezedState, "note_rows", lambda self, c: (kept.append(c.clone()), real_note(self, c)))
    _logits(model, art, ids[:, S:])                        # 6 prefill tokens, then 4 decode steps
    layers = len(model.model.layers)
    assert len(calls) == 4 * layers                        # one lookup per layer per decode step
    per_step = torch.stack([torch.stack(kept[layers + i * layers:layers + (i + 1) * layers]) for i in range(4)])
    assert not all(torch.equal(per_step[0], per_step[i]) for i in range(1, 4))   # the key sets change per step


def test_per_token_prefill_in_token_slices_equals_one_pass(monkeypatch):
    import lmsqueeze.methods.squeezed.attention as att

    model = tiny_model("qwen3")
    S = 96
    ids = _ids(13, S + 12)
    art = SqueezedAttention(centroids=0.2, sparsity=0.8, observation=8).prepare(model, ids[:, :S])
    whole = _logits(model, art, ids[:, S:])
    monkeypatch.setattr(att, "REFERENCE_SCORES", 3 * model.config.num_attention_heads * 100)   # ~3 tokens a slice
    torch.testing.assert_close(_logits(model, art, ids[:, S:]), whole, atol=1e-5, rtol=1e-5)
