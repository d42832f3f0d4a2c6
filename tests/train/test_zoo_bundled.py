import json

import numpy as np
import pytest

from lmsqueeze.models.loading import ZOO_DIR

pytestmark = pytest.mark.skipif(not (ZOO_DIR / "default" / "config.json").exists(), reason="zoo not bundled")


def _heldout_ids(tok, n):
    from lmsqueeze.data.heldout import load_heldout_text

    return np.asarray(tok(load_heldout_text()[:20_000], add_special_tokens=False)["input_ids"][:n])


def test_bundled_files_are_small():
    for name in ("default", "looped-4x3"):
        files = list((ZOO_DIR / name).iterdir())
        assert all(f.stat().st_size < 15 * 2**20 for f in files)
        assert sum(f.stat().st_size for f in files if f.suffix == ".safetensors") <= 24e6


def test_default_model_loads_and_predicts_code():
    from transformers import AutoModelForCausalLM

    from lmsqueeze.models.loading import load_model
    from lmsqueeze.train.evaluate import hf_logits_fn, perplexity

    model, tok = load_model()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.num_attention_heads // cfg.num_key_value_heads >= 2
    assert cfg.head_dim == 64 and cfg.max_position_embeddings >= 8192 and tok.bos_token_id == 0
    res = perplexity(hf_logits_fn(model), _heldout_ids(tok, 600), 300, tok.bos_token_id)
    assert res["ppl"][0] < 30  # random weights give ~8192
    hf = AutoModelForCausalLM.from_pretrained(ZOO_DIR / "default")
    assert hf.num_parameters() == model.num_parameters()


def test_looped_model_loads_and_later_passes_are_better():
    from lmsqueeze.models.looped import load_looped
    from lmsqueeze.train.evaluate import looped_logits_fn, perplexity

    model, tok = load_looped(ZOO_DIR / "looped-4x3")
    assert (model.config.num_unique_layers, model.config.num_loops) == (4, 3)
    res = perplexity(looped_logits_fn(model), _heldout_ids(tok, 1000), 256, tok.bos_token_id)
    assert res["ppl"][0] > res["ppl"][-1] and res["ppl"][-1] < 40
    card = json.loads((ZOO_DIR / "looped-4x3" / "zoo_card.json").read_text())
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
