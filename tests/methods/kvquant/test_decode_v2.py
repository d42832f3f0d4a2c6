"""The v2 Triton decode kernel (TRITON_INTERPRET=1, table lookups) against the PyTorch reference."""

import os

import pytest
import torch

from lmsqueeze.methods.kvquant.decode_v2 import kvquant_decode_attention_v2, rope_tables_full
from lmsqueeze.methods.kvquant.reference import decode_attention_reference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by the test conftest) or a GPU")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128)])  # (Hq, Hkv, D): GQA 1 and 4, head dims 64 and 128
def test_v2_matches_reference(make_state, bits, heads):
    Hq, Hkv, D = heads
    lens = [45, 23]  # odd lengths, batch 2 with left padding (starts differ)
    state, _rot, starts, S = make_state(bits, lens, Hkv, D, window=4 if bits == 3 else 0, seed=bits + D,
                                       rope_scale=1.25)
    q = torch.randn(2, Hq, D)
    lengths = torch.full((2,), S, dtype=torch.int32)
    ref = decode_attention_reference(q, state.kv, lengths, D**-0.5, state.rope, starts)
    out = kvquant_decode_attention_v2(q, state.kv, lengths, D**-0.5, state.rope, starts, num_splits=2, block_n=16,
                                      vout_eye=bits == 4)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-3
