"""lmsqueeze.generate: same tokens as transformers' greedy generate; one prepared step per shape."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.generation import CAPTURES, clear_runners, generate, left_padding_starts
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.sampling import Sampling, select_tokens


def prompts(batch: int, length: int = 37, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch == 3:
        mask[0, :4] = 0
        mask[2, :11] = 0
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_transformers(family, batch):
    model = tiny_model(family, seed=7)
    ids, mask = prompts(batch)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    out = generate(model, ids, mask, max_new_tokens=40, pad_token_id=0, prefill_chunk=13)
    assert torch.equal(out.sequences, ref)
    assert out.steps == 40 and out.new_tokens.shape == (batch, 40) and not out.graph


def test_stop_tokens_pad_and_trim():
    model = tiny_model("llama", seed=7)
    ids, mask = prompts(3)
    free = generate(model, ids, mask, max_new_tokens=20, stop_tokens=[], pad_token_id=0)
    stop = int(free.new_tokens[1, 5])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=stop,
                         pad_token_id=0)
    out = generate(model, ids, mask, max_new_tokens=20, stop_tokens=[stop], pad_token_id=0)
    assert torch.equal(out.sequences, ref)


def test_prepared_once_per_batch_and_length():
    model = tiny_model("llama", seed=7)
    clear_runners(model)
    ids, mask = prompts(3)
    before = CAPTURES["count"]
    generate(model, ids, mask, max_new_tokens=8)
    generate(model, ids[:, 5:], mask[:, 5:], max_new_tokens=8)  # same batch, same length bucket: reused
    assert CAPTURES["count"] == before + 1
    generate(model, ids[:1], None, max_new_tokens=8)  # another batch size: a new capture
    assert CAPTURES["count"] == before + 2
    generate(model, ids, mask, max_new_tokens=8)  # still cached
    assert CAPTURES["count"] == before + 2


def test_inside_apply_and_streaming():
    model = tiny_model("qwen3", seed=7)
    ids, mask = prompts(1)
    seen = []
    with lmsqueeze.apply(model):
        out = generate(model, ids, mask, max_new_tokens=6, on_token=lambda t: seen.append(int(t[0])),
                       stop_tokens=[])
    assert seen == out.new_tokens[0].tolist()


def test_sampling_is_seeded_and_top_p_restricts():
    model = tiny_model("llama", seed=7)
    ids, _ = prompts(1)
    a = generate(model, ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, stop_tokens=[])
    b = generate(model, ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, stop_tokens=[])
    assert torch.equal(a.sequences, b.sequences)
    logits = torch.tensor([[10.0, 9.0, -5.0, -5.0]]).repeat(500, 1)
    picks = select_tokens(logits, Sampling(temperature=1.0, top_p=0.5))
    assert set(picks.tolist()) == {0}
    picks = select_tokens(logits, Sampling(temperature=1.0, top_p=1.0))
    assert set(picks.tolist()) >= {0, 1}


def test_bad_inputs():
    model = tiny_model("llama")
    ids, mask = prompts(3)
    with pytest.raises(LmsqueezeError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(LmsqueezeError, match="shape"):
        generate(model, ids, mask[:, 1:])
    with pytest.raises(LmsqueezeError, match="non-empty"):
        generate(model, ids[0])
    with pytest.raises(LmsqueezeError, match="temperature"):
        generate(model, ids, mask, temperature=-1)
    with pytest.raises(LmsqueezeError, match="top_p"):
        generate(model, ids, mask, top_p=0)
    with pytest.raises(LmsqueezeError, match="GPU"):
        generate(model, ids, mask, use_graph=True)
    holes = mask.clone()
    holes[0, 20] = 0
    with pytest.raises(LmsqueezeError, match="left padding"):
        left_padding_starts(holes)


def test_zoo_model_greedy_equals_transformers():
    """The bundled default model: the fast path's greedy tokens equal transformers' (batch 1 and 3, padded)."""
    from lmsqueeze.models.loading import default_model_path

    if not default_model_path().exists():
        pytest.skip("the bundled zoo model is not in this checkout")
    model, tok = lmsqueeze.load_model()
    texts = ["def parse_args(argv):\n    parser = ", "import os\n\nclass Cache:\n    def __init__(self", "x = 1\n"]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for batch in (texts[:1], texts):
        enc = tok(batch, return_tensors="pt", padding=True)
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        out = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                       pad_token_id=tok.pad_token_id)
        assert torch.equal(out.sequences, ref)
