"""Fused decode attention over the packed KVQuant cache, v2 (Triton), beside `reference.py` (PyTorch).

Not used by the cache: on the H100 it was 1.5-2.5x *slower* than v1 (`kernels.py`, the default) in the same
run, benchmarks/results/kvquant_decode_h100_v2_first.json (every config swept there). Its main loop has
about as many SASS instructions per token and KV head as v1's after v1's 3-bit fix (68-79 vs 65-69, compiled
offline with Triton 3.6 for sm_90), but it needs 255 registers with 48-116 spilled and runs one CTA of 8
warps (or two of 4) per SM, which hides latency worse. Kept as a tested reference for the design notes
below (a rewrite in a language with explicit layouts would start from them).

Same contract as `kernels.kvquant_decode_attention` (v1) and the reference. One program per (sequence
split, batch x KV head) serves all G query heads of the KV head; a merge kernel (v1's) combines the splits
by their log-sum-exp. What changed from v1, to cut instructions per packed byte:

- codes are unpacked for the whole head at once, in natural channel order (no half-head splits, no
  concatenations): byte permutes give x = level + 1152 exactly in fp16, and one fp16 FMA per element gives
  l' = x / 128 + zero / scale, so a key is `S * l'` (S = 128 * fp16 scale, per channel). Folding the zero
  into l' costs only fp16 rounding of the dequantized key (as an fp16 cache has);
- RoPE: with q~ = R(p0)^T q (p0 = the tile's first position, stepped by BLOCK_N each tile) and tables
  CR[n, c] = cos(n theta_f(c)), SR[n, c] = sin(n theta_f(c)) over all D channels,
  q . R(p0 + n) k = (l' * CR) . (S * own~) + (l' * SR) . (sigma * S * partner~), where own~ / partner~ are
  q~ at the channel and at its RoPE partner (c +- D/2) and sigma = +1 on the first half, -1 on the second:
  two tensor-core dots of K = D, nothing concatenated;
- sparse outliers are folded into the levels (keys: residual / S at their channel, before RoPE; values:
  residual / per-token scale), or for values optionally through one-hot rows on tensor cores (VOUT_EYE);
- values: (level / 128) on tensor cores against p * scale, plus p . zero (as v1).
The side tokens (sinks, fp16 window) are attended by split 0. Lengths / starts are read from device tensors
and the grid depends only on shapes: CUDA-graph safe.
"""

from __future__ import annotations

import functools
import math

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.kvquant.layout import PackedKV
from lmsqueeze.methods.kvquant.pack import outlier_index_bits
from lmsqueeze.methods.kvquant.rope import KernelRope

MAX_SPLITS = 512
PROGRAMS_PER_SM = 4
BLOCK_N = 128
NUM_WARPS = 8
NUM_STAGES = 1
TAB_REGS = False   # RoPE tables held in registers (True) or re-read from L1 every tile (False)
QROWS = False      # scores as [query rows, keys] (mma.sync, keys from shared memory) instead of [keys, query rows]
OPAQUE = 2         # hide MMA operands' producers from Triton's operand-width heuristic (v1's trick): 1 = the
                   # softmax weights only, 2 = also the unpacked keys and values
NSUB = 2           # tiles of BLOCK_N tokens per online-softmax step (one max reduction and rescale per step)
MIN_BLOCK_G = 16   # rows of the query-side MMA operand (query heads spread over them, zero rows between)
LAST_SPLIT_KERNEL: dict = {}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits_for(batch: int, kv_heads: int, capacity: int, block_n: int, sms: int = 132,
                   programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Sequence splits per (batch, KV head) from shapes only (graph-safe): about programs_per_sm per SM."""
    want = -(-programs_per_sm * sms // (batch * kv_heads))
    return max(1, min(want, -(-capacity // block_n), MAX_SPLITS))


def rope_tables_full(inv_freq: torch.Tensor, head_dim: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of n * inv_freq[c % (D/2)] for n < block_n over all D channels: 2 x [block_n, D] fp16."""
    n = torch.arange(block_n, dtype=torch.float64)[:, None]
    f = inv_freq.detach().double().cpu()
    ang = n * torch.cat([f, f])[None, :head_dim]
    return ang.cos().to(torch.float16), ang.sin().to(torch.float16)


def _consts(kv: PackedKV, rope: KernelRope, block_n: int, device) -> dict:
    """Per-layer constants (built once, outside any graph, kept on the PackedKV)."""
    c = getattr(kv, "_v2_consts", None)
    if c is None:
        c = {}
        kv._v2_consts = c
    key = ("base",)
    if key not in c:
        kq = kv.kq
        s16 = kq.s16.float()
        S = (128.0 * s16).to(device)                                          # [Hkv, D]
        Ck = (kq.z16.float() / (128.0 * s16)).to(device, torch.float16)     # l' = x / 128 + Ck

        def xlut(cb):
            t = torch.full((16,), 1152.0, dtype=torch.float32)
            t[: cb.levels.numel()] = cb.levels.float().cpu() + 1152.0
            return t.to(device)

        c[key] = {"S": S.contiguous(), "Ck": Ck.contiguous(), "kx": xlut(kq.codebook), "vx": xlut(kv.vq.codebook),
                  "ktab": kq.codebook.table_words(), "vtab": kv.vq.codebook.table_words()}
    tkey = ("rope", block_n)
    if tkey not in c:
        cr, sr = rope_tables_full(rope.inv_freq, kv.head_dim, block_n)
        c[tkey] = (cr.to(device).contiguous(), sr.to(device).contiguous())
    if "eye" not in c:
        c["eye"] = torch.eye(kv.head_dim, dtype=torch.float16, device=device)
    return {**c[key], "CR": c[tkey][0], "SR": c[tkey][1], "eye": c["eye"]}


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kvquant_decode_attention_v2(q: torch.Tensor, kv: PackedKV, lengths: torch.Tensor, scaling: float,
                                rope: KernelRope, starts: torch.Tensor | None = None, window: int | None = None,
                                *, num_splits: int | None = None, block_n: int | None = None,
                                num_warps: int | None = None, num_stages: int | None = None,
                                maxnreg: int | None = None, programs_per_sm: int | None = None,
                                tab_regs: bool | None = None, min_block_g: int | None = None, qrows: bool | None = None,
                                opaque: int | None = None, nsub: int | None = None,
                                use_asm: bool | None = None, return_lse: bool = False):
    """Attention of one query per sequence over a packed KVQuant cache (same contract as the reference).

    q: [B, Hq, D] (RoPE applied); lengths: [B] int32 filled slots (device); starts: [B] int32 first
    non-padding slot or None; window: the model's sliding window or None. Returns out [B, Hq, D] in q's
    dtype (and lse [B, Hq] float32, natural log).
    """
    from lmsqueeze.methods.kvquant import _triton_kernels as tk
    from lmsqueeze.methods.kvquant import _triton_v2 as t2

    B, Hq, D = q.shape
    Hkv, cap = kv.kcodes.shape[1], kv.capacity
    bits = kv.bits
    if bits not in (2, 3, 4):
        raise LmsqueezeError(f"the kvquant decode kernel handles 2/3/4-bit caches, not {bits}-bit; use the reference")
    if D < 32 or D & (D - 1) or Hq % Hkv != 0:
        raise LmsqueezeError(f"kvquant decode v2 needs a power-of-two head_dim >= 32 and Hq % Hkv == 0; got D={D}, "
                             f"Hq={Hq}, Hkv={Hkv}")
    if lengths.dtype != torch.int32 or lengths.shape != (B,):
        raise LmsqueezeError("lengths must be an int32 [B] tensor")
    if kv.kscale.shape[-1]:
        raise LmsqueezeError("the experimental v2 kernel has no per-token key scales; use kernels.py (v1)")
    G = Hq // Hkv
    block_n = block_n or BLOCK_N
    num_warps = num_warps or NUM_WARPS
    num_stages = num_stages or NUM_STAGES
    qrows = QROWS if qrows is None else qrows
    nsub = 1 if qrows else (nsub or NSUB)
    if cap % (block_n * nsub) != 0:
        raise LmsqueezeError(f"cache capacity {cap} is not a multiple of block_n * nsub = {block_n * nsub}")
    if use_asm is None:
        use_asm = q.is_cuda and not _interpreting()
    if num_splits is None:
        sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.is_cuda else 132
        num_splits = num_splits_for(B, Hkv, cap, block_n * nsub, sms, programs_per_sm or PROGRAMS_PER_SM)
    c = _consts(kv, rope, block_n * nsub, q.device)
    gp = _pow2(G)
    bg = max(min_block_g or MIN_BLOCK_G, gp)
    q = q.contiguous()
    o_part = torch.empty(B * Hq * num_splits, D, dtype=torch.float32, device=q.device)
    l_part = torch.empty(B * Hq * num_splits, dtype=torch.float32, device=q.device)
    n_side = kv.side_slot.shape[1]
    kt, vt = c["ktab"], c["vtab"]
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    compiled = t2._v2_split_kernel[(num_splits, B * Hkv)](
        q, o_part, l_part,
        kv.kcodes, kv.vcodes, kv.kout, kv.vout, kv.vscale, kv.vzero, kv.positions, kv.kind,
        kv.side_k, kv.side_v, kv.side_slot,
        c["S"], c["Ck"], c["CR"], c["SR"], c["eye"], c["kx"], c["vx"], rope.inv_freq, lengths,
        starts if starts is not None else lengths, kv.vsmax,
        scaling * 1.4426950408889634, rope.scale, cap, Hkv, kv.n_sink, kv.window, window or 0, num_splits,
        kt[0], kt[1], kt[2], kt[3], vt[0], vt[1], vt[2], vt[3],
        D=D, BITS=bits, W=kv.kcodes.shape[-1], G=G, GP=gp, BLOCK_G=bg, LOG_STRIDE=int(math.log2(bg // gp)),
        BLOCK_N=block_n,
        NOUT=kv.n_out_words, IMASK=(1 << outlier_index_bits(D)) - 1,
        NSIDE=n_side, NSIDE_P2=max(16, _pow2(n_side)),
        HAS_STARTS=starts is not None, USE_ASM=use_asm,
        TAB_REGS=TAB_REGS if tab_regs is None else tab_regs, QROWS=qrows, NSUB=nsub,
        OPAQUE=OPAQUE if opaque is None else opaque,
        num_warps=num_warps, num_stages=num_stages, **extra,
    )
    LAST_SPLIT_KERNEL["compiled"] = compiled
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    tk._merge_kernel[(B * Hq,)](o_part, l_part, out, lse, num_splits, D=D,
                                SPLITS_P2=max(2, _pow2(num_splits)), num_warps=4)
    return (out, lse) if return_lse else out


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))
