"""Launch options for programmatic dependent launch (PDL) of the Triton kernels that take a `PDL` constexpr
and start with `_triton_decode._pdl_prologue`."""

from __future__ import annotations

import os

import torch


def pdl_options(enabled: bool, device: torch.device) -> dict:
    """Extra launch keywords: PDL on CUDA devices of compute capability >= 9.0 when `enabled`, else none (the
    Triton interpreter and older GPUs run the same kernels without it)."""
    if not enabled or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {}
    if torch.cuda.get_device_capability(device)[0] < 9:
        return {}
    return {"PDL": True, "launch_pdl": True}
