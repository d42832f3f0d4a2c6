import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.looped import LoopedCache, LoopedDecoder, greedy_decode, load_looped, save_looped


def _model(cfg, seed=0):
    m = LoopedDecoder(cfg)
    m.init_weights(seed=seed, std=0.2)  # large weights: logits differ clearly between passes
    return m.eval()


@pytest.mark.parametrize("unique,loops", [(4, 3), (2, 6), (1, 1)])
@pytest.mark.parametrize("heads,kv,head_dim", [(4, 2, 16), (4, 1, 64), (2, 2, 128)])
def test_per_pass_logits_shapes(tiny_cfg, unique, loops, heads, kv, head_dim):
    cfg = tiny_cfg(unique, loops, heads=heads, kv=kv, head_dim=head_dim)
    m = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    out = m(ids)
    assert len(out) == loops
    assert all(o.shape == (3, 17, cfg.vocab_size) for o in out)
    assert len(m.layers) == unique
    w = cfg.loss_weights()
    assert abs(sum(w) - 1) < 1e-9 and w == sorted(w)


@pytest.mark.parametrize("unique,loops,kv", [(4, 3, 2), (2, 6, 1), (2, 3, 4)])
def test_incremental_decoding_equals_full_forward(tiny_cfg, unique, loops, kv):
    cfg = tiny_cfg(unique, loops, kv=kv)
    m = _model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        full = m(ids)
        cache = LoopedCache()
        parts = [m(ids[:, :9], cache=cache), m(ids[:, 9:10], cache=cache), m(ids[:, 10:], cache=cache)]
    assert cache.seq_length(loops - 1, unique - 1) == 23
    assert set(cache.kv) == {(r, i) for r in range(loops) for i in range(unique)}
    for r in range(loops):
        inc = torch.cat([p[r] for p in parts], dim=1)
        torch.testing.assert_close(inc, full[r], atol=1e-4, rtol=1e-4)
    # crop rolls back: re-feeding the last tokens gives the same logits
    cache.crop(20)
    with torch.no_grad():
        again = m(ids[:, 20:], cache=cache)
    torch.testing.assert_close(again[-1], full[-1][:, 20:], atol=1e-4, rtol=1e-4)


def test_greedy_decode_matches_recompute(tiny_cfg):
    cfg = tiny_cfg(2, 3)
    m = _model(cfg, seed=2)
    prompt = torch.randint(0, cfg.vocab_size, (2, 11))
    fast = greedy_decode(m, prompt, 7)
    slow = prompt
    with torch.no_grad():
        for _ in range(7):
            slow = torch.cat([slow, m(slow)[-1][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


def test_save_load_round_trip(tiny_cfg, tmp_path, small_tokenizer):
    cfg = tiny_cfg(4, 3)
    m = _model(cfg, seed=3)
    save_looped(m, tmp_path / "m", dtype=torch.float32, tokenizer_dir=small_tokenizer)
    m2, tok = load_looped(tmp_path / "m")
    assert m2.config == cfg and tok is not None and tok.bos_token_id == 0
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        for a, b in zip(m(ids), m2(ids)):
            torch.testing.assert_close(a, b)
    # bf16 save halves the bytes and stays close
    save_looped(m, tmp_path / "bf16")
    m3, _ = load_looped(tmp_path / "bf16")
    with torch.no_grad():
        assert (m3(ids)[-1] - m(ids)[-1]).abs().max() < 0.1 * m(ids)[-1].abs().max()


def test_bad_configs_and_dirs(tiny_cfg, tmp_path):
    with pytest.raises(LmsqueezeError):
        tiny_cfg(heads=3, kv=2)
    with pytest.raises(LmsqueezeError):
        tiny_cfg(loops=3, exit_loss_weights=[1.0, 2.0])
    with pytest.raises(LmsqueezeError):
        load_looped(tmp_path)
