"""The Triton decode kernels (TRITON_INTERPRET=1, table lookups) against the PyTorch reference: v1 (the default,
kernels.py) and the experimental v2 (decode_v2.py), each with the tile options its compiled form uses."""

import pytest
import torch

from lmsqueeze.methods.kvquant.decode_v2 import kvquant_decode_attention_v2, rope_tables_full
from lmsqueeze.methods.kvquant.kernels import kvquant_decode_attention, rope_planes
from lmsqueeze.methods.kvquant.pack import pack_outliers, unpack_outliers
from lmsqueeze.methods.kvquant.reference import decode_attention_reference


def v1_options(bits: int) -> dict:
    return dict(block_n=32, qrows=bits != 2)


def v2_options(bits: int) -> dict:
    return dict(block_n=16, min_block_g=8 if bits == 4 else 16, qrows=bits == 3, nsub=2 if bits == 2 else 1)


KERNELS = {"v1": (kvquant_decode_attention, v1_options), "v2": (kvquant_decode_attention_v2, v2_options)}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128)])  # (Hq, Hkv, D): GQA 1 and 4, head dims 64 and 128
def test_kernel_matches_reference(make_state, kernel, bits, heads):
    Hq, Hkv, D = heads
    lens = [45, 23]  # odd lengths, batch 2 with left padding (starts differ)
    state, _rot, starts, S = make_state(bits, lens, Hkv, D, window=4 if bits == 3 else 0, seed=bits + D,
                                       rope_scale=1.25)
    q = torch.randn(2, Hq, D)
    lengths = torch.full((2,), S, dtype=torch.int32)
    ref = decode_attention_reference(q, state.kv, lengths, D**-0.5, state.rope, starts)
    decode, options = KERNELS[kernel]
    out = decode(q, state.kv, lengths, D**-0.5, state.rope, starts, num_splits=2, **options(bits))
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("kernel,fp16_window,splits,block_n", [("v1", 0, 2, 32), ("v2", 8, 3, 16)])
def test_kernel_lengths_window_and_lse(make_state, kernel, fp16_window, splits, block_n):
    """Per-sequence lengths from a device tensor, a sliding window, an fp16 window (v2), and the log-sum-exp."""
    state, _rot, starts, _S = make_state(3, [60, 60, 33], 2, 64, window=fp16_window, seed=7)
    q = torch.randn(3, 4, 64)
    lengths = torch.tensor([60, 45, 51], dtype=torch.int32)
    ref, ref_lse = decode_attention_reference(q, state.kv, lengths, 0.125, state.rope, starts, window=20,
                                              return_lse=True)
    out, lse = KERNELS[kernel][0](q, state.kv, lengths, 0.125, state.rope, starts, window=20, num_splits=splits,
                                  block_n=block_n, return_lse=True)
    assert rel_err(out, ref) < 5e-3
    assert torch.allclose(lse, ref_lse, atol=1e-2)


@pytest.mark.parametrize("n_out", [1, 2])
def test_kernel_value_outlier_entries(make_state, n_out):
    """One entry (the word's second half empty: channel 0, value 0) or two; every first entry moved to channel 0
    (so with two entries some vectors hold channel 0 twice: the entries add up, as in the reference)."""
    state, _rot, starts, S = make_state(4, [37, 29], 2, 64, n_out=n_out, seed=11)
    kv = state.kv
    idx, val = unpack_outliers(kv.vout, 64)
    idx[..., 0], val[..., 0] = 0, 0.5   # every token's first value outlier on channel 0
    kv.vout.copy_(pack_outliers(idx, val.float(), 64))
    q = torch.randn(2, 4, 64)
    lengths = torch.full((2,), S, dtype=torch.int32)
    ref = decode_attention_reference(q, kv, lengths, 0.125, state.rope, starts)
    for vfold in (True, False):  # value outliers folded into the levels (the GPU default) or via identity rows
        out = kvquant_decode_attention(q, kv, lengths, 0.125, state.rope, starts, num_splits=2, block_n=32,
                                       qrows=False, vfold=vfold)
        assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("qrows, krot", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128)])
def test_kernel_key_token_scales(make_state, qrows, krot, heads):
    """Per-token key scales (one byte per token and head) read by every key path of the v1 kernel."""
    Hq, Hkv, D = heads
    state, _rot, starts, S = make_state(3, [41, 26], Hkv, D, seed=D + 3, token_scale=True)
    assert state.kv.kscale.shape[-1] == state.kv.capacity and int(state.kv.kscale.float().std()) >= 0
    q = torch.randn(2, Hq, D)
    lengths = torch.full((2,), S, dtype=torch.int32)
    ref = decode_attention_reference(q, state.kv, lengths, D**-0.5, state.rope, starts)
    out = kvquant_decode_attention(q, state.kv, lengths, D**-0.5, state.rope, starts, num_splits=2, block_n=32,
                                   qrows=qrows, krot=krot)
    assert rel_err(out, ref) < 5e-3
    # the scales matter: the same cache read as if every scale were 1 gives another answer
    codes = state.kv.kscale.clone()
    state.kv.kscale.fill_(128)
    assert rel_err(decode_attention_reference(q, state.kv, lengths, D**-0.5, state.rope, starts), ref) > 1e-2
    state.kv.kscale.copy_(codes)


def test_rope_planes_layout():
    inv = 1.0 / 10000 ** (torch.arange(0, 128, 2).float() / 128)
    tab = rope_planes(inv, 3, 128, 32).view(torch.float32)   # [2 * 16 planes, 32 offsets, 12 words]
    s, n, w = 5, 7, 2
    assert torch.isclose(tab[s, n, w], torch.cos(n * inv[16 * w + s]))
    assert torch.isclose(tab[16 + s, n, w], torch.sin(n * inv[16 * w + s]))


def test_kernel_register_rotation_variant(make_state):
    """The non-default KROT variant (keys dequantized and rotated in registers) stays correct."""
    state, _rot, starts, S = make_state(3, [37, 20], 2, 128, seed=11, rope_scale=1.1)
    q = torch.randn(2, 8, 128)
    lengths = torch.full((2,), S, dtype=torch.int32)
    ref = decode_attention_reference(q, state.kv, lengths, 128**-0.5, state.rope, starts)
    out = kvquant_decode_attention(q, state.kv, lengths, 128**-0.5, state.rope, starts, num_splits=2, block_n=32,
                                   krot=True, vfold=False)
    assert rel_err(out, ref) < 5e-3


def test_rope_tables_full():
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    cr, sr = rope_tables_full(inv, 64, 16)
    assert cr.shape == (16, 64) and cr.dtype == torch.float16
    n, c = 7, 40  # channel 40 of 64 has frequency index 8
    assert abs(float(cr[n, c]) - float((n * inv[8].double()).cos())) < 1e-3
    assert abs(float(sr[n, c]) - float((n * inv[8].double()).sin())) < 1e-3
