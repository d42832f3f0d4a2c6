"""The Triton merge of two partial attentions against `merge_attention_states` (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from lmsqueeze.kernels.merge import merge_attention_outputs_triton, merge_attention_states

pytest.importorskip("triton")


@pytest.mark.parametrize("D", [64, 128])
def test_merge_outputs_match_torch(D):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    shape = (2, 3, 37)                                           # odd row count: a partial last block
    oa, ob = torch.randn(*shape, D, generator=gen), torch.randn(*shape, D, generator=gen)
    la, lb = torch.randn(*shape, generator=gen) * 4, torch.randn(*shape, generator=gen) * 4
    la[0, 0, :5] = float("-inf")                                 # A empty: B alone
    lb[1, 2, 3:9] = float("-inf")                                # B empty: A alone
    la[1, 1, 7], lb[1, 1, 7] = float("-inf"), float("-inf")      # both empty: 0
    oa[0, 0, :5] = float("nan")                                  # an empty set's output is never read
    got = merge_attention_outputs_triton(oa, la, ob, lb, block_r=16)
    want, _ = merge_attention_states(oa, la, ob, lb)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1, 1, 7], torch.zeros(D))
