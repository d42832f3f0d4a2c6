"""Ticket counters of the kernels whose last program per group finishes the work (an atomic ticket per group,
reset to 0 by that program): one zeroed int32 buffer per (caller, device), reused across calls."""

from __future__ import annotations

import torch


def ticket_buffer(store: dict, device: torch.device, n: int) -> torch.Tensor:
    """[>= n] int32 zeros kept in `store` per device (at least 1024, so later calls rarely reallocate). The kernels
    leave them at 0 again. Allocate outside CUDA-graph capture (a warm-up call does): a reallocation after
    capture would leave the graph on the old buffer. Calls on one device must not run concurrently on two
    streams (they would share tickets)."""
    t = store.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        store[device] = t
    return t
