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
                                      min_block_g=8 if bits == 4 else 16, qrows=bits == 3,
                                      nsub=2 if bits == 2 else 1)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-3


def test_v2_lengths_window_and_lse(make_state):
    """Per-sequence lengths from a device tensor, a sliding window, the fp16 window, and the log-sum-exp."""
    state, _rot, starts, _S = make_state(3, [60, 60, 33], 2, 64, window=8, seed=7)
    q = torch.randn(3, 4, 64)
    lengths = torch.tensor([60, 45, 51], dtype=torch.int32)
    ref, ref_lse = decode_attention_reference(q, state.kv, lengths, 0.125, state.rope, starts, window=20,
                                              return_lse=True)
    out, lse = kvquant_decode_attention_v2(q, state.kv, lengths, 0.125, state.rope, starts, window=20,
                                           num_splits=3, block_n=16, return_lse=True)
    assert rel_err(out, ref) < 5e-3
    assert torch.allclose(lse, ref_lse, atol=1e-2)


def test_rope_tables_full():
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    cr, sr = rope_tables_full(inv, 64, 16)
    assert cr.shape == (16, 64) and cr.dtype == torch.float16
    n, c = 7, 40  # channel 40 of 64 has frequency index 8
    assert abs(float(cr[n, c]) - float((n * inv[8].double()).cos())) < 1e-3
    assert abs(float(sr[n, c]) - float((n * inv[8].double()).sin())) < 1e-3
