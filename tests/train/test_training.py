import json

import numpy as np
import pytest
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.looped import LoopedDecoder
from lmsqueeze.train.batches import MixedSampler
from lmsqueeze.train.corpus_stream import TokenStream
from lmsqueeze.train.export import save_hf
from lmsqueeze.train.loop import TrainConfig, pass_losses, train_loop
from lmsqueeze.train.schedule import lr_at, seq_len_at
from lmsqueeze.train.synthetic import RetrievalMix, RetrievalSynth
from lmsqueeze.train.tokenizer import fast_encoder


@pytest.fixture(scope="module")
def stream(small_tokenizer):
    from lmsqueeze.data.corpus import read_texts

    enc = fast_encoder(small_tokenizer)
    ids = []
    for text in read_texts(None, "train", max_chars=120_000):
        ids += enc.encode(text, add_special_tokens=False).ids + [1]
    s = TokenStream(len(ids))
    s.buf[:] = ids
    s.n = len(ids)
    s.finished.set()
    return s


def _cfg(**kw):
    base = dict(seq_len=256, batch_size=2, lr=3e-3, warmup_steps=3, max_steps=30, log_every=5, eval_every=0,
                ckpt_every=0, device="cpu", amp=False)
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_and_hf_dir_loads(tiny_cfg, stream, small_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(2, 1)
    torch.manual_seed(0)
    model = LoopedDecoder(cfg)
    model.init_weights(seed=0)
    fixed = MixedSampler(stream, 0, None, seed=1).batch(4, 256)
    with torch.no_grad():
        before = pass_losses(model, fixed)[0].item()
    sampler = MixedSampler(stream, 0, RetrievalSynth(fast_encoder(small_tokenizer), RetrievalMix(fraction=0.3)), seed=0)
    summary = train_loop(model, sampler, _cfg(), tmp_path / "run")
    with torch.no_grad():
        after = pass_losses(model, fixed)[0].item()
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 2 * 256
    assert after < before - 0.5, (before, after)
    assert sampler.synthetic_rows > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and {"loss", "lr", "tokens", "tok_per_s"} <= set(rows[-1])

    out = save_hf(model, tmp_path / "hf", small_tokenizer)
    assert all(p.stat().st_size < 15 * 2**20 for p in out.iterdir())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = fixed[:2, :64]
    with torch.no_grad():
        ref = model.to(torch.bfloat16).float()(ids)[-1]  # the directory holds bf16 weights
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_looped_training_and_resume_continues_step_count(tiny_cfg, stream, tmp_path):
    cfg = tiny_cfg(2, 3)
    model = LoopedDecoder(cfg)
    model.init_weights(seed=0)
    run = tmp_path / "run"
    first = train_loop(model, MixedSampler(stream, 0, seed=0), _cfg(max_steps=4, ckpt_every=2), run)
    assert first["steps"] == 4 and (run / "checkpoint.pt").exists()
    model2 = LoopedDecoder(cfg)
    sampler2 = MixedSampler(stream, 0, seed=123)
    second = train_loop(model2, sampler2, _cfg(max_steps=7, ckpt_every=2), run)
    steps = [r["step"] for r in second["log"] if "loss" in r]
    assert second["steps"] == 7 and second["tokens"] == 7 * 2 * 256
    assert steps[0] == 1 and max(steps) == 7 and all(s <= 4 for s in steps[: steps.index(5)])
    assert sampler2.rows == 7 * 2  # the sampler state came back with the checkpoint
    assert len(second["log"][-1]["pass_loss"]) == 3


def test_schedule_and_config_checks():
    assert lr_at(0, 0.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert seq_len_at(0.05, [(0.0, 256), (0.1, 1024)], 1024) == 256
    assert seq_len_at(0.5, [(0.0, 256), (0.1, 1024)], 1024) == 1024
    with pytest.raises(LmsqueezeError):
        TrainConfig(curriculum=[(0.0, 99999)])
    with pytest.raises(LmsqueezeError):
        TrainConfig(lr=0)


def test_evaluate_perplexity_windows():
    from lmsqueeze.train.evaluate import perplexity, windows

    toks = np.arange(3, 3 + 25)
    w = windows(toks, 8, 0)
    assert [len(x) for x in w] == [8, 8, 8, 5] and all(x[0] == 0 for x in w)
    vocab = 40

    def uniform(ids, keep):
        return [torch.zeros(ids.shape[0], keep, vocab), torch.zeros(ids.shape[0], keep, vocab)]

    res = perplexity(uniform, toks, 8, 0, batch_size=2)
    assert res["tokens"] == 25
    assert res["ppl"][0] == pytest.approx(vocab) and res["agreement"] == [1.0, 1.0]
