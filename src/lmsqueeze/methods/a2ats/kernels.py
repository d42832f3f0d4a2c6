"""A²ATS retrieval kernels: Triton on CUDA, the PyTorch reference (`reference.py`) elsewhere.

- `code_append`: the new token's code (argmax of its assignment scores) and the candidate histogram update
  (tokens crossing the window and the distance-band edges).
- `assign_append`: the new keys' codes and `code_append` (optionally one kernel keeping per-block maxima).
- `select_codes`: from the lookup table q·C and the candidate histogram per virtual code (band x C + code),
  the virtual codes whose score reaches the kth-largest candidate score of any head of a KV group.
- `sparse_decode_attention`: one decode query per sequence over the sinks, the window and the slots whose
  virtual code is selected, reading K/V rows only for attended slots. The K/V store may be pinned host memory
  (zero-copy reads over PCIe) while q, codes and sel are on the GPU.

Both read lengths/starts from device tensors and never synchronise with the host: CUDA-graph capturable.
"""

from __future__ import annotations

import functools

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.a2ats.retrieval import assign_scores
from lmsqueeze.methods.a2ats.reference import (
    code_append_reference,
    select_codes_reference,
    sparse_decode_attention_reference,
)

MAX_TRITON_CODEBOOK = 32768  # virtual codes (bands x C) per select program (the wide kernel: one head's C
# scores in registers at a time); code_append holds one head's C assignment scores
TILES_PER_PROGRAM = 16  # sparse kernel: slots one program scans ~ 16 tiles (latency-bound gather chain)
MAX_SPLITS = 256
SPARSE_BLOCK_N = 64
SPARSE_NUM_WARPS = 4
SPARSE_NUM_STAGES = 2
# Two-phase kernel (compact the attended slots, then attend over the list): the default. H100, Llama-3-8B
# layer, batch 14, 32K tokens, 11.7% of the rows read: 0.113 ms (2.0 TB/s effective) against 0.476 ms for the
# best one-phase setting (benchmarks/results/a2ats_serving_h100.json, part "kernel"; the one-phase scan is
# latency-bound on its code -> table -> K/V load chain). bench_a2ats.py times both and uses the faster one.
SPARSE_COMPACT = True
# Select kernel: False = one program per KV group (all heads at once, or head by head past WIDE_SELECT);
# True = two launches, one program per query head for the thresholds then the union. Not yet timed on the
# GPU: bench_a2ats.py times both and keeps the faster.
SELECT_SPLIT = False
# Select algorithm (`select_codes_triton`): "bisect" (the `_triton_a2ats` kernels), "radix", "bisect16",
# "bisect16_mark" (`_triton_fast.py`). H100, Llama-3-8B layer, batch 14, 32K, 4 x 4096 virtual codes, bf16
# table, same run (a2ats_serving_h100_v3b.json, part "kernel"): bisect16_mark (8 warps) 0.059 ms, bisect16
# 0.059, per-head bisection on 32-bit keys (split) 0.091, one program per group 0.116, radix 0.129 (compute-
# bound: 16 compares per score and pass). All equal the reference there. bench_a2ats.py re-times them. Later run
# (a2ats_serving_h100_v3c.json): "bisect16v_mark" (key range bounded by the data, stops at one key) 0.041 ms vs
# 0.059 for bisect16_mark (8 warps), both equal to the reference; serving 2.03x dense at 32K, 2.07x at 128K.
SELECT_ALGO = "bisect16v_mark"
# code_append with one program per (sequence, KV head) (`_triton_fast.py`) instead of one per sequence.
APPEND_PER_HEAD = True
# band_lookup_table: the band-rotated queries by one Triton launch (`_triton_fast._band_query_kernel`)
# instead of the float32 rotation, cast and permute copies: 0.013 ms vs 0.029 ms for queries + table (v3b).
FUSED_BAND_QUERY = True
# assign_append: the new keys' codes by a Triton kernel that keeps per-block maxima (no float32 score
# array) feeding the per-head append: 0.028 ms vs 0.063 ms for assign_scores + the one-program append (v3b;
# assign_scores + per-head append 0.028; codes equal the float32 argmax in the bench's check). In the later run
# whose serving figure the README quotes (a2ats_serving_h100_v3c.json) assign_scores + the per-head append was the
# faster (0.0259 vs 0.0278 ms) and was the one its serving part used, so it is the default.
FUSED_ASSIGN = False


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_sparse_splits(batch: int, kv_heads: int, s_max: int, block_n: int = SPARSE_BLOCK_N,
                          tiles_per_program: int = TILES_PER_PROGRAM) -> int:
    """Splits per (sequence, KV head): about `tiles_per_program` tiles of the static buffer each.

    Depends on shapes only (never on lengths), so one captured graph serves every length.
    """
    tiles = -(-s_max // block_n)
    return max(1, min(MAX_SPLITS, -(-tiles // tiles_per_program)))


def _check_select(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor) -> None:
    if lut.dim() != 4 or counts.dim() != 3 or lut.shape[:2] != counts.shape[:2] or lut.shape[3] != counts.shape[2]:
        raise LmsqueezeError(f"select_codes wants lut [B, Hkv, G, C] and counts [B, Hkv, C]; got "
                             f"{tuple(lut.shape)} and {tuple(counts.shape)}")
    for name, t in (("lengths", lengths), ("starts", starts)):
        if t.shape != (lut.shape[0],):
            raise LmsqueezeError(f"{name} must be a [B] tensor, got {tuple(t.shape)}")


def select_codes(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                 ratio: torch.Tensor | float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes kept for a decode step. lut: [B, Hkv, G, C] float (code dim contiguous); counts: [B, Hkv, C]
    int32 candidate histogram; lengths, starts: [B] int32; ratio: float or [1] float64 tensor (k = floor(ratio
    x (lengths − starts)) tokens per head). Returns sel: [B, Hkv, C] int8 (into `out` when given)."""
    _check_select(lut, counts, lengths, starts)
    if lut.is_cuda and lut.shape[3] <= MAX_TRITON_CODEBOOK:
        return select_codes_triton(lut, counts, lengths, starts, ratio, out)
    r = float(ratio) if not isinstance(ratio, torch.Tensor) else ratio.double()
    kth = ((lengths - starts).double() * r).floor().to(torch.int32)
    sel = select_codes_reference(lut, counts, kth).to(torch.int8)
    if out is not None:
        out.copy_(sel)
        return out
    return sel


def select_codes_triton(lut: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                        ratio: torch.Tensor | float, out: torch.Tensor | None = None,
                        wide: bool | None = None, split: bool | None = None,
                        radix: bool | None = None, algo: str | None = None) -> torch.Tensor:
    """The Triton select kernel on any tensors Triton accepts (CUDA, or CPU under TRITON_INTERPRET=1).
    wide: force the head-by-head kernel (True) or the all-heads one (False); None: by size. split: the
    two-launch form (None: SELECT_SPLIT). radix: True forces the 16-way search, False the bisection kernels
    of `_triton_a2ats` (wide/split); None: `algo` (None: "bisect" when wide or split is given, else
    SELECT_ALGO) picks: "radix", "bisect16" (bisection
    per query head, 16-bit keys for 16-bit tables, then the union), "bisect16_mark" (same, each head marking
    sel directly after a memset), "bisect16v_mark" (same over the data's key range, value-midpoint splits
    first, stopping at one key; not yet timed on the GPU), or "bisect" (`_triton_a2ats`, wide/split)."""
    _check_select(lut, counts, lengths, starts)
    from lmsqueeze.methods.a2ats._triton_a2ats import select_launch

    B, Hkv, _G, C = lut.shape
    if lut.stride(3) != 1 or counts.stride(2) != 1:
        raise LmsqueezeError("select_codes needs the code dim of lut and counts contiguous")
    if counts.dtype != torch.int32 or lengths.dtype != torch.int32 or starts.dtype != torch.int32:
        raise LmsqueezeError(f"counts, lengths and starts must be int32, got {counts.dtype}, {lengths.dtype}, "
                             f"{starts.dtype}")
    if not isinstance(ratio, torch.Tensor):
        ratio = torch.tensor([float(ratio)], dtype=torch.float64, device=lut.device)
    if out is None:
        out = torch.empty(B, Hkv, C, dtype=torch.int8, device=lut.device)
    if C > MAX_TRITON_CODEBOOK:
        raise LmsqueezeError(f"the Triton select holds at most {MAX_TRITON_CODEBOOK} virtual codes per program, "
                             f"got {C}; use fewer bands or a smaller codebook")
    if algo is None:  # wide/split name the `_triton_a2ats` bisection kernels
        algo = "bisect" if (wide is not None or split is not None) else SELECT_ALGO
    if radix or (radix is None and algo == "radix"):
        from lmsqueeze.methods.a2ats._triton_fast import radix_select_launch

        radix_select_launch(lut, counts, lengths, starts, ratio, out)
        return out
    if radix is None and algo == "bisect16v_mark":
        from lmsqueeze.methods.a2ats._triton_fast import bisect_value_select_launch

        bisect_value_select_launch(lut, counts, lengths, starts, ratio, out)
        return out
    if radix is None and algo in ("bisect16", "bisect16_mark"):
        from lmsqueeze.methods.a2ats._triton_fast import bisect_select_launch

        bisect_select_launch(lut, counts, lengths, starts, ratio, out, mark=algo == "bisect16_mark")
        return out
    select_launch(lut, counts, lengths, starts, ratio, out, wide, SELECT_SPLIT if split is None else split)
    return out


def band_edge_tensor(window: int, bands: tuple[int, ...], device) -> torch.Tensor:
    """int32 [NB] lower band edges (window, e1, ...) on `device`: make it once, outside captured graphs."""
    from lmsqueeze.methods.a2ats.windowed_rope import band_edges

    return torch.tensor(band_edges(window, bands), dtype=torch.int32, device=device)


def code_append(scores: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, counted: torch.Tensor,
                slot: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, sinks: int, window: int,
                bands: tuple[int, ...] = (), edges: torch.Tensor | None = None) -> None:
    """Write the new token's code and update the candidate histogram, in place (one launch on CUDA).

    scores: [Hkv, B, C] float32 assignment scores of the new token (`retrieval.assign_scores`); codes:
    [B, Hkv, S] int16; counts: [B, Hkv, NB * C] int32 (NB = len(bands) + 1); counted: [B] int64; slot: [1]
    int64; lengths, starts: [B] int32; edges: `band_edge_tensor(window, bands, device)` (made here if None;
    pass it inside captured graphs). Same effect as `code_append_reference`.
    """
    if scores.is_cuda and scores.shape[2] <= MAX_TRITON_CODEBOOK:
        if edges is None:
            edges = band_edge_tensor(window, bands, scores.device)
        return code_append_triton(scores, codes, counts, counted, slot, lengths, starts, sinks, edges)
    return code_append_reference(scores, codes, counts, counted, slot, lengths, starts, sinks, window, bands)


def code_append_triton(scores, codes, counts, counted, slot, lengths, starts, sinks: int,
                       edges: torch.Tensor, per_head: bool | None = None) -> None:
    """The Triton code-append kernel; edges: int32 [NB] lower band edges (window first). per_head: one
    program per (sequence, KV head) plus a tiny launch for `counted` (None: APPEND_PER_HEAD)."""
    from lmsqueeze.methods.a2ats._triton_a2ats import code_append_launch
    from lmsqueeze.methods.a2ats._triton_fast import code_append_head_launch

    Hkv, B, C = scores.shape
    NB = edges.shape[0]
    if codes.shape[:2] != (B, Hkv) or counts.shape != (B, Hkv, NB * C) or counted.shape != (B,):
        raise LmsqueezeError(f"code_append: scores {tuple(scores.shape)} do not match codes "
                             f"{tuple(codes.shape)} / counts {tuple(counts.shape)} / counted {tuple(counted.shape)}")
    if scores.stride(2) != 1 or codes.stride(2) != 1 or counts.stride(2) != 1:
        raise LmsqueezeError("code_append needs contiguous last dims")
    launch = code_append_head_launch if (APPEND_PER_HEAD if per_head is None else per_head) else code_append_launch
    launch(scores, codes, counts, counted, slot, lengths, starts, sinks, edges)


def band_lookup_table(q_pre: torch.Tensor, cos_nb: torch.Tensor, sin_nb: torch.Tensor, score_cb: torch.Tensor,
                      fused: bool | None = None) -> torch.Tensor:
    """`retrieval.lookup_table(windowed_rope.band_queries(q_pre, cos_nb, sin_nb), score_cb)`: q_pre: [B, Hq, D]
    pre-RoPE queries; cos_nb, sin_nb: [NB, D]; score_cb: [Hkv, C, D]. Returns lut: [B, Hkv, G, NB * C]. With
    fused (None: FUSED_BAND_QUERY; CUDA, or forced on any Triton device) the queries come from one launch."""
    from lmsqueeze.methods.a2ats.retrieval import lookup_table
    from lmsqueeze.methods.a2ats.windowed_rope import band_queries

    use = FUSED_BAND_QUERY if fused is None else fused
    B, Hq, D = q_pre.shape
    if use and (q_pre.is_cuda or fused) and D & (D - 1) == 0 and q_pre.stride(2) == 1:
        from lmsqueeze.methods.a2ats._triton_fast import band_query_launch

        Hkv, C, _ = score_cb.shape
        NB = cos_nb.shape[0]
        x = band_query_launch(q_pre, cos_nb.float().contiguous(), sin_nb.float().contiguous(), Hkv, score_cb.dtype)
        lut = torch.bmm(x, score_cb.transpose(1, 2))  # [Hkv, B*G*NB, C]
        return lut.view(Hkv, B, Hq // Hkv, NB * C).permute(1, 0, 2, 3)
    return lookup_table(band_queries(q_pre, cos_nb, sin_nb), score_cb)


def assign_append(k: torch.Tensor, assign_cb: torch.Tensor, half_norms: torch.Tensor, codes: torch.Tensor,
                  counts: torch.Tensor, counted: torch.Tensor, slot: torch.Tensor, lengths: torch.Tensor,
                  starts: torch.Tensor, sinks: int, window: int, bands: tuple[int, ...] = (),
                  edges: torch.Tensor | None = None, fused: bool | None = None) -> None:
    """Code the new keys and update the histogram: `retrieval.assign_scores` then `code_append`, or on CUDA
    with fused (None: FUSED_ASSIGN) the partial-argmax kernel and the per-head append (same codes up to
    float32 rounding of near-tied codewords).

    k: [B, Hkv, 1, D] (pre-RoPE with windowed RoPE); assign_cb: [Hkv, C, D] float32; half_norms: [Hkv, C];
    the rest as `code_append`.
    """
    use = FUSED_ASSIGN if fused is None else fused
    D = k.shape[3]
    if use and (k.is_cuda or fused) and k.shape[2] == 1 and D & (D - 1) == 0 and k.stride(3) == 1:
        if edges is None:
            edges = band_edge_tensor(window, bands, k.device)
        assign_append_triton(k, assign_cb, half_norms, codes, counts, counted, slot, lengths, starts, sinks, edges)
        return
    scores = assign_scores(k, assign_cb, half_norms)  # [Hkv, B, C]
    code_append(scores, codes, counts, counted, slot, lengths, starts, sinks, window, bands, edges)


def assign_append_triton(k, assign_cb, half_norms, codes, counts, counted, slot, lengths, starts, sinks: int,
                         edges: torch.Tensor) -> None:
    """The two Triton launches of `assign_append` on any tensors Triton accepts."""
    from lmsqueeze.methods.a2ats._triton_fast import assign_partial_launch, code_append_head_launch

    if assign_cb.dtype != torch.float32 or assign_cb.stride(2) != 1 or half_norms.stride(1) != 1:
        raise LmsqueezeError("assign_append needs float32 codebooks with contiguous last dims")
    best, idx, prev = assign_partial_launch(k, assign_cb, half_norms, counted, lengths)
    code_append_head_launch(best, codes, counts, counted, slot, lengths, starts, sinks, edges, score_idx=idx,
                            num_codes=assign_cb.shape[1], prev=prev)


def _check_sparse(q, k_store, v_store, codes, sel, starts, lengths) -> None:
    if q.dim() != 3 or k_store.dim() != 4 or v_store.shape != k_store.shape:
        raise LmsqueezeError(f"sparse_decode_attention wants q [B, Hq, D] and stores [B, Hkv, S, D]; got "
                             f"q {tuple(q.shape)}, k {tuple(k_store.shape)}, v {tuple(v_store.shape)}")
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_store.shape
    if k_store.shape[0] != B or k_store.shape[3] != D or Hq % Hkv:
        raise LmsqueezeError(f"q {tuple(q.shape)} does not match the stores {tuple(k_store.shape)}")
    if codes.shape != (B, Hkv, S) or sel.dim() != 3 or sel.shape[:2] != (B, Hkv):
        raise LmsqueezeError(f"codes must be [B, Hkv, S] = {(B, Hkv, S)} and sel [B, Hkv, C]; got "
                             f"{tuple(codes.shape)}, {tuple(sel.shape)}")
    for name, t in (("starts", starts), ("lengths", lengths)):
        if t.shape != (B,) or t.dtype != torch.int32:
            raise LmsqueezeError(f"{name} must be an int32 [B] tensor, got {t.dtype} {tuple(t.shape)}")


def sparse_decode_attention(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, codes: torch.Tensor,
                            sel: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, sinks: int,
                            window: int, scaling: float, near: bool = True, return_lse: bool = False,
                            num_splits: int | None = None, bands: tuple[int, ...] = (),
                            edges: torch.Tensor | None = None):
    """Decode attention over the slots picked by `reference.selected_slots`.

    q: [B, Hq, D] (RoPE applied); k_store, v_store: [B, Hkv, S, D] RoPE'd keys and values (GPU, or pinned
    host memory when q is on the GPU); codes: [B, Hkv, S] int16; sel: [B, Hkv, NB * C] int8 over virtual
    codes (NB = len(bands) + 1; edges: `band_edge_tensor`, made here if None); starts, lengths: [B] int32
    device tensors. near=False attends the selected candidates only (for a merge with the sinks
    and window held elsewhere). Returns out: [B, Hq, D] (and lse: [B, Hq] float32 when return_lse).
    """
    _check_sparse(q, k_store, v_store, codes, sel, starts, lengths)
    if q.is_cuda:
        if edges is None:
            edges = band_edge_tensor(window, bands, q.device)
        return sparse_decode_attention_triton(q, k_store, v_store, codes, sel, starts, lengths, sinks, window,
                                              scaling, near, return_lse, num_splits, edges=edges)
    return sparse_decode_attention_reference(q, k_store, v_store, codes, sel, starts, lengths, sinks, window,
                                             scaling, near, return_lse, bands)


def sparse_decode_attention_triton(q, k_store, v_store, codes, sel, starts, lengths, sinks: int, window: int,
                                   scaling: float, near: bool = True, return_lse: bool = False,
                                   num_splits: int | None = None, *, block_n: int | None = None,
                                   num_warps: int | None = None, num_stages: int | None = None,
                                   compact: bool | None = None, edges: torch.Tensor | None = None):
    """The Triton kernels on any tensors Triton accepts; same contract as `sparse_decode_attention`."""
    _check_sparse(q, k_store, v_store, codes, sel, starts, lengths)
    from lmsqueeze.methods.a2ats._triton_a2ats import sparse_launch

    for t in (q, k_store, v_store, codes, sel):
        if t.stride(-1) != 1:
            raise LmsqueezeError("sparse_decode_attention needs the last dim of every input contiguous")
    if k_store.dtype != q.dtype or v_store.dtype != q.dtype:
        raise LmsqueezeError(f"q, k and v must share a dtype, got {q.dtype}, {k_store.dtype}, {v_store.dtype}")
    block_n = block_n or SPARSE_BLOCK_N
    B, Hkv, S = codes.shape
    if num_splits is None:
        num_splits = default_sparse_splits(B, Hkv, S, block_n)
    out, lse = sparse_launch(q, k_store, v_store, codes, sel, starts, lengths, sinks, window, scaling, near,
                             num_splits, block_n, num_warps or SPARSE_NUM_WARPS, num_stages or SPARSE_NUM_STAGES,
                             SPARSE_COMPACT if compact is None else compact, edges=edges)
    return (out, lse) if return_lse else out
