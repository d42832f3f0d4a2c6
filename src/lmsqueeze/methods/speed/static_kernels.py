"""The small fused pieces of the static looped decode step: RoPE + KV write, and the on-device pipeline /
greedy bookkeeping. Each has a plain-PyTorch reference (no host sync, so it also captures in a CUDA graph)
and a Triton kernel (`_static_triton.py`); `triton=None` dispatches Triton on CUDA, the reference elsewhere.

Pipeline slots: with R passes, slot r holds the token that runs pass r in this step (in-flight tokens are
always at distinct passes). tok, pos: [R] int64; valid: [R] int32 (0/1); wpos: [R] int64 = the cache slot
written this step (pos, or the spare `dummy` slot for an empty row); lens: [R] int32 = keys attended (pos + 1,
or 1 for an empty row).
"""

from __future__ import annotations

import torch


def _use_triton(t: torch.Tensor, triton: bool | None) -> bool:
    return t.is_cuda if triton is None else triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_write_reference(qkv: torch.Tensor, cos_tab: torch.Tensor, sin_tab: torch.Tensor, rpos: torch.Tensor,
                         wpos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, hq: int,
                         hkv: int) -> torch.Tensor:
    """qkv: [m, (hq + 2 hkv) D] (q, k, v heads, pre-RoPE); cos_tab, sin_tab: [P, D]; rpos, wpos: [m] int64;
    k_cache, v_cache: [m, hkv, S, D]. Writes RoPE(k) and v of row b at slot wpos[b] of cache row b; returns
    RoPE(q): [m, hq, D]."""
    m = qkv.shape[0]
    d = cos_tab.shape[1]
    x = qkv.view(m, hq + 2 * hkv, d)
    cos, sin = cos_tab[rpos][:, None], sin_tab[rpos][:, None]  # [m, 1, D]
    qk = _rotate(x[:, :hq + hkv], cos, sin)
    rows = torch.arange(m, device=qkv.device)
    k_cache[rows, :, wpos] = qk[:, hq:]
    v_cache[rows, :, wpos] = x[:, hq + hkv:]
    return qk[:, :hq]


def rope_write(qkv, cos_tab, sin_tab, rpos, wpos, k_cache, v_cache, hq: int, hkv: int,
               triton: bool | None = None) -> torch.Tensor:
    """Same contract as `rope_write_reference`."""
    if not _use_triton(qkv, triton):
        return rope_write_reference(qkv, cos_tab, sin_tab, rpos, wpos, k_cache, v_cache, hq, hkv)
    from lmsqueeze.methods.speed._static_triton import rope_write_kernel

    m, width = qkv.shape
    d = cos_tab.shape[1]
    assert width == (hq + 2 * hkv) * d and qkv.stride(1) == 1 and cos_tab.is_contiguous() and sin_tab.is_contiguous()
    assert k_cache.shape[0] == m and k_cache.shape[1] == hkv and k_cache.shape[3] == d and k_cache.stride(3) == 1
    assert v_cache.shape == k_cache.shape and v_cache.stride(3) == 1 and cos_tab.dtype == qkv.dtype
    q_out = torch.empty(m, hq, d, dtype=qkv.dtype, device=qkv.device)
    half = d // 2
    rope_write_kernel[(m, hq + hkv)](
        qkv, cos_tab, sin_tab, rpos, wpos, k_cache, v_cache, q_out,
        qkv.stride(0), cos_tab.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ=hq, HKV=hkv, HALF=half, BLOCK=1 << (half - 1).bit_length())
    return q_out


def pipeline_update_reference(pred, tok, pos, valid, wpos, lens, h_out, h_in, emb, out, stats, last_pos,
                              dummy: int) -> None:
    """In place, after one batched pass of the shared block over the R slots.

    pred: [R] int64 = the exit head's argmax for each slot (its prediction of the following token);
    h_out: [R, d] the residual streams after the pass; emb: [V, d]; out: [N] int64 token ids by position;
    stats: [3] int64 (+= committed, flushes, flushed tokens); last_pos: [1] int64 (no token starts past it).
    1. A valid slot's successor is the next valid slot below it (the token one position later). If its
       prediction differs from the successor's token, the successor and every shallower slot are flushed
       (the deepest such slot decides). Their KV writes need no undo: slots past the committed prefix are
       overwritten before any surviving token reads them, and `lens` masks the rest.
    2. The final-pass slot R - 1, if valid, commits its prediction at position pos + 1.
    3. Kept slots move one pass deeper (slot r -> r + 1, h_in[r + 1] = h_out[r]); the shallowest kept slot's
       prediction starts at pass 0 (slot 0, h_in[0] = emb[token]) unless it would lie past last_pos.
    """
    r_ = pred.shape[0]
    r = torch.arange(r_, device=pred.device)
    vb = valid.bool()
    below = vb[None, :] & (r[None, :] < r[:, None])  # [R, R]: valid j < r
    succ = torch.where(below, r[None, :], torch.full_like(below, -1, dtype=torch.long)).amax(1)
    mism = vb & (succ >= 0) & (pred != tok[succ.clamp(min=0)])
    f = torch.where(mism, r, torch.full_like(r, -1)).amax()
    keep = vb & (r >= f)
    s = torch.where(keep, r, torch.full_like(r, r_)).amin()
    sc = s.clamp(max=r_ - 1).reshape(1)  # 1-element index tensors: no host sync (graph-capturable)
    new_tok = torch.where(s < r_, pred.index_select(0, sc), 0)  # no slot left: token 0, invalid
    new_pos = torch.where(s < r_, pos.index_select(0, sc), 0) + 1
    new_valid = (s < r_) & (new_pos <= last_pos[0])
    fin = vb[r_ - 1]
    idx = (pos[r_ - 1] + 1).reshape(1)
    out.index_put_((idx,), torch.where(fin, pred[r_ - 1], out[idx][0]).reshape(1))
    stats += torch.stack([fin.long(), (f >= 0).long(), (vb & (r < f)).long().sum()])
    tok_n = torch.cat([new_tok, tok[:-1]])
    pos_n = torch.cat([new_pos, pos[:-1]])
    val_n = torch.cat([new_valid, keep[:-1]])
    h_in[1:] = h_out[:-1]
    h_in[:1] = emb.index_select(0, new_tok)
    tok.copy_(tok_n)
    pos.copy_(pos_n)
    valid.copy_(val_n.to(valid.dtype))
    wpos.copy_(torch.where(val_n, pos_n, torch.full_like(pos_n, dummy)))
    lens.copy_(torch.where(val_n, pos_n + 1, torch.ones_like(pos_n)).to(lens.dtype))


def pipeline_update(pred, tok, pos, valid, wpos, lens, h_out, h_in, emb, out, stats, last_pos, dummy: int,
                    triton: bool | None = None) -> None:
    """Same contract as `pipeline_update_reference` (one Triton program on CUDA)."""
    if not _use_triton(pred, triton):
        return pipeline_update_reference(pred, tok, pos, valid, wpos, lens, h_out, h_in, emb, out, stats,
                                         last_pos, dummy)
    from lmsqueeze.methods.speed._static_triton import pipeline_update_kernel

    r_, d = h_out.shape
    assert h_out.stride(1) == 1 and h_in.stride(1) == 1 and emb.stride(1) == 1
    for t in (tok, pos, valid, wpos, lens, out, stats):
        assert t.is_contiguous()
    pipeline_update_kernel[(1,)](pred, tok, pos, valid, wpos, lens, h_out, h_in, emb, out, stats, last_pos,
                                 d, dummy, h_out.stride(0), h_in.stride(0), emb.stride(0),
                                 R=r_, BR=max(2, 1 << (r_ - 1).bit_length()),
                                 BD=max(32, min(1 << (d - 1).bit_length(), 8192 // max(2, 1 << (r_ - 1).bit_length()))),
                                 num_warps=4)
    return None


def greedy_update_reference(pred, pos, wpos, lens, h_in, emb, out, stats) -> None:
    """In place, after the final pass of plain greedy decoding: pred: [1] int64 (argmax), pos: [1] int64 (the
    position just run). Commits pred at pos + 1, advances pos / wpos / lens, h_in: [1, d] = emb[pred]."""
    p = pos + 1
    out.index_put_((p,), pred)
    pos.copy_(p)
    wpos.copy_(p)
    lens.copy_((p + 1).to(lens.dtype))
    stats[:1] += 1
    h_in.copy_(emb[pred])


def greedy_update(pred, pos, wpos, lens, h_in, emb, out, stats, triton: bool | None = None) -> None:
    """Same contract as `greedy_update_reference` (one Triton program on CUDA)."""
    if not _use_triton(pred, triton):
        return greedy_update_reference(pred, pos, wpos, lens, h_in, emb, out, stats)
    from lmsqueeze.methods.speed._static_triton import greedy_update_kernel

    d = h_in.shape[1]
    assert h_in.is_contiguous() and emb.stride(1) == 1
    greedy_update_kernel[(1,)](pred, pos, wpos, lens, h_in, emb, out, stats, d, emb.stride(0),
                               BD=min(1024, 1 << (d - 1).bit_length()), num_warps=4)
    return None
