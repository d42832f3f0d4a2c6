"""SPEED pipelined decoding of looped models equals plain greedy decoding; flush rollback restores the cache."""

import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.speed import speed_decode_looped
from lmsqueeze.models.looped import LoopedCache, greedy_decode
from lmsqueeze.models.tiny import tiny_looped

tiny = tiny_looped


def prompt(seed: int, vocab: int = 61) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, vocab, (1, int(torch.randint(1, 10, (1,), generator=g))), generator=g)


@pytest.mark.parametrize("shape", [(4, 3), (2, 6)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_pipelined_equals_greedy(shape, seed):
    m = tiny(*shape, seed, head_dim=(64 if seed == 2 else 16), kv_heads=(4 if seed == 1 else 2))
    flushes = 0
    for j, n in enumerate([1, 2, 5, 19, 33]):
        ids = prompt(seed * 10 + j)
        out, st = speed_decode_looped(m, ids, n)
        assert torch.equal(out, greedy_decode(m, ids, n)), (shape, seed, n)
        assert st.new_tokens == n
        flushes += st.flushes
    assert flushes > 0  # the rollback path was exercised


@pytest.mark.parametrize("depth", [1, 2])
def test_shallower_pipeline_equals_greedy(depth):
    m = tiny(2, 6, 3)
    ids = prompt(7)
    out, st = speed_decode_looped(m, ids, 12, max_in_flight=depth)
    assert torch.equal(out, greedy_decode(m, ids, 12))
    assert max(st.in_flight_hist) <= depth
    if depth == 1:  # sequential: exactly the block passes of plain greedy decoding, never a flush
        assert st.steps == st.block_passes_greedy and st.flushes == 0


class CheckedCache(LoopedCache):
    """After every rollback, each (pass, layer) entry must equal a fresh run's KV of the same positions."""

    def __init__(self, reference: LoopedCache) -> None:
        super().__init__()
        self.reference = reference
        self.crops = 0

    def crop(self, length: int) -> None:
        super().crop(length)
        self.crops += 1
        for key, (k, v) in self.kv.items():
            assert k.shape[2] <= length
            rk, rv = self.reference.kv[key]
            torch.testing.assert_close(k, rk[:, :, :k.shape[2]], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(v, rv[:, :, :v.shape[2]], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 3), (2, 6)])
def test_flush_rollback_leaves_fresh_cache(shape):
    m = tiny(*shape, 5)
    ids, n = prompt(3), 16
    ref_out = greedy_decode(m, ids, n)
    fresh = LoopedCache()
    m(ref_out[:, :-1], cache=fresh)  # a fresh run over every position the pipeline runs
    cache = CheckedCache(fresh)
    out, st = speed_decode_looped(m, ids, n, cache=cache)
    assert torch.equal(out, ref_out)
    assert cache.crops == st.flushes > 0
    for key, (k, v) in cache.kv.items():  # at the end every pass holds exactly the fresh cache
        assert k.shape[2] == ref_out.shape[1] - 1
        torch.testing.assert_close(k, fresh.kv[key][0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(v, fresh.kv[key][1], rtol=1e-9, atol=1e-10)


def test_no_flush_fills_pipeline():
    """Blocks that are identities: every pass predicts the same token, so nothing flushes and the pipeline
    commits one token per step after filling (R - 1 steps)."""
    m = tiny(2, 6, 4)
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    ids, n = prompt(1), 15
    out, st = speed_decode_looped(m, ids, n)
    assert torch.equal(out, greedy_decode(m, ids, n))
    assert st.flushes == 0
    assert st.steps == (n - 1) + (6 - 1)
    assert max(st.in_flight_hist) == 6


def test_rejects_batch_and_bad_depth():
    m = tiny(4, 3, 0)
    with pytest.raises(LmsqueezeError):
        speed_decode_looped(m, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(LmsqueezeError):
        speed_decode_looped(m, torch.zeros(1, 3, dtype=torch.long), 4, max_in_flight=4)
