"""Decode-attention microbenchmark: one layer, one new query token over an N-token cache, batch B.

Decode attention is bandwidth-bound, so every row reports the bytes its method must move, the achieved TB/s,
the fraction of the peak, and its speedup over dense SDPA timed in the same run. Methods add rows by
registering a variant: a function from the shared random inputs to a callable and its byte count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmsqueeze.bench.device import fits, l2_bytes
from lmsqueeze.bench.options import check_positive, parse_names
from lmsqueeze.bench.presets import Preset, get_preset
from lmsqueeze.bench.results import timing_row
from lmsqueeze.bench.timing import time_fn

log = logging.getLogger(__name__)

BASELINE = "sdpa"


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """One decode step of one layer. q: [B, Hq, 1, D]; k, v: [B, Hkv, N, D] (cached keys, post-RoPE)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


@dataclass(slots=True)
class AttentionBench:
    """What a variant built: `fn()` returns out: [B, Hq, 1, D]; `bytes_moved` is the fewest bytes it must move."""

    fn: Callable[[], torch.Tensor]
    bytes_moved: int
    exact: bool = True  # dense attention up to rounding (False for lossy methods: larger errors are expected)


AttentionVariant = Callable[[AttentionInputs], AttentionBench]
ATTENTION_VARIANTS: dict[str, AttentionVariant] = {}


def register_attention_variant(name: str) -> Callable[[AttentionVariant], AttentionVariant]:
    """Decorator: add a variant to ATTENTION_VARIANTS under `name` (methods use this to add rows)."""
    def deco(build: AttentionVariant) -> AttentionVariant:
        ATTENTION_VARIANTS[name] = build
        return build
    return deco


def dense_bytes(inp: AttentionInputs) -> int:
    """Bytes dense attention must move: read q, K, V once; write out (the size of q)."""
    return 2 * inp.q.nbytes + inp.k.nbytes + inp.v.nbytes


@register_attention_variant("sdpa")
def sdpa_variant(inp: AttentionInputs) -> AttentionBench:
    """Dense baseline: PyTorch SDPA with `enable_gqa` over exactly N keys."""
    q, k, v, scale = inp.q, inp.k, inp.v, inp.scale
    gqa = inp.groups > 1
    return AttentionBench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa),
                          dense_bytes(inp))


@register_attention_variant("sdpa-pack-gqa")
def sdpa_pack_gqa_variant(inp: AttentionInputs) -> AttentionBench:
    """Dense SDPA with the query heads of each KV head packed as G query rows: q [B, Hkv, G, D], no GQA."""
    b, hq, _, d = inp.q.shape
    q = inp.q.reshape(b, inp.k.shape[1], inp.groups, d)
    k, v, scale = inp.k, inp.v, inp.scale
    return AttentionBench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale).reshape(b, hq, 1, d),
                          dense_bytes(inp))


@register_attention_variant("sdpa-repeat-kv")
def sdpa_repeat_kv_variant(inp: AttentionInputs) -> AttentionBench:
    """Dense SDPA after copying K/V to every query head (what HF does without enable_gqa): G x the traffic."""
    q, k, v, scale, g = inp.q, inp.k, inp.v, inp.scale, inp.groups

    def fn() -> torch.Tensor:
        b, h, n, d = k.shape
        kr = k[:, :, None].expand(b, h, g, n, d).reshape(b, h * g, n, d)
        vr = v[:, :, None].expand(b, h, g, n, d).reshape(b, h * g, n, d)
        return F.scaled_dot_product_attention(q, kr, vr, scale=scale)
    return AttentionBench(fn, dense_bytes(inp))


def random_inputs(preset: Preset, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator | None = None) -> AttentionInputs:
    """Fresh random q: [B, Hq, 1, D], k, v: [B, Hkv, N, D] at the preset's head shape (never zeros)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    hq, hkv, d = preset.num_heads, preset.num_kv_heads, preset.head_dim
    return AttentionInputs(randn(batch, hq, 1, d), randn(batch, hkv, length, d), randn(batch, hkv, length, d),
                           1.0 / math.sqrt(d))


def reference_attention(inp: AttentionInputs) -> torch.Tensor:
    """Dense attention in float32, one batch row at a time. Returns out: [B, Hq, 1, D] float32."""
    b, hq, _, d = inp.q.shape
    hkv, g = inp.k.shape[1], inp.groups
    outs = []
    for i in range(b):
        q = inp.q[i].float().reshape(hkv, g, d)                      # [Hkv, G, D]
        k, v = inp.k[i].float(), inp.v[i].float()                    # [Hkv, N, D]
        p = torch.softmax(q @ k.transpose(1, 2) * inp.scale, dim=-1)  # [Hkv, G, N]
        outs.append((p @ v).reshape(hq, 1, d))
    return torch.stack(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32 (NaN if out has non-finite values)."""
    out = out.float().reshape(ref.shape)
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def _copies(set_bytes: int, device: torch.device, rotate_bytes: int | None) -> int:
    """How many input sets to rotate through so repeated runs do not read from L2 (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    target = 4 * l2_bytes(device) if rotate_bytes is None else rotate_bytes
    return max(1, min(8, math.ceil(target / set_bytes)))


def run_attention_sweep(preset: str | Preset, lengths: Sequence[int], batches: Sequence[int] = (1,),
                        dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                        variants: Sequence[str] = (BASELINE,), warmup: int = 10, iters: int = 50,
                        use_graph: bool = True, peak_tb_per_s: float = 3.0, rotate_bytes: int | None = None,
                        progress: bool = True, seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Time every variant at every (batch, length); returns (rows, skipped-case messages).

    The SDPA baseline is always timed first in each case; each row carries its speedup over it, its error
    against a float32 reference on the same inputs, bytes moved, TB/s and the fraction of `peak_tb_per_s`.
    """
    from tqdm.auto import tqdm

    p = preset if isinstance(preset, Preset) else get_preset(preset)
    lengths = check_positive(list(lengths), "lengths")
    batches = check_positive(list(batches), "batch sizes")
    names = parse_names(variants, ATTENTION_VARIANTS, "attention variant")
    names = [BASELINE] + [n for n in names if n != BASELINE]
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    elt = torch.empty((), dtype=dtype).element_size()
    rows, skipped = [], []
    cases = [(b, n) for b in batches for n in lengths]
    bar = tqdm(total=len(cases) * len(names), desc=f"attention {p.name}", disable=not progress or None)
    for batch, length in cases:
        kv = 2 * batch * p.num_kv_heads * length * p.head_dim * elt
        copies = _copies(kv, device, rotate_bytes)
        # inputs + one G-times copy of K/V (repeat-kv) + the float32 reference of one batch row
        need = copies * kv + (p.groups * kv if "sdpa-repeat-kv" in names else 0) + kv // batch * 4 // elt * 2
        if not fits(need, device):
            msg = f"B={batch} N={length}: needs ~{need / 2**30:.1f} GiB, more than is free; skipped"
            log.warning(msg)
            skipped.append(msg)
            bar.update(len(names))
            continue
        sets = [random_inputs(p, batch, length, dtype, device, gen) for _ in range(copies)]
        ref = reference_attention(sets[0])
        base = None
        for name in names:
            bar.set_postfix_str(f"B={batch} N={length} {name}")
            benches = [ATTENTION_VARIANTS[name](s) for s in sets]
            err = rel_err(benches[0].fn(), ref)
            fns = [bench.fn for bench in benches]
            timing = time_fn(lambda fns=fns: [f() for f in fns], device, warmup, iters, use_graph,
                             calls_per_iter=copies)
            base = timing if name == BASELINE else base
            rows.append(timing_row(
                name, timing, baseline=BASELINE, baseline_timing=base, bytes_moved=benches[0].bytes_moved,
                peak_tb_per_s=peak_tb_per_s, preset=p.name, batch=batch, length=length, dtype=str(dtype),
                heads=f"{p.num_heads}/{p.num_kv_heads}x{p.head_dim}", input_sets=copies, rel_err=err,
                exact=benches[0].exact))
            del benches, fns
            bar.update(1)
        del sets, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows, skipped


def check_rows(rows: list[dict[str, Any]], tol: float = 2e-2) -> list[str]:
    """Messages for exact rows whose error against the float32 reference exceeds `tol` (or is NaN)."""
    bad = []
    for r in rows:
        err = r.get("rel_err")
        if r.get("exact", True) and (err is None or not err <= tol):
            bad.append(f"{r['method']} B={r['batch']} N={r['length']}: rel_err {err} > {tol}")
    return bad
