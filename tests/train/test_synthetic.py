import numpy as np
import pytest
import torch

from lmsqueeze.train.passkey import EVAL_FORMATS, CaseBuilder, passkey_suite
from lmsqueeze.train.synthetic import FILLERS, FORMATS, RetrievalMix, RetrievalSynth
from lmsqueeze.train.tokenizer import fast_encoder


@pytest.fixture(scope="module")
def enc_and_code(small_tokenizer):
    from lmsqueeze.data.heldout import load_heldout_text

    enc = fast_encoder(small_tokenizer)
    return enc, np.asarray(enc.encode(load_heldout_text()[:60_000], add_special_tokens=False).ids)


@pytest.mark.parametrize("length", [256, 777, 2080])
def test_retrieval_sequences_have_exact_length_and_answers(enc_and_code, rng, length):
    enc, code = enc_and_code
    synth = RetrievalSynth(enc, RetrievalMix())
    for fmt in FORMATS:
        for filler in FILLERS:
            seq = synth.sequence(rng, length, code, fmt, filler)
            assert seq.shape == (length,) and seq.min() >= 3  # no special tokens inside
    text = enc.decode(synth.sequence(rng, 1024, code, "prose", "prose_repeat").tolist())
    assert "What is the" in text


def test_passkey_scoring_oracle_and_wrong(enc_and_code):
    enc, code = enc_and_code
    builder = CaseBuilder(enc, 0, code)
    vocab = enc.get_vocab_size()

    def oracle(ids, keep):  # predicts the true next token
        return [torch.nn.functional.one_hot(torch.roll(ids, -1, 1)[:, -keep:], vocab).float()]

    def wrong(ids, keep):
        return [torch.nn.functional.one_hot(torch.roll(ids, -1, 1)[:, -keep:], vocab).float(),
                torch.zeros(ids.shape[0], keep, vocab).index_fill_(2, torch.tensor([5]), 1.0)]

    res = passkey_suite(oracle, builder, lengths=(300, 512), n=3)
    assert set(res) == set(EVAL_FORMATS)
    assert all(v["acc"] == [1.0] for by_len in res.values() for v in by_len.values())
    res = passkey_suite(wrong, builder, lengths=(400,), formats=("code", "prose"), n=2)
    assert all(v["acc"] == [1.0, 0.0] for by_len in res.values() for v in by_len.values())
