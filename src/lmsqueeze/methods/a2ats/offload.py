"""Heterogeneous execution: the full K/V in (pinned) host memory, sinks + window + codes on the GPU.

Two ways to attend over the selected tokens of a host-resident store, both merged on the GPU with the
near tokens (sinks and window) by log-sum-exp:

- "gpu" (default): the sparse decode kernel reads the selected K/V rows straight from pinned host memory
  (zero-copy over PCIe, masked loads: unselected rows are never transferred). Nothing synchronises with
  the host, so the decode step stays capturable in one CUDA graph, and the transfer overlaps the kernel's
  own work (no separate copy stage, no side stream).
- "cpu": the paper's design. The selected-code table goes to the host, CPU threads gather the selected
  rows and compute exact attention (`selected_attention_cpu`), the partial (out, lse) comes back.
  Eager only (host synchronisation per layer).

Why "gpu" is the default: it is the simpler one (no host round trip per layer) and graph-capturable; the
measured comparison is in benchmarks/results/a2ats_serving_h100.json (see benchmarks/scripts/bench_a2ats.py).
"""

from __future__ import annotations

import torch

from lmsqueeze.methods.a2ats.reference import masked_decode_attention, selected_slots

OFFLOAD_ATTENTION = ("gpu", "cpu")
RING_SLACK = 8  # extra ring entries: steps run ahead (graph warm-up) never overwrite a live window token


def ring_size(window: int) -> int:
    return window + RING_SLACK


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor, pinned (page-locked) when CUDA is available."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A (pinned when possible) host copy of t."""
    out = host_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def selected_attention_cpu(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, codes: torch.Tensor,
                           sel: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, sinks: int, window: int,
                           scaling: float, near: bool = False, bands: tuple[int, ...] = (),
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the selected slots on CPU threads, gathering only those rows.

    q: [B, Hq, D] (RoPE applied, any device); k_store, v_store: [B, Hkv, S, D] host tensors; codes:
    [B, Hkv, S] (host mirror); sel: [B, Hkv, NB * C] (virtual codes of `bands`); starts, lengths: [B]. Same result as
    `reference.sparse_decode_attention_reference`; returns out: [B, Hq, D] and lse: [B, Hq] on q's device.
    """
    dev = q.device
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_store.shape
    G = Hq // Hkv
    mask = selected_slots(codes, sel.cpu(), starts.cpu(), lengths.cpu(), sinks, window, near, bands)
    cnt = mask.sum(-1).reshape(-1)  # [B*Hkv]
    m = int(cnt.max()) if cnt.numel() else 0
    if m == 0:
        return torch.zeros_like(q), torch.full((B, Hq), float("-inf"), device=dev)
    nz = mask.reshape(B * Hkv, S).nonzero()  # [N, 2] rows sorted
    row, col = nz[:, 0], nz[:, 1]
    first = torch.zeros(B * Hkv, dtype=torch.long)
    first[1:] = cnt.cumsum(0)[:-1]
    pos = torch.arange(row.numel()) - first[row]
    idx = torch.zeros(B * Hkv, m, dtype=torch.long)
    idx[row, pos] = row * S + col
    flat_k = k_store.reshape(B * Hkv * S, D)
    flat_v = v_store.reshape(B * Hkv * S, D)
    kg = flat_k.index_select(0, idx.reshape(-1)).float().reshape(B * Hkv, m, D)
    vg = flat_v.index_select(0, idx.reshape(-1)).float().reshape(B * Hkv, m, D)
    live = torch.arange(m)[None, :] < cnt[:, None]  # [B*Hkv, m]
    qf = q.detach().to("cpu", torch.float32).reshape(B * Hkv, G, D)
    s = torch.bmm(qf, kg.transpose(1, 2)) * scaling  # [B*Hkv, G, m]
    s = s.masked_fill(~live[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.bmm(torch.exp(s - safe[..., None]), vg)
    out = out.reshape(B, Hq, D).to(dev, q.dtype, non_blocking=True)
    return out, lse.reshape(B, Hq).to(dev, non_blocking=True)


def near_entries(slot: torch.Tensor, starts: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Near-buffer entry of `slot` per sequence: sink e = slot − start (< sinks), else sinks + slot % ring.

    slot: [1] or [B] int; starts: [B] -> [B] int64.
    """
    s = slot.long().expand(starts.shape[0])
    rel = s - starts.long()
    return torch.where(rel < sinks, rel.clamp_min(0), sinks + s % ring_size(window))


def near_attention(q: torch.Tensor, near_k: torch.Tensor, near_v: torch.Tensor, near_slots: torch.Tensor,
                   starts: torch.Tensor, lengths: torch.Tensor, sinks: int, window: int,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the GPU-resident sinks and window.

    near_k, near_v: [B, Hkv, sinks + ring_size(window), D] (entries < sinks: the sink tokens; then a ring
    holding the recent slots); near_slots: [B, sinks + ring] the slot each entry holds (-1: empty). Entry validity
    follows the slot conventions of `reference.py`, so a sink that is also recent is counted once.
    Returns out: [B, Hq, D], lse: [B, Hq] float32.
    """
    E = near_slots.shape[1]
    s = near_slots.long()
    st = starts.long()[:, None]
    ln = lengths.long()[:, None]
    is_sink = torch.arange(E, device=s.device)[None, :] < sinks
    sink_ok = (s >= st) & (s < torch.minimum(ln, st + sinks))
    ring_ok = (s >= torch.maximum(st + sinks, ln - window)) & (s < ln)
    valid = torch.where(is_sink, sink_ok, ring_ok)  # [B, E]
    mask = valid[:, None, :].expand(-1, near_k.shape[1], -1)
    return masked_decode_attention(q, near_k, near_v, mask, scaling)
