"""Programmatic dependent launch options: requested only for CUDA devices of compute capability >= 9.0."""

from __future__ import annotations

import torch

from lmsqueeze.kernels.pdl import pdl_options


def test_pdl_is_never_requested_off_the_gpu():
    assert pdl_options(True, torch.device("cpu")) == {}
    assert pdl_options(False, torch.device("cpu")) == {}


def test_pdl_is_off_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl_options(True, torch.device("cuda", 0)) == {}
