import json

import pytest

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.train.tokenizer import TokenizerConfig, fast_encoder, load_tokenizer


def test_round_trip_and_special_tokens(small_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    assert len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = 'def f(x):\n    return {"a": 1}  # ünïcode 12345\n\tThe pass key is 68142.'
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # digits are single tokens, so a number tokenizes the same wherever it appears
    digits = [t for t in tok.convert_ids_to_tokens(ids) if t.strip("Ġ").isdigit()]
    assert digits and all(len(t) == 1 for t in digits)
    assert fast_encoder(small_tokenizer).encode(text, add_special_tokens=False).ids == ids[1:]
    cfg = json.loads((small_tokenizer / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_bad_inputs(tmp_path):
    with pytest.raises(LmsqueezeError):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(LmsqueezeError):
        load_tokenizer(tmp_path)
