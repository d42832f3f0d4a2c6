"""Static (graph-ready) SPEED pipeline: token-identical to greedy decoding; its Triton kernels (interpreter) match
their PyTorch references."""

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.speed import speed_decode_looped
from lmsqueeze.methods.speed.static_kernels import greedy_update, pipeline_update, rope_write
from lmsqueeze.methods.speed.static_pipeline import (
    build_static,
    greedy_decode_static,
    pipeline_step,
    run_pipeline,
    speed_decode_static,
    start_static,
    static_ids,
)
from lmsqueeze.models.looped import greedy_decode
from lmsqueeze.models.tiny import tiny_looped

tiny = tiny_looped


def prompt(seed: int, vocab: int = 61) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + seed)
    return torch.randint(0, vocab, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g)


@pytest.mark.parametrize("shape,seed,head_dim,kv_heads", [((4, 3), 0, 16, 2), ((4, 3), 1, 64, 1), ((2, 6), 2, 16, 4),
                                                          ((2, 6), 3, 64, 2)])
def test_static_pipelined_equals_greedy(shape, seed, head_dim, kv_heads):
    m = tiny(*shape, seed, head_dim=head_dim, kv_heads=kv_heads)
    flushes = 0
    for j, n in enumerate([1, 2, 4, 17, 30]):
        ids = prompt(seed * 10 + j)
        ref = greedy_decode(m, ids, n)
        out, st = speed_decode_static(m, ids, n, max_len=ids.shape[1] + n + 3)
        assert torch.equal(out, ref), (shape, seed, n)
        assert torch.equal(greedy_decode_static(m, ids, n), ref), (shape, seed, n)
        _, est = speed_decode_looped(m, ids, n)  # same schedule as the eager pipeline
        assert (st.steps, st.flushes, st.flushed_tokens, st.new_tokens) == \
            (est.steps, est.flushes, est.flushed_tokens, est.new_tokens)
        flushes += st.flushes
    assert flushes > 0  # the rollback-by-length path was exercised


def test_static_buffers_reused_across_prompts():
    """One set of buffers (as under a captured graph) serves prompts of different lengths back to back: stale KV
    of a longer earlier decode never leaks into a later one."""
    m = tiny(4, 3, 5)
    st = build_static(m, 40)
    for j, n in enumerate([25, 9, 30, 3]):
        ids = prompt(70 + j)
        start_static(st, m, ids, n)
        run_pipeline(st, lambda: pipeline_step(st))
        assert torch.equal(static_ids(st), greedy_decode(m, ids, n)), (j, n)


def test_static_rejects_bad_input():
    m = tiny(2, 3, 0)
    with pytest.raises(LmsqueezeError):
        speed_decode_static(m, torch.zeros(2, 3, dtype=torch.long), 4)
    st = build_static(m, 8)
    with pytest.raises(LmsqueezeError):
        start_static(st, m, torch.zeros(1, 5, dtype=torch.long), 4)  # 5 + 4 > max_len 8


@pytest.mark.parametrize("head_dim,hq,hkv", [(64, 4, 2), (128, 2, 2)])
def test_rope_write_triton_matches_reference(head_dim, hq, hkv):
    torch.manual_seed(head_dim)
    m, s = 3, 11
    qkv = torch.randn(m, (hq + 2 * hkv) * head_dim)
    cos, sin = torch.randn(s, head_dim), torch.randn(s, head_dim)
    rpos, wpos = torch.randint(0, s, (m,)), torch.randperm(s)[:m]
    kc, vc = torch.randn(m, hkv, s, head_dim), torch.randn(m, hkv, s, head_dim)
    kc2, vc2 = kc.clone(), vc.clone()
    a = rope_write(qkv, cos, sin, rpos, wpos, kc, vc, hq, hkv, triton=False)
    b = rope_write(qkv, cos, sin, rpos, wpos, kc2, vc2, hq, hkv, triton=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc, kc2, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc, vc2)


def test_pipeline_update_triton_matches_reference():
    g = torch.Generator().manual_seed(7)
    flushed = 0
    for trial in range(24):
        r = 2 + trial % 5
        d, v = 40 + trial, 13
        tok = torch.randint(0, v, (r,), generator=g)
        pos = 10 + torch.arange(r - 1, -1, -1)  # slot r: the older (deeper) token
        valid = (torch.rand(r, generator=g) < 0.75).int()
        pred = torch.where(torch.rand(r, generator=g) < 0.6, torch.roll(tok, 1), torch.randint(0, v, (r,), generator=g))
        args = [pred, tok, pos, valid, torch.zeros(r, dtype=torch.long), torch.zeros(r, dtype=torch.int32),
                torch.randn(r, d, generator=g), torch.randn(r, d, generator=g), torch.randn(v, d, generator=g),
                torch.full((40,), -1), torch.zeros(3, dtype=torch.long),
                torch.tensor([int(torch.randint(9, 16, (1,), generator=g))])]
        a, b = [x.clone() for x in args], [x.clone() for x in args]
        pipeline_update(*a, 30, triton=False)
        pipeline_update(*b, 30, triton=True)
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), (trial, i)
        flushed += int(a[10][1])
    assert flushed > 0


def test_greedy_update_triton_matches_reference():
    args = [torch.tensor([5]), torch.tensor([7]), torch.tensor([7]), torch.tensor([8], dtype=torch.int32),
            torch.randn(1, 40), torch.randn(9, 40), torch.full((20,), -1), torch.zeros(3, dtype=torch.long)]
    a, b = [x.clone() for x in args], [x.clone() for x in args]
    greedy_update(*a, triton=False)
    greedy_update(*b, triton=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert int(a[6][8]) == 5 and int(a[1][0]) == 8 and torch.equal(a[4][0], a[5][5])
