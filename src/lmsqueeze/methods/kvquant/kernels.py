"""Fused decode attention over the packed KVQuant cache (Triton), beside `reference.py` (PyTorch).

One program per (sequence split, batch x KV head) holds the G query heads of its KV head and walks its share
of the valid slots in tiles of BLOCK_N tokens (flash-decoding); a second small kernel merges the splits by
their log-sum-exp. Nothing dense is materialised: each tile reads the packed words, the sparse outliers and
the per-token value metadata, and

- turns codes into levels with byte permutes (PTX `prmt`: the codebook's levels, as bytes, sit in two or four
  registers; each permute looks up four codes) and the fp16 "1024 + byte" trick, giving level / 128 exactly;
  without inline assembly (TRITON_INTERPRET=1, `use_asm=False`) the same values come from a table load;
- adds the sparse outliers into the levels (residual / scale at the outlier's channel, via identity rows);
- applies RoPE without touching the per-channel key scales: with k = s * l + z and RoPE tables CR, SR of
  the tile's *relative* offsets (loop-invariant, in registers), q . R(p0 + n) k
  = [l*CR, l*SR] . [s*q~, -s*rh(q~)] + [CR, SR] . [z*q~, -z*rh(q~)], where q~ = R(p0)^T q is rotated once
  per tile (p0 = the tile's first position; positions run slot by slot inside a sequence). Both terms are
  tensor-core dots; the key side costs two fp16 multiplies per element;
- values: p * scale (per token) times the levels on tensor cores, plus p . zero;
- the full-precision side tokens (sinks, recent window) are attended by split 0.
Softmax is online in base 2. GQA: all query heads of a KV head share each tile. Per-sequence lengths (and
left-padding starts) are read from device tensors, and the grid depends only on shapes: CUDA-graph safe.

Status (benchmarks/results/kvquant_decode_h100_v7d.json, H100, fp16 SDPA timed in the same run): correct,
CUDA-graph safe, 0.59-0.80x of fp16 SDPA at the Llama-3-8B shape (0.24-0.60 TB/s of 3.0), far from the bytes
floor (targets 2.5x / 3x at 128K missed). The kernel is latency-bound, not bound by its instruction count. The
value outliers' fold went from an integer compare, a select and an add per element and entry to one packed
f16x2 set / fma pair per two elements (`_fold`): the main loop fell from 1409 to 1153 SASS instructions per
64-token tile and warp at 3 bits and 168 registers (1494 to 1141 uncapped; Triton 3.9 offline for sm_90,
benchmarks/results/kvquant_sass_sm90.json from benchmarks/scripts/kvquant_sass.py), but the time moved only from
0.2158 ms (_v6) to 0.2133 ms (_v7_sweep.json, commit a696d1d: the same fold, loads grouped in a helper) at 3
bits, 128K, batch 1. Those are separate runs: the final code took 0.2302 ms on another H100 (_v7c_sweep.json),
with fp16 SDPA at 0.1846 ms in both, so this kernel's time varies about 8% between machines. Slower than the default in the same runs: the next tile's
loads issued one tile ahead into registers (0.2146 / 0.2022 ms at 168 / 255 registers vs 0.2133 / 0.1997),
key outliers folded into the levels before RoPE instead of one score term each (0.2569 ms), 128 registers,
12 programs per SM, 32-token tiles with 2 or 4 warps, 64-token tiles with 8 warps, 128-token tiles with 8
warps (_v7 and _v7b); identity-row value outliers (0.3207 vs 0.2302 ms, _v7c). Value outliers through a
factored one-hot MMA (channel = 16 a + b, one [16, BLOCK_N] x [BLOCK_N, G * D / 16] dot per entry) compiled
offline to 2311-2527 loop instructions with 170-230 spills, and was not timed. Earlier: two outlier entries
per word cost about 10% over one (kvquant_decode_h100.json vs _v3); 3-bit's high-bit words are loaded
contiguously and repeated with a join (a gathered w // 2 load had left the levels in a layout that Triton
staged to shared memory with 16-bit stores); 2 stages, KROT and the [queries, keys] orientation were slower
(_v1). A rewrite with the v2 structure (decode_v2.py) was 1.5-2.5x slower (kvquant_decode_h100_v2_first.json).
Next steps, for a kernel language with explicit layouts (Gluon or CUDA): more warps per SM to hide latency,
packed words loaded straight into the MMA fragment registers (each thread's fragment channels sit in one
byte of one word), no shared-memory round trip for the unpacked levels, and the softmax over the G real
query heads only (not a padded tile).
"""

from __future__ import annotations

import functools
import math

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.kvquant.layout import PackedKV
from lmsqueeze.methods.kvquant.pack import outlier_index_bits
from lmsqueeze.methods.kvquant.rope import KernelRope

MAX_SPLITS = 256
PROGRAMS_PER_SM = 6
LOG2E = 1.4426950408889634
QROWS = False  # scores as [keys, queries] (measured faster on the H100); True: [queries, keys]
# registers per thread: 168 = 3 programs of 4 warps per SM. 255 (2 programs) was faster on one H100 and slower on
# another (3 bits, 128K, batch 1: 0.1997 vs 0.2133 ms in kvquant_decode_h100_v7_sweep.json, 0.2505 vs 0.2302 ms in
# _v7c_sweep.json, same code): within the machine-to-machine spread of this latency-bound kernel, so unchanged
MAXNREG = 168
# keys dequantized and rotated in registers ([BLOCK_N, D] operand) instead of the 2D-wide form: measured 2x
# slower on the H100 (fp32 RoPE tables in registers: 168 registers and ~195 spilled; kvquant_decode_h100.json)
KROT = False
VFOLD = True  # value outliers folded into the level tile (`_fold`: packed f16x2 set / fma) instead of identity-row dots
LAST_SPLIT_KERNEL: dict = {}  # the last launched split kernel (benchmarks read its registers / spills)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, capacity: int, block_n: int, sms: int = 132) -> int:
    """Sequence splits per (batch, KV head) from shapes only (graph-safe): about PROGRAMS_PER_SM per SM."""
    want = -(-PROGRAMS_PER_SM * sms // (batch * kv_heads))
    return max(1, min(want, -(-capacity // block_n), MAX_SPLITS))


def default_config(bits: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for the split kernel (best of the H100 sweeps in benchmarks/results/kvquant_decode_h100*.json)."""
    return 64, 4


@functools.cache
def _eye(head_dim: int, device: str) -> torch.Tensor:
    return torch.eye(head_dim, dtype=torch.float16, device=device)


def rope_planes(inv_freq: torch.Tensor, bits: int, head_dim: int, block_n: int) -> torch.Tensor:
    """cos / sin of n * inv_freq[f] (n < block_n) for the channels f of one half, arranged like the packed
    words: [2, planes, block_n, W] int32 holding fp32 bits; plane s, word column w is channel
    per_word * w + s (per_word = 8 codes for 4 bits, 16 for 2 and 3)."""
    from lmsqueeze.methods.kvquant.pack import words_per_row

    per = 8 if bits == 4 else 16
    half = head_dim // 2
    W = words_per_row(head_dim, bits)
    nw = half // per
    inv = inv_freq.detach().float().cpu()
    n = torch.arange(block_n, dtype=torch.float32)
    tab = torch.zeros(2, per, block_n, W, dtype=torch.float32)
    for s in range(per):
        ch = torch.arange(nw) * per + s
        ang = n[:, None] * inv[ch][None, :]
        tab[0, s, :, :nw] = ang.cos()
        tab[1, s, :, :nw] = ang.sin()
    return tab.reshape(2 * per, block_n, W).view(torch.int32).contiguous()


def _consts(kv: PackedKV) -> dict:
    """Per-layer kernel constants, built once (outside any graph) and kept on the PackedKV."""
    c = getattr(kv, "_kernel_consts", None)
    if c is None:
        dev = kv.kcodes.device

        def lut(cb):
            t = torch.zeros(16, dtype=torch.float32)
            t[: cb.levels.numel()] = cb.levels.float().cpu() / 128
            return t.to(dev)

        c = {"klut": lut(kv.kq.codebook), "vlut": lut(kv.vq.codebook),
             "ktab": kv.kq.codebook.table_words(), "vtab": kv.vq.codebook.table_words(),
             "eye": _eye(kv.head_dim, str(dev))}
        kv._kernel_consts = c
    return c


def _compiled():
    from lmsqueeze.methods.kvquant import _triton_kernels as tk

    return tk._split_kernel, tk._merge_kernel


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kvquant_decode_attention(q: torch.Tensor, kv: PackedKV, lengths: torch.Tensor, scaling: float,
                             rope: KernelRope, starts: torch.Tensor | None = None, window: int | None = None,
                             *, num_splits: int | None = None, block_n: int | None = None,
                             num_warps: int | None = None, num_stages: int = 1, maxnreg: int | None = MAXNREG,
                             use_asm: bool | None = None,
                             qrows: bool | None = None, krot: bool | None = None, vfold: bool | None = None,
                             return_lse: bool = False):
    """Attention of one query per sequence over a packed KVQuant cache (same contract as the reference).

    q: [B, Hq, D] (RoPE applied, contiguous); lengths: [B] int32 filled slots (device); starts: [B] int32
    first non-padding slot or None; window: the model's sliding window or None. Returns out [B, Hq, D] in
    q's dtype (and lse [B, Hq] float32, natural log). use_asm: byte-permute lookups (default: on CUDA).
    """
    B, Hq, D = q.shape
    Hkv, cap = kv.kcodes.shape[1], kv.capacity
    bits = kv.bits
    if bits not in (2, 3, 4):
        raise LmsqueezeError(f"the kvquant decode kernel handles 2/3/4-bit caches, not {bits}-bit; use the reference")
    if D % 64 != 0 or Hq % Hkv != 0:
        raise LmsqueezeError(f"kvquant decode needs head_dim % 64 == 0 and Hq % Hkv == 0; got D={D}, "
                             f"Hq={Hq}, Hkv={Hkv}")
    if lengths.dtype != torch.int32 or lengths.shape != (B,):
        raise LmsqueezeError("lengths must be an int32 [B] tensor")
    G = Hq // Hkv
    dflt_n, dflt_w = default_config(bits, D)
    block_n = block_n or dflt_n
    num_warps = num_warps or dflt_w
    if cap % block_n != 0:
        raise LmsqueezeError(f"cache capacity {cap} is not a multiple of block_n={block_n}")
    if qrows is None:
        qrows = QROWS
    krot = KROT if krot is None else krot
    vfold = VFOLD if vfold is None else vfold
    if use_asm is None:
        use_asm = q.is_cuda and not _interpreting()
    if num_splits is None:
        sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.is_cuda else 132
        num_splits = default_num_splits(B, Hkv, cap, block_n, sms)
    c = _consts(kv)
    tab_key = ("rope", block_n)
    if tab_key not in c:
        c[tab_key] = rope_planes(rope.inv_freq, bits, D, block_n).to(q.device)
    split_kernel, merge_kernel = _compiled()
    q = q.contiguous()
    o_part = torch.empty(B * Hq * num_splits, D, dtype=torch.float32, device=q.device)
    l_part = torch.empty(B * Hq * num_splits, dtype=torch.float32, device=q.device)
    n_side = kv.side_slot.shape[1]
    kt, vt = c["ktab"], c["vtab"]
    compiled = split_kernel[(num_splits, B * Hkv)](
        q, o_part, l_part,
        kv.kcodes, kv.vcodes, kv.kout, kv.vout, kv.vscale, kv.vzero, kv.positions, kv.kind,
        kv.side_k, kv.side_v, kv.side_slot,
        kv.kq.s16, kv.kq.z16, c["eye"], c["klut"], c["vlut"], rope.inv_freq, c[tab_key], lengths,
        starts if starts is not None else lengths, kv.vsmax, kv.kscale,
        scaling * LOG2E, rope.scale, cap, Hkv, kv.n_sink, kv.window, window or 0, num_splits,
        kt[0], kt[1], kt[2], kt[3], vt[0], vt[1], vt[2], vt[3],
        D=D, BITS=bits, W=kv.kcodes.shape[-1], G=G, BLOCK_G=max(1, triton_next_pow2(G)), BLOCK_N=block_n,
        NOUT=kv.n_out_words, IMASK=(1 << outlier_index_bits(D)) - 1,
        NSIDE=n_side, NSIDE_P2=max(16, triton_next_pow2(n_side)),
        HAS_STARTS=starts is not None, USE_ASM=use_asm, QROWS=qrows, KROT=krot and not qrows,
        VFOLD=vfold and not qrows, HAS_TSCALE=kv.kscale.shape[-1] > 0, num_warps=num_warps,
        num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    LAST_SPLIT_KERNEL["compiled"] = compiled
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    merge_kernel[(B * Hq,)](o_part, l_part, out, lse, num_splits, D=D,
                            SPLITS_P2=max(2, triton_next_pow2(num_splits)), num_warps=4)
    return (out, lse) if return_lse else out


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))
