"""An 8-bit uniform KVQuant cache tracks the dense cache's logits over a long, chunked, left-padded prefill
and decode steps (pre-RoPE keys re-rotated at the right positions, offsets from padding included)."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.methods.kvquant import KVQuant
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw


def run(model, method, ids, mask, chunk, steps):
    with torch.no_grad(), lmsqueeze.apply(model, method) as s:
        cache = s.new_cache()
        T = ids.shape[1] - steps
        outs = []
        for st in range(0, T, chunk):
            outs.append(model(ids[:, st:min(st + chunk, T)], attention_mask=mask[:, :min(st + chunk, T)],
                              **cache_kw(model, cache)).logits)
        for t in range(T, T + steps):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kw(model, cache)).logits)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("family, pad", [("llama", 37), ("qwen3", 5)])
def test_int8_tracks_dense_over_long_chunked_context(family, pad):
    model = tiny_model(family, seed=7, head_dim=64)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 256, (2, 333), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    art = KVQuant(bits=8, datatype="int", outliers=0.0, sink_tokens=1).calibrate(
        model, [{"input_ids": ids, "attention_mask": mask}])
    ref = run(model, None, ids, mask, 64, 5)
    out = run(model, art, ids, mask, 64, 5)
    valid = mask.bool()
    err = (out - ref)[valid].abs().max() / ref[valid].abs().max()
    assert err < 1e-2
    # and the cache is really quantized: 3-bit uniform is visibly further off
    art3 = KVQuant(bits=3, datatype="int", outliers=0.0, sink_tokens=0).calibrate(
        model, [{"input_ids": ids, "attention_mask": mask}])
    out3 = run(model, art3, ids, mask, 64, 5)
    assert (out3 - ref)[valid].abs().max() / ref[valid].abs().max() > 3 * err
