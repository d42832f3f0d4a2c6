"""Windowed RoPE against the explicit formula, code assignment and lookup tables, the candidate histogram, VQ."""

from __future__ import annotations

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.a2ats import retrieval, vq
from lmsqueeze.methods.a2ats.calibrate import fit_layer
from lmsqueeze.methods.a2ats.reference import selected_slots
from lmsqueeze.methods.a2ats.windowed_rope import (
    band_distances,
    band_edges,
    band_queries,
    distance_tables,
    multi_distance_tables,
    windowed_scores,
    wrope_query,
)
from lmsqueeze.models.rope import rope_tables
from lmsqueeze.models.tiny import tiny_model


def _explicit_logit(q: torch.Tensor, k: torch.Tensor, delta: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """q·R(delta)·k for half-split RoPE, from the angle-difference identity (no rotation of q or k)."""
    h = q.shape[-1] // 2
    a, b, c, d = q[..., :h], q[..., h:], k[..., :h], k[..., h:]
    ang = delta * inv_freq
    return ((a * c + b * d) * torch.cos(ang) - (b * c - a * d) * torch.sin(ang)).sum(-1)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_windowed_scores_equal_the_explicit_formula(head_dim):
    model = tiny_model("llama", head_dim=head_dim, num_attention_heads=4, hidden_size=64)
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.double()
    B, Hq, Hkv, S, T, D = 2, 4, 2, 41, 3, head_dim
    sinks, window, distance = 3, 7, 113
    q = torch.randn(B, Hq, T, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64)
    starts = torch.tensor([0, 5])
    pos = torch.arange(S)[None].expand(B, -1)
    cos, sin = rope_tables(rotary, pos, torch.float64)
    cos_b, sin_b = distance_tables(rotary, distance, torch.float64, "cpu")
    got = windowed_scores(q, k, cos, sin, cos_b, sin_b, S - T, starts, sinks, window)
    m = torch.arange(S - T, S)[None, :, None]  # query positions
    j = torch.arange(S)[None, None, :]
    st = starts[:, None, None]
    near = ((j >= st) & (j < st + sinks)) | (m - j < window)  # [B, T, S]
    delta = torch.where(near, (m - j).double(), float(distance))  # relative position used per pair
    qe = q[:, :, :, None, :]  # [B, Hq, T, 1, D]
    ke = k.repeat_interleave(Hq // Hkv, dim=1)[:, :, None, :, :]  # [B, Hq, 1, S, D]
    want = _explicit_logit(qe, ke, delta[:, None, :, :, None], inv_freq)
    # rotary tables are computed in float32 by transformers, hence the tolerance
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not near.all() and near.any()


def test_lookup_table_scores_far_keys_like_windowed_rope():
    """With every key its own codeword, LUT[h, code_j] is RoPE(q, distance) · k_pre exactly."""
    model = tiny_model("qwen3")
    rotary = model.model.rotary_emb
    B, Hkv, G, S, D = 2, 2, 2, 30, 16
    q = torch.randn(B, Hkv * G, 1, D)
    k = torch.randn(B, Hkv, S, D)
    cos_b, sin_b = distance_tables(rotary, 2048, torch.float32, "cpu")
    score_cb = k[0].contiguous()  # [Hkv, C=S, D]: sequence 0's keys as the codebook
    lut = retrieval.lookup_table(wrope_query(q, cos_b, sin_b)[:, :, 0], score_cb)  # [B, Hkv, G, S]
    want = torch.einsum("bhgd,hsd->bhgs", wrope_query(q, cos_b, sin_b)[:, :, 0].reshape(B, Hkv, G, D), k[0])
    torch.testing.assert_close(lut, want, atol=1e-5, rtol=1e-5)
    far = windowed_scores(q, k, *rope_tables(rotary, torch.arange(S)[None].expand(B, -1), torch.float32),
                          cos_b, sin_b, S - 1, torch.zeros(B, dtype=torch.long), 0, 1)  # window 1: all far
    torch.testing.assert_close(lut[0, :, :, :S - 1].reshape(Hkv * G, S - 1), far[0, :, 0, :S - 1], atol=1e-4,
                               rtol=1e-4)
    folded = retrieval.lookup_table(q[:, :, 0], retrieval.fold_rotation(score_cb, cos_b, sin_b))  # pre-RoPE q
    torch.testing.assert_close(folded, lut, atol=1e-4, rtol=1e-4)


def test_band_lookup_table_scores_each_band_at_its_distance():
    """With every key its own codeword, the score of slot j's virtual code is RoPE(q, d_band(m - j)) · k_pre,
    and the slots `selected_slots` attends are exactly those whose (band, code) is selected."""
    model = tiny_model("llama")
    rotary = model.model.rotary_emb
    B, Hkv, G, S, D, window, bands = 2, 2, 2, 50, 16, 4, (10, 25)
    q = torch.randn(B, Hkv * G, D)
    k = torch.randn(Hkv, S, D)
    dists = band_distances(window, bands, 2048)
    assert dists == (6, 16, 35)
    cos, sin = multi_distance_tables(rotary, dists, torch.float32, "cpu")
    lut = retrieval.lookup_table(band_queries(q, cos, sin), k)  # [B, Hkv, G, NB * S]
    codes = torch.arange(S).expand(B, Hkv, S)
    dist = (S - 1 - torch.arange(S)).clamp_min(0)
    v = retrieval.virtual_codes(codes, dist[None, None], bands, S)  # [B, Hkv, S]
    got = lut.gather(3, v[:, :, None].expand(B, Hkv, G, S))
    for j in (0, 20, 30, 40, 45):
        d = dists[sum(int(S - 1 - j >= e) for e in bands)]
        qb = wrope_query(q[:, :, None], *distance_tables(rotary, d, torch.float32, "cpu"))[:, :, 0]
        want = torch.einsum("bhgd,hd->bhg", qb.reshape(B, Hkv, G, D), k[:, j])
        torch.testing.assert_close(got[..., j], want, atol=1e-4, rtol=1e-4)
    sel = torch.rand(B, Hkv, 3 * S) < 0.3
    mask = selected_slots(codes.to(torch.int16), sel, torch.zeros(B, dtype=torch.int32),
                          torch.full((B,), S, dtype=torch.int32), 0, window, near=False, bands=bands)
    assert torch.equal(mask[..., :S - window], sel.gather(2, v)[..., :S - window])
    assert not mask[..., S - window:].any()


def test_assigned_code_minimizes_the_query_weighted_error():
    torch.manual_seed(0)
    Hkv, N, D, C = 2, 300, 16, 12
    keys = torch.randn(N, Hkv, D) * torch.linspace(0.2, 3, D)
    qs = torch.randn(Hkv, 500, D) * torch.linspace(3, 0.1, D)
    qq = torch.bmm(qs.transpose(1, 2), qs).double()
    t, _ = fit_layer(keys, qq, C, iters=5, tol=0.0, seed=0, device=torch.device("cpu"))
    L = t["chol"]
    k = torch.randn(3, Hkv, 5, D)
    codes = retrieval.assign_codes(k, t["assign"], t["half_norms"])
    assert codes.dtype == torch.int16
    diff = k[:, :, :, None, :] - t["score"][None, :, None]  # [B, Hkv, T, C, D]: k − ĉ in key space
    err = torch.einsum("bhtcd,hde->bhtce", diff, L).pow(2).sum(-1)  # ‖(k − ĉ) L‖²
    torch.testing.assert_close(codes.long(), err.argmin(-1))


@pytest.mark.parametrize("bands", [(), (9, 16, 30)])
def test_histogram_updates_are_incremental_and_idempotent(bands):
    B, Hkv, S, C, sinks, window = 3, 2, 60, 9, 2, 5
    codes = torch.randint(0, C, (B, Hkv, S), dtype=torch.int16)
    starts = torch.tensor([0, 4, 11])
    counts, counted = retrieval.recount(codes, starts, 20, sinks, window, C, bands)
    edges = band_edges(window, bands)
    steps = list(range(21, S + 1))
    steps[10:10] = [28, 29, 30, 27, 28, 29, 30]  # steps run ahead, then back (graph warm-up)
    for n in steps:
        lengths = torch.full((B,), n, dtype=torch.int32)
        for _ in range(2):  # a replayed step must not count twice
            retrieval.shift_histogram(codes, counts, counted, lengths, starts, sinks, edges)
        want, _ = retrieval.recount(codes, starts, n, sinks, window, C, bands)
        assert torch.equal(counts, want), n
    kth = retrieval.tokens_to_keep(0.25, torch.tensor([40, 41]), torch.tensor([0, 3]))
    assert kth.tolist() == [10, 9] and kth.dtype == torch.int32


def test_cholesky_and_kmeans():
    torch.manual_seed(1)
    H = torch.randn(3, 8, 8)
    H = H @ H.transpose(1, 2)
    L = vq.cholesky_factor(H)
    Hn = H.double() / H.double().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    torch.testing.assert_close((L @ L.transpose(1, 2)).double(), Hn, atol=1e-4, rtol=1e-4)
    low_rank = torch.randn(2, 8, 1)
    L = vq.cholesky_factor(low_rank @ low_rank.transpose(1, 2))  # rank 1: needs jitter
    assert torch.isfinite(L).all()
    centers = torch.randn(2, 5, 4) * 20
    x = (centers[:, torch.arange(200) % 5] + 0.1 * torch.randn(2, 200, 4))
    got = vq.kmeans(x, 5, iters=20, seed=0)
    dist = torch.cdist(got, centers).amin(-1)
    assert dist.max() < 1.0  # every centroid sits on a true cluster
    assert torch.cdist(centers, got).amin(-1).max() < 1.0  # and every cluster has one
    with pytest.raises(LmsqueezeError):
        vq.kmeans(x[:, :4], 5)


def test_query_aware_codebook_has_lower_logit_error_than_plain_vq():
    torch.manual_seed(2)
    Hkv, N, D, C = 1, 2000, 16, 16
    keys = torch.randn(N, Hkv, D)  # isotropic keys
    scale = torch.ones(D)
    scale[:2] = 10.0
    qs = torch.randn(Hkv, 4000, D) * scale  # queries look along two directions only
    qq = torch.bmm(qs.transpose(1, 2), qs).double()

    def logit_error(t):
        x = keys.permute(1, 0, 2)
        codes = retrieval.assign_codes(x[None], t["assign"], t["half_norms"])[0].long()  # [Hkv, N]
        khat = t["score"][0][codes[0]]
        return ((qs[0] @ (x[0] - khat).T) ** 2).mean()

    qa, _ = fit_layer(keys, qq, C, iters=15, tol=0.0, seed=0, device=torch.device("cpu"))
    plain, _ = fit_layer(keys, None, C, iters=15, tol=0.0, seed=0, device=torch.device("cpu"))
    assert logit_error(qa) < 0.5 * logit_error(plain)


def test_shrunk_metric_blends_query_aware_and_plain_vq():
    """shrink = 0 is the query metric, 1 plain VQ (same codes), in between a logit error in between."""
    torch.manual_seed(3)
    Hkv, N, D, C = 2, 1500, 16, 12
    keys = torch.randn(N, Hkv, D)
    scale = torch.ones(D)
    scale[:3] = 8.0
    qs = torch.randn(Hkv, 3000, D) * scale
    qq = torch.bmm(qs.transpose(1, 2), qs).double()
    h = vq.shrink_metric(qq, 0.3)
    diag = torch.diagonal(qq, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    torch.testing.assert_close(h, 0.7 * qq / diag + 0.3 * torch.eye(D, dtype=torch.float64))
    x = keys.permute(1, 0, 2)

    def fit(shrink, aware=True):
        t, _ = fit_layer(keys, qq if aware else None, C, iters=10, tol=0.0, seed=0, device=torch.device("cpu"),
                         shrink=shrink)
        codes = retrieval.assign_codes(x[None], t["assign"], t["half_norms"])[0].long()  # [Hkv, N]
        khat = t["score"].gather(1, codes[..., None].expand(-1, -1, D))
        return codes, torch.einsum("hqd,hnd->hqn", qs, x - khat).pow(2).mean()

    codes_one, err_one = fit(1.0)
    codes_plain, err_plain = fit(0.0, aware=False)
    assert torch.equal(codes_one, codes_plain)  # shrink 1: the identity metric (any scale) = plain VQ
    _, err_zero = fit(0.0)
    _, err_mid = fit(0.5)
    assert err_zero < err_mid < err_plain
    from lmsqueeze.methods.a2ats import A2ATS

    with pytest.raises(LmsqueezeError):
        A2ATS(shrink=1.5)
