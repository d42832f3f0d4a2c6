"""The Dense backend reproduces unpatched transformers: forward, chunked prefill and generate."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.methods.cache import SqueezeCache
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw

TOL = 1e-4
CHUNKS = [(0, 17), (17, 18), (18, 33), (33, 41)]


def inputs(batch: int, length: int = 41, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch == 3:  # left padding of different lengths
        mask[1, :5] = 0
        mask[2, :13] = 0
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_matches(family, batch):
    model = tiny_model(family)
    ids, mask = inputs(batch)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with lmsqueeze.apply(model):
            out = model(ids, attention_mask=mask).logits
            out_nocache = model(ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() <= TOL
    assert (out_nocache - ref)[valid].abs().max() <= TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_chunked_prefill_matches(family, batch):
    model = tiny_model(family)
    ids, mask = inputs(batch)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with lmsqueeze.apply(model) as session:
            cache = session.new_cache()
            parts = [model(ids[:, a:b], attention_mask=mask[:, :b], **cache_kw(model, cache)).logits
                     for a, b in CHUNKS]
    out = torch.cat(parts, dim=1)
    assert isinstance(cache, SqueezeCache) and cache.get_seq_length() == ids.shape[1]
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() <= TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches(family, batch):
    model = tiny_model(family)
    ids, mask = inputs(batch)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    with lmsqueeze.apply(model) as session:
        out = model.generate(ids, **kwargs)
        out_explicit = model.generate(ids, **cache_kw(model, session.new_cache()), **kwargs)
    assert torch.equal(out, ref)
    assert torch.equal(out_explicit, ref)


def test_generate_scores_match(family):
    """Beyond equal tokens: the logits of every generated step agree to fp32 rounding."""
    model = tiny_model(family)
    ids, mask = inputs(3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, **kwargs)
    with lmsqueeze.apply(model):
        out = model.generate(ids, **kwargs)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= TOL
