"""A²ATS on one GPU: correctness checks, kernel timings, and serving throughput against dense-on-GPU.

    LMSQUEEZE_GIT_COMMIT=<sha> python benchmarks/scripts/bench_a2ats.py --out $OUT          # H100
    python benchmarks/scripts/bench_a2ats.py --device cpu --preset tiny --out /tmp/a2 --smoke   # logic only

Three parts, one JSON (`a2ats_serving_h100.json` under --out), written after every part:

1. checks: the Triton kernels against the PyTorch references on the GPU (bf16, which the CPU interpreter cannot
   test), pinned-host (zero-copy) reads against GPU reads, and on a tiny calibrated model: ratio 1.0 == dense,
   offloaded == GPU-resident logits, CUDA-graph generation == eager generation; at the preset's shape, ratio
   1.0 logits == dense logits over the same random KV.
2. kernels at one layer of the preset (32K tokens): lookup table, code selection, sparse decode attention (a
   few tile / split settings; the fastest is used below) vs the dense decode kernel over the same cache, each
   with its bytes; the sparse kernel over a pinned host store and the CPU-threads path.
3. serving: each system at the largest batch its memory allows for the full-depth model (GPU: the card's
   memory minus the weights, a reserve, codebooks; host: available memory minus a reserve for the offloaded
   KV), decode-step time measured as a CUDA graph on the preset's shape with `--layers` and 1 decoder layers
   (random weights, random KV: no prefill), and extrapolated linearly to the full depth:
   t_full = t_1 + (L_full − 1) (t_L − t_1) / (L − 1). tokens/s = batch / t_full. Systems: dense (all KV on
   the GPU, Triton split-K decode), a2ats-gpu (KV on the GPU, retrieval), a2ats-offload (KV in pinned host
   memory, zero-copy reads of the selected rows), a2ats-offload-cpu (same, attention on CPU threads; eager).
   Codes are random (uniform over the codebook) and the codebook random: with random weights the heads of a
   group select nearly independent tokens, so the union read per KV head is close to its maximum (G x ratio).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze
from lmsqueeze.bench.presets import build_random_model, get_preset
from lmsqueeze.bench.results import command_line, write_result
from lmsqueeze.bench.timing import time_cpu, time_cuda
from lmsqueeze.methods.a2ats import A2ATS, kernels, random_artifact, retrieval, with_settings
from lmsqueeze.methods.a2ats.offload import ring_size, selected_attention_cpu, to_host
from lmsqueeze.methods.a2ats.reference import (
    select_codes_reference,
    selected_slots,
    sparse_decode_attention_reference,
)
from lmsqueeze.methods.cache import Step

log = logging.getLogger("bench_a2ats")
GiB = 2**30


class Run:
    """Rows of the three parts, the JSON writer and the time budget."""

    def __init__(self, args) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.checks: list[dict] = []
        self.kernels: list[dict] = []
        self.serving: list[dict] = []
        self.extra: dict = {"options": vars(args).copy()}
        self.out = Path(args.out)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def save(self) -> None:
        rows = [dict(part="check", **r) for r in self.checks] + [dict(part="kernel", **r) for r in self.kernels] \
            + [dict(part="serving", **r) for r in self.serving]
        self.extra["elapsed_s"] = round(self.elapsed(), 1)
        write_result(self.out / self.args.name, "a2ats_serving", command_line(), rows, self.extra, self.args.device)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, args, graph: bool = True):
    if dev.type == "cuda":
        return time_cuda(fn, args.warmup, args.iters, use_graph=graph)
    return time_cpu(fn, 1, 20)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()


# 1. checks -----------------------------------------------------------------------------------------------
def check(run: Run, name: str, fn) -> None:
    """Run one check; record ok / error / numbers, never raise."""
    t = time.perf_counter()
    try:
        info = fn() or {}
        ok = bool(info.pop("ok", True))
        row = {"method": f"check:{name}", "ok": ok, **info}
    except Exception as e:  # noqa: BLE001 - a failed check is a result
        row = {"method": f"check:{name}", "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t, 2)
    run.checks.append(row)
    print(f"[{run.elapsed():6.1f}s] {row}", flush=True)


def kernel_inputs(B, Hkv, G, S, D, C, dtype, dev, seed=0, ratio=0.03, bands=()):
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=gen, device=dev).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen, device=dev, dtype=dtype)
    codes = torch.randint(0, C, (B, Hkv, S), generator=gen, device=dev).to(torch.int16)
    score_cb = torch.randn(Hkv, C, D, generator=gen, device=dev)
    starts = torch.zeros(B, dtype=torch.int32, device=dev)
    lengths = torch.full((B,), S, dtype=torch.int32, device=dev)
    counts, _ = retrieval.recount(codes, starts, S, 8, 64, C, bands)
    qb = q[:, :, None].expand(B, Hkv * G, len(bands) + 1, D)  # stands for the band-rotated queries
    lut = retrieval.lookup_table(qb, score_cb)
    return {"q": q, "qb": qb, "k": k, "v": v, "codes": codes, "score_cb": score_cb, "starts": starts,
            "lengths": lengths, "counts": counts, "lut": lut, "ratio": ratio, "bands": bands,
            "edges": kernels.band_edge_tensor(64, bands, dev)}


def checks(run: Run, dev: torch.device) -> None:
    args = run.args
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    S = 4099 if not args.smoke else 300

    def kernels_vs_reference():
        bands = (300, 1000) if not args.smoke else (100, 200)
        x = kernel_inputs(3, 2, 4, S, 128, 512, dt, dev, seed=1, ratio=0.05, bands=bands)
        sel = kernels.select_codes(x["lut"], x["counts"], x["lengths"], x["starts"], x["ratio"])
        kth = retrieval.tokens_to_keep(x["ratio"], x["lengths"], x["starts"])
        want_sel = select_codes_reference(x["lut"], x["counts"], kth)
        out = {"select_equal": bool(torch.equal(sel.bool(), want_sel))}
        x["starts"][1] = 37
        x["lengths"][2] = S - 500
        for near in (True, False):
            mask = selected_slots(x["codes"], sel, x["starts"], x["lengths"], 8, 64, near, bands)
            kp = x["k"].masked_fill(~mask[..., None], float("nan"))  # poison every slot that must not be read
            vp = x["v"].masked_fill(~mask[..., None], float("nan"))
            want, want_lse = sparse_decode_attention_reference(x["q"], x["k"], x["v"], x["codes"], sel,
                                                               x["starts"], x["lengths"], 8, 64, 0.088, near,
                                                               return_lse=True, bands=bands)
            for compact in (False, True):
                got, lse = kernels.sparse_decode_attention_triton(x["q"], kp, vp, x["codes"], sel, x["starts"],
                                                                  x["lengths"], 8, 64, 0.088, near, return_lse=True,
                                                                  compact=compact, edges=x["edges"])
                out[f"sparse_near{int(near)}_compact{int(compact)}_rel_err"] = rel_err(got, want)
                out[f"sparse_near{int(near)}_compact{int(compact)}_lse_max_err"] = float((lse - want_lse).abs().max())
            out["selected_fraction"] = float(mask.float().mean())
        host_k, host_v = to_host(x["k"]), to_host(x["v"])
        got_h = kernels.sparse_decode_attention(x["q"], host_k, host_v, x["codes"], sel, x["starts"], x["lengths"],
                                                8, 64, 0.088, False, bands=bands, edges=x["edges"])
        got_g = kernels.sparse_decode_attention(x["q"], x["k"], x["v"], x["codes"], sel, x["starts"], x["lengths"],
                                                8, 64, 0.088, False, bands=bands, edges=x["edges"])
        out["pinned_host_equals_gpu"] = bool(torch.equal(got_h, got_g))
        cpu_out, _ = selected_attention_cpu(x["q"], host_k, host_v, x["codes"].cpu(), sel, x["starts"],
                                            x["lengths"], 8, 64, 0.088, False, bands)
        out["cpu_path_rel_err"] = rel_err(cpu_out, got_g)
        tol = 2e-2 if dt == torch.bfloat16 else 1e-5
        out["ok"] = (out["select_equal"] and out["pinned_host_equals_gpu"] and out["cpu_path_rel_err"] < tol
                     and all(out[f"sparse_near{n}_compact{c}_rel_err"] < tol for n in (0, 1) for c in (0, 1)))
        return out

    check(run, "kernels_vs_reference", kernels_vs_reference)

    from lmsqueeze.models.tiny import tiny_model

    model = tiny_model("llama", head_dim=64, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2).to(dev)
    art_box = {}

    def calibrate_tiny():
        batches = [torch.randint(0, 256, (2, 256)) for _ in range(2)]
        art = A2ATS(codebook=64, sinks=4, window=16, bands=(24, 64), kmeans_iters=10).calibrate(model, batches)
        art_box["art"] = art
        return {"relative_quantization_error": art.meta["relative_quantization_error"]}

    check(run, "tiny_calibrate_on_device", calibrate_tiny)

    def decode(art, ids, split):
        with torch.no_grad(), lmsqueeze.apply(model, art) as s:
            cache = s.new_cache()
            model(ids[:, :split], past_key_values=cache)
            return torch.cat([model(ids[:, j:j + 1], past_key_values=cache).logits
                              for j in range(split, ids.shape[1])], 1)

    def tiny_paths():
        art = art_box["art"]
        ids = torch.randint(0, 256, (2, 200), device=dev)
        dense = decode(None, ids, 190)
        out = {}
        for ratio in (1.0, 0.1):
            res = decode(with_settings(art, ratio=ratio, offload=False), ids, 190)
            off = decode(with_settings(art, ratio=ratio, offload=True), ids, 190)
            cpu = decode(with_settings(art, ratio=ratio, offload=True, offload_attention="cpu"), ids, 190)
            out[f"r{ratio}_resident_vs_dense"] = rel_err(res, dense)
            out[f"r{ratio}_offload_vs_resident"] = rel_err(off, res)
            out[f"r{ratio}_offload_cpu_vs_resident"] = rel_err(cpu, res)
        out["ok"] = out["r1.0_resident_vs_dense"] < 1e-5 and all(
            out[f"r{r}_{p}_vs_resident"] < 1e-5 for r in (1.0, 0.1) for p in ("offload", "offload_cpu"))
        return out

    check(run, "tiny_ratio1_dense_and_offload_paths", tiny_paths)

    def tiny_generate():
        art = with_settings(art_box["art"], ratio=0.1)
        ids = torch.randint(0, 256, (3, 180), device=dev)
        mask = torch.ones_like(ids)
        mask[1, :9] = 0
        out = {}
        for offload in (False, True):
            a = with_settings(art, offload=offload)
            with torch.no_grad(), lmsqueeze.apply(model, a):
                eager = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
            fast = lmsqueeze.generate(model, ids, attention_mask=mask, max_new_tokens=12, method=a, stop_tokens=[])
            out[f"offload{int(offload)}_graph"] = fast.graph
            out[f"offload{int(offload)}_equal"] = bool(torch.equal(eager[:, 180:], fast.new_tokens))
        out["ok"] = all(out[f"offload{o}_equal"] for o in (0, 1))
        return out

    check(run, "tiny_graph_generate_equals_eager", tiny_generate)

    if dev.type == "cuda":  # the same model-level checks with the earlier kernels (one-program select and
        # append, torch band queries, assign_scores), and the two against each other on a bf16 model
        fast = {"SELECT_ALGO": "bisect16_mark", "FUSED_ASSIGN": True, "APPEND_PER_HEAD": True,
                "FUSED_BAND_QUERY": True}
        old_flags = {"SELECT_ALGO": "bisect", "FUSED_ASSIGN": False, "APPEND_PER_HEAD": False,
                     "FUSED_BAND_QUERY": False}
        saved = {f: getattr(kernels, f) for f in fast}

        def set_flags(flags):
            for f, v in flags.items():
                setattr(kernels, f, v)

        def fast_equals_old_bf16():
            """bf16 tiny model, ratio 0.1: 12 decode steps with the new kernels vs the old ones (same selection
            rule; codes may differ only on float32 near-ties of the assignment)."""
            model.to(torch.bfloat16)
            try:
                ids = torch.randint(0, 256, (3, 200), device=dev)
                art = with_settings(art_box["art"], ratio=0.1, offload=False)
                set_flags(old_flags)
                old = decode(art, ids, 188)
                set_flags(fast)
                new = decode(art, ids, 188)
            finally:
                model.to(torch.float32)
            return {"rel_err": rel_err(new, old), "ok": rel_err(new, old) < 1e-2}

        set_flags(old_flags)
        try:
            check(run, "tiny_ratio1_dense_and_offload_paths[old_kernels]", tiny_paths)
            check(run, "tiny_graph_generate_equals_eager[old_kernels]", tiny_generate)
            check(run, "tiny_bf16_fast_kernels_equal_old", fast_equals_old_bf16)
        finally:
            set_flags(saved)


# model-level helpers -------------------------------------------------------------------------------------
def fill_a2ats_cache(model, art, batch: int, n: int, seed: int, kv=None):
    """A static-decode A²ATS cache holding n random tokens per sequence (random codes), room for one more."""
    cfg = model.config
    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    Hkv, D = cfg.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    C = art.method.codebook
    with lmsqueeze.apply(model, art) as s:
        cache = s.new_cache(batch_size=batch, max_length=n + 1)
    step = Step(cos=None, sin=None, positions=None, valid=None, scaling=D ** -0.5, window=None, layer_idx=0,
                rotary=model.model.rotary_emb)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for i, state in enumerate(cache.layers[:cfg.num_hidden_layers]):
        state._setup(torch.empty(batch, Hkv, 1, D, dtype=dt, device=dev), step)
        state.reserve(n + 1)
        if kv is not None:
            k, v = kv[i]
            state.k[:, :, :n].copy_(k)
            state.v[:, :, :n].copy_(v)
        else:
            for b in range(batch):  # bound the temporaries
                state.k[b, :, :n].normal_(generator=gen)
                state.v[b, :, :n].normal_(generator=gen)
        state.codes[:, :, :n] = torch.randint(0, C, (batch, Hkv, n), generator=gen, device=dev).to(torch.int16)
        state.length = n
        state._recount()
        if art.method.offload:
            state._offload()
    free_memory(dev)
    cache.start_static(torch.zeros(batch, dtype=torch.int32, device=dev))
    return cache


def dense_cache(model, batch: int, n: int, kv=None):
    from lmsqueeze.bench.e2e import random_dense_cache

    cache = random_dense_cache(model, batch, n)
    if kv is not None:
        for state, (k, v) in zip(cache.layers, kv):
            state.k[:, :, :n].copy_(k)
            state.v[:, :, :n].copy_(v)
    return cache


def step_fn(model, cache, batch: int, n: int):
    from lmsqueeze.bench.model import decode_inputs

    ids, pos = decode_inputs(model, batch, n)

    def step():
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits
    return step


def selected_fraction(cache) -> float | None:
    """Fraction of the candidate tokens read by the last step, averaged over the layers that ran."""
    fr = []
    for st in cache.layers:
        if getattr(st, "sel", None) is not None and st.counts is not None and int(st.counts.sum()) > 0:
            picked = (st.counts.long() * st.sel.long()).sum()
            fr.append(float(picked / st.counts.long().sum()))
    return sum(fr) / len(fr) if fr else None


def preset_shape_check(run: Run, model, dev) -> None:
    """Ratio 1.0 A²ATS (resident and offloaded) vs dense logits over the same random KV, preset shape."""
    from lmsqueeze.bench.caches import kv_shape, random_kv

    n, B = (8192, 2) if not run.args.smoke else (200, 2)

    def fn():
        kv = list(random_kv(kv_shape(model), B, n, seed=3))
        base = random_artifact(A2ATS(ratio=1.0, codebook=run.args.codebook, bands=tuple(run.args.bands),
                                     offload=False), model)
        out = {}
        with torch.no_grad():
            cache = dense_cache(model, B, n, kv)
            with lmsqueeze.apply(model, None):
                want = step_fn(model, cache, B, n)()
            for offload in (False, True):
                art = with_settings(base, offload=offload)
                cache = fill_a2ats_cache(model, art, B, n, seed=4, kv=kv)
                with lmsqueeze.apply(model, art):
                    got = step_fn(model, cache, B, n)()
                out[f"offload{int(offload)}_logits_rel_err"] = rel_err(got, want)
                del cache
        out["ok"] = all(v < 2e-2 for v in out.values())
        free_memory(dev)
        return out

    check(run, f"preset_ratio1_equals_dense_n{n}", fn)


def fused_assign_check(x, assign_cb, hn, counted, B, Hkv, D, C, bands, dt, dev):
    """Three decode steps of the fused assign + per-head append against assign_scores + the reference append
    at the kernel shape: the kernel's code is the best codeword to rounding, its histogram equals a recount
    and counted follows. Returns (ok, fraction of codes equal to the float32 argmax per step)."""
    from lmsqueeze.methods.a2ats.reference import code_append_reference

    st = [t.clone() for t in (x["codes"], x["counts"], counted)]
    ref = [t.clone() for t in (x["codes"], x["counts"], counted)]
    lengths = x["lengths"].clone()
    ok, codes_equal = True, []
    for step_i in range(3):
        if step_i == 0:  # go back 3 steps: the histogram rewinds, then two forward steps
            lengths -= 3
        else:
            lengths += 1
        slot = (lengths[:1] - 1).long()
        k = torch.randn(B, Hkv, 1, D, device=dev, dtype=dt)
        kernels.assign_append(k, assign_cb, hn, *st, slot, lengths, x["starts"], 8, 64, bands, x["edges"],
                              fused=True)
        sc = retrieval.assign_scores(k, assign_cb, hn)
        code_append_reference(sc, *ref, slot, lengths, x["starts"], 8, 64, bands)
        got = st[0][:, :, slot].long()[..., 0].T  # [Hkv, B]
        codes_equal.append(float((got == sc.argmax(-1)).float().mean()))
        ok &= bool(torch.allclose(sc.gather(2, got[..., None])[..., 0], sc.max(-1).values, rtol=0, atol=1e-3))
        ref[0].copy_(st[0])  # follow the kernel's codes (near-ties) so the histograms stay comparable
        want, _ = retrieval.recount(st[0], x["starts"], int(lengths[0]), 8, 64, C, bands)
        ok &= bool(torch.equal(st[1], want)) and bool(torch.equal(st[2], ref[2]))
    return ok, codes_equal


# 2. kernels ----------------------------------------------------------------------------------------------
def kernel_bench(run: Run, dev: torch.device, preset) -> None:
    args = run.args
    Hkv, G, D = preset.num_kv_heads, preset.groups, preset.head_dim
    n = 32768 if not args.smoke else 1024
    B = args.kernel_batch
    C = args.codebook
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bands = tuple(args.bands)
    NB = len(bands) + 1
    x = kernel_inputs(B, Hkv, G, n, D, C, dt, dev, seed=5, ratio=args.ratio, bands=bands)
    sel = kernels.select_codes(x["lut"], x["counts"], x["lengths"], x["starts"], x["ratio"])
    mask = selected_slots(x["codes"], sel, x["starts"], x["lengths"], 8, 64, True, bands)
    rows_read = int(mask.sum())
    elt = torch.empty((), dtype=dt).element_size()
    sparse_bytes = rows_read * 2 * D * elt + x["codes"].numel() * 2 + B * Hkv * NB * C
    dense_bytes = 2 * B * Hkv * n * D * elt
    base = {"batch": B, "length": n, "kv_heads": Hkv, "groups": G, "head_dim": D, "codebook": C, "bands": list(bands),
            "ratio": args.ratio, "selected_fraction": rows_read / (B * Hkv * n)}

    def add(name, fn, bytes_moved, graph=True, **extra):
        try:
            t = timed(fn, dev, args, graph)
            row = {"method": name, **base, **extra, "ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                   "graph": t.graph, "bytes": int(bytes_moved),
                   "tb_per_s": bytes_moved / (t.median_ms * 1e-3) / 1e12,
                   "floor_ms_at_3tbps": bytes_moved / 3e12 * 1e3}
            if t.note:
                row["note"] = t.note
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = {"method": name, **base, **extra, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        run.kernels.append(row)
        print(f"[{run.elapsed():6.1f}s] {row}", flush=True)
        return row

    from lmsqueeze.kernels.decode_attention import decode_attention

    add("dense_decode_attention", lambda: decode_attention(x["q"], x["k"], x["v"], x["lengths"], 0.088),
        dense_bytes)
    add("lookup_table", lambda: retrieval.lookup_table(x["qb"], x["score_cb"]),
        Hkv * C * D * 4 + B * Hkv * G * NB * C * 4, lut_dtype="float32")
    score_lo = x["score_cb"].to(dt)
    add("lookup_table", lambda: retrieval.lookup_table(x["qb"], score_lo),
        Hkv * C * D * elt + B * Hkv * G * NB * C * elt, lut_dtype=str(dt).replace("torch.", ""))
    lut_lo = retrieval.lookup_table(x["qb"], score_lo)
    # the decode step's whole table: band-rotated queries (float32 torch ops + cast/permute copies, or one
    # Triton launch) then the bmm
    ang = torch.rand(NB, D // 2, device=dev) * 6.0
    bcos, bsin = torch.cat([ang.cos()] * 2, -1).contiguous(), torch.cat([ang.sin()] * 2, -1).contiguous()
    q_pre = torch.randn(B, 1, Hkv * G, D, device=dev, dtype=dt).transpose(1, 2)[:, :, 0]
    lut_rows = {}
    for fused in (False, True):
        lut_rows[fused] = add("band_queries+lookup_table", lambda f=fused: kernels.band_lookup_table(
            q_pre, bcos, bsin, score_lo, fused=f), Hkv * C * D * elt + B * Hkv * G * NB * C * elt,
            variant="fused" if fused else "torch")
    if dev.type == "cuda" and all("ms" in r for r in lut_rows.values()):
        a = kernels.band_lookup_table(q_pre, bcos, bsin, score_lo, fused=False).float()
        b = kernels.band_lookup_table(q_pre, bcos, bsin, score_lo, fused=True).float()
        err = rel_err(b, a)
        run.extra["fused_band_query_rel_err"] = err
        kernels.FUSED_BAND_QUERY = err < 1e-2 and lut_rows[True]["ms"] < lut_rows[False]["ms"]
        run.extra["fused_band_query"] = kernels.FUSED_BAND_QUERY
    sel_lo = torch.empty_like(sel)
    ratio_lo = torch.tensor([args.ratio], dtype=torch.float64, device=dev)  # made outside the captured graph
    # select variants on the model-dtype table the decode step uses: one program per KV group (bisection),
    # one per query head + a union launch (bisection), the 16-way radix search per head + union
    want_lo = select_codes_reference(lut_lo, x["counts"], retrieval.tokens_to_keep(args.ratio, x["lengths"],
                                                                                   x["starts"]))
    variants = {"bisect": dict(split=False, radix=False), "split": dict(split=True, radix=False),
                "radix": dict(radix=True), "bisect16": dict(algo="bisect16"),
                "bisect16_mark": dict(algo="bisect16_mark"), "bisect16v_mark": dict(algo="bisect16v_mark")}
    sel_rows, sel_ok = {}, {}
    for name, kw in variants.items():
        if dev.type == "cuda":
            got = kernels.select_codes_triton(lut_lo, x["counts"], x["lengths"], x["starts"], ratio_lo, **kw)
            sel_ok[name] = bool(torch.equal(got.bool(), want_lo))
            fn = lambda kw=kw: kernels.select_codes_triton(lut_lo, x["counts"], x["lengths"], x["starts"],  # noqa: E731
                                                           ratio_lo, out=sel_lo, **kw)
        else:
            sel_ok[name] = True
            fn = lambda: kernels.select_codes(lut_lo, x["counts"], x["lengths"], x["starts"], ratio_lo,  # noqa: E731
                                              out=sel_lo)
        sel_rows[name] = add("select_codes", fn, B * Hkv * NB * (G * C * elt + C * 4 + C),
                             lut_dtype=str(dt).replace("torch.", ""), variant=name, equals_reference=sel_ok[name],
                             split=kw.get("split", False))
    if dev.type == "cuda":  # warps of the per-head bisection (registers hold the head's scores and counts)
        from lmsqueeze.methods.a2ats import _triton_fast

        for nw in (8, 32):
            _triton_fast.BISECT_WARPS = nw
            got = kernels.select_codes_triton(lut_lo, x["counts"], x["lengths"], x["starts"], ratio_lo,
                                              algo="bisect16_mark")
            name = f"bisect16_mark_w{nw}"
            sel_ok[name] = bool(torch.equal(got.bool(), want_lo))
            sel_rows[name] = add("select_codes", lambda: kernels.select_codes_triton(
                lut_lo, x["counts"], x["lengths"], x["starts"], ratio_lo, out=sel_lo, algo="bisect16_mark"),
                B * Hkv * NB * (G * C * elt + C * 4 + C), lut_dtype=str(dt).replace("torch.", ""), variant=name,
                equals_reference=sel_ok[name])
        _triton_fast.BISECT_WARPS = None
    timed_ok = {k: r["ms"] for k, r in sel_rows.items() if "ms" in r and sel_ok[k]}
    if dev.type == "cuda" and timed_ok:
        pick = min(timed_ok, key=timed_ok.get)
        if pick.startswith("bisect16_mark_w"):
            _triton_fast.BISECT_WARPS = int(pick.rsplit("_w", 1)[1])
            kernels.SELECT_ALGO = "bisect16_mark"
        else:
            kernels.SELECT_ALGO = pick if pick != "split" else "bisect"
        kernels.SELECT_SPLIT = pick == "split"
        run.extra["select_variant"] = pick
    run.extra["select_equals_reference"] = sel_ok
    ratio_t = torch.tensor([args.ratio], dtype=torch.float64, device=dev)
    add("select_codes", lambda: kernels.select_codes(x["lut"], x["counts"], x["lengths"], x["starts"], ratio_t,
                                                     out=sel), B * Hkv * NB * (G * C * 4 + C * 4 + C))
    newk = torch.randn(B, Hkv, 1, D, device=dev, dtype=dt)
    assign_cb, hn = x["score_cb"], 0.5 * x["score_cb"].pow(2).sum(-1)
    slot = torch.tensor([n - 1], device=dev)
    counted = torch.full((B,), n, dtype=torch.long, device=dev)

    assign_cb = assign_cb.contiguous()
    app_bytes = Hkv * C * D * 4 + Hkv * B * C * 4 * 2
    add("assign_scores", lambda: retrieval.assign_scores(newk, assign_cb, hn), Hkv * C * D * 4 + Hkv * B * C * 4)
    app_rows = {}
    for name in ("per_sequence", "per_head", "fused") if dev.type == "cuda" else ("per_sequence",):
        def assign_and_append(name=name):
            if name == "fused":
                kernels.assign_append(newk, assign_cb, hn, x["codes"], x["counts"], counted, slot, x["lengths"],
                                      x["starts"], 8, 64, bands, x["edges"], fused=True)
                return
            sc = retrieval.assign_scores(newk, assign_cb, hn)
            if dev.type == "cuda":
                kernels.code_append_triton(sc, x["codes"], x["counts"], counted, slot, x["lengths"], x["starts"], 8,
                                           x["edges"], per_head=name == "per_head")
            else:
                kernels.code_append(sc, x["codes"], x["counts"], counted, slot, x["lengths"], x["starts"], 8, 64,
                                    bands, x["edges"])
        app_rows[name] = add("assign_scores+code_append", assign_and_append,
                             app_bytes if name != "fused" else Hkv * C * D * 4, variant=name)
    if dev.type == "cuda":
        ok, codes_equal = fused_assign_check(x, assign_cb, hn, counted, B, Hkv, D, C, bands, dt, dev)
        run.extra["fused_assign_check"] = {"ok": ok, "codes_equal_argmax": codes_equal}
        timed_app = {k: r["ms"] for k, r in app_rows.items() if "ms" in r and (k != "fused" or ok)}
        if timed_app:
            pick = min(timed_app, key=timed_app.get)
            kernels.FUSED_ASSIGN = pick == "fused"
            kernels.APPEND_PER_HEAD = pick in ("fused", "per_head")
            run.extra["append_variant"] = pick
    best = None
    configs = [(128, 16, False), (64, 16, False), (64, 16, True), (64, 8, True), (32, 16, True), (32, 8, True),
               (64, 32, True), (128, 8, True)] if dev.type == "cuda" else [(64, 16, False), (64, 16, True)]
    if args.quick_kernels:  # the best setting of the earlier sweeps (a2ats_serving_h100.json, part "kernel")
        configs = [(64, 16, True)]
    for block_n, tiles, compact in configs:
        splits = kernels.default_sparse_splits(B, Hkv, n, block_n, tiles)
        row = add("sparse_decode_attention",
                  lambda bn=block_n, s=splits, c=compact: kernels.sparse_decode_attention_triton(
                      x["q"], x["k"], x["v"], x["codes"], sel, x["starts"], x["lengths"], 8, 64, 0.088, True,
                      num_splits=s, block_n=bn, compact=c, edges=x["edges"]),
                  sparse_bytes, block_n=block_n, tiles_per_program=tiles, num_splits=splits, compact=compact)
        if "ms" in row and (best is None or row["ms"] < best["ms"]):
            best = row
    if best is not None:
        kernels.SPARSE_BLOCK_N = best["block_n"]
        kernels.TILES_PER_PROGRAM = best["tiles_per_program"]
        kernels.SPARSE_COMPACT = best["compact"]
        run.extra["sparse_kernel_config"] = {k: best[k] for k in ("block_n", "tiles_per_program", "compact")}
    # pinned host store, zero-copy (smaller batch: pinned memory), and the CPU-threads path
    bh = min(B, 4)
    hk, hv = to_host(x["k"][:bh]), to_host(x["v"][:bh])
    hx = {k: x[k][:bh] for k in ("q", "codes", "starts", "lengths")}
    hsel = sel[:bh]
    far = selected_slots(hx["codes"], hsel, hx["starts"], hx["lengths"], 8, 64, False, bands)
    far_bytes = int(far.sum()) * 2 * D * elt
    hbase = dict(base, batch=bh, selected_fraction=float(far.float().mean()))
    base_saved = dict(base)
    base.clear()
    base.update(hbase)
    add("sparse_decode_attention_pinned_host", lambda: kernels.sparse_decode_attention(
        hx["q"], hk, hv, hx["codes"], hsel, hx["starts"], hx["lengths"], 8, 64, 0.088, False, return_lse=True,
        bands=bands, edges=x["edges"]),
        far_bytes, note_bytes="selected K/V rows read over PCIe")
    codes_h = hx["codes"].cpu()
    add("selected_attention_cpu_threads", lambda: selected_attention_cpu(
        hx["q"], hk, hv, codes_h, hsel, hx["starts"], hx["lengths"], 8, 64, 0.088, False, bands), far_bytes,
        graph=False,
        cpu_threads=torch.get_num_threads())
    base.clear()
    base.update(base_saved)


# 3. serving ----------------------------------------------------------------------------------------------
def host_available_bytes() -> int:
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            s = Path(p).read_text().strip()
            if s.isdigit():
                used = 0
                for q in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                    if Path(q).exists():
                        used = int(Path(q).read_text().strip())
                        break
                lim = int(s) - used
                avail = lim if avail is None else min(avail, lim)
        except OSError:
            pass
    return avail or 0


def memory_model(model, preset, n: int, system: str, method: A2ATS, gpu_total: int, host_avail: int, args) -> dict:
    """Per-sequence GPU / host bytes of the full-depth model and the largest batch that fits."""
    L = preset.num_layers
    Hkv, D = preset.num_kv_heads, preset.head_dim
    elt = 2
    cap = -(-(n + 1) // 256) * 256  # slots the states allocate (n tokens + the decode step, 256-rounded)
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    other_params = sum(p.numel() for p in model.parameters()) - layer_params * len(model.model.layers)
    weights = (other_params + L * layer_params) * elt
    C = method.codebook
    VC = C * (len(method.bands) + 1)  # virtual codes (distance band x code)
    kv = 2 * L * Hkv * cap * D * elt
    index = L * Hkv * (cap * 2 + VC * 4 + VC) + L * 8  # codes, histogram, selected codes, counters
    E = method.sinks + ring_size(method.window)
    near = 2 * L * Hkv * E * D * elt + L * E * 4
    books = L * Hkv * C * (2 * D + 1) * 4 + L * Hkv * C * D * elt  # fp32 codebooks + the lookup copy (model dtype)
    reserve = int(args.gpu_reserve_gib * GiB)
    host_budget = max(0, host_avail - int(args.host_reserve_gib * GiB))
    if system == "dense":
        gpu_seq, host_seq, fixed = kv, 0, weights + reserve
    elif system.startswith("a2ats-gpu"):
        gpu_seq, host_seq, fixed = kv + index, 0, weights + reserve + books
    else:
        gpu_seq, host_seq, fixed = index + near, kv, weights + reserve + books
    batch = (gpu_total - fixed) // gpu_seq
    if host_seq:
        batch = min(batch, host_budget // host_seq)
    batch = int(max(0, min(batch, args.max_batch)))
    return {"batch": batch, "gpu_bytes_per_seq": gpu_seq, "host_bytes_per_seq": host_seq, "gpu_fixed_bytes": fixed,
                "weights_bytes": weights, "codebook_bytes": books if system != "dense" else 0,
                "gpu_total_bytes": gpu_total, "host_budget_bytes": host_budget, "full_layers": L}


def serving(run: Run, model, preset, dev: torch.device) -> None:
    args = run.args
    L_m = model.config.num_hidden_layers
    gpu_total = torch.cuda.mem_get_info()[1] if dev.type == "cuda" else 80 * GiB
    host_avail = host_available_bytes()
    run.extra["host_available_bytes"] = host_avail
    run.extra["gpu_total_bytes"] = gpu_total
    base_method = A2ATS(ratio=args.ratio, codebook=args.codebook, bands=tuple(args.bands))
    art0 = random_artifact(base_method, model)
    systems = {"dense": None,
               "a2ats-gpu": with_settings(art0, offload=False),
               "a2ats-offload": with_settings(art0, offload=True, offload_attention="gpu"),
               "a2ats-offload-cpu": with_settings(art0, offload=True, offload_attention="cpu")}
    methods = {name: base_method for name in systems}
    extra_systems = []
    for c in args.serving_codebooks:  # a2ats-gpu at other codebook sizes, same run and baseline
        if c != args.codebook:
            name = f"a2ats-gpu@{c}"
            methods[name] = A2ATS(ratio=args.ratio, codebook=c, bands=tuple(args.bands))
            systems[name] = with_settings(random_artifact(methods[name], model), offload=False)
            extra_systems.append(name)
    cpu = "a2ats-offload-cpu"
    plan = [(n, name) for n in args.contexts for name in [*args.systems, *extra_systems] if name != cpu]
    plan += [(n, cpu) for n in args.cpu_path_contexts if cpu in args.systems]  # the slow eager path last
    dense_rows: dict[int, dict] = {}
    for n, name in plan:
        dense_row = dense_rows.get(n)
        if run.over_budget():
            run.serving.append({"method": name, "length": n, "skipped": "time budget"})
            continue
        art = systems[name]
        mm = memory_model(model, preset, n, name, methods[name], gpu_total, host_avail, args)
        B = mm["batch"]
        if name == "a2ats-offload-cpu":
            B = min(B, args.cpu_path_batch)
        row = {"method": name, "length": n, **mm, "batch": B, "measured_layers": [L_m, 1],
               "codebook": methods[name].codebook}
        if B < 1:
            row["skipped"] = "no sequence fits"
            run.serving.append(row)
            continue
        try:
            with torch.no_grad():
                cache = dense_cache(model, B, n) if art is None else fill_a2ats_cache(model, art, B, n, seed=7)
                times = {}
                with lmsqueeze.apply(model, art):
                    fn = step_fn(model, cache, B, n)
                    for layers in (L_m, 1):
                        model.config.num_hidden_layers = layers
                        graph = name != "a2ats-offload-cpu"
                        t = timed(fn, dev, args, graph)
                        times[layers] = t
                    model.config.num_hidden_layers = L_m
                    fn()
                    row["selected_fraction"] = selected_fraction(cache)
                st = cache.layers[0]
                row["measured_gpu_bytes_per_seq_per_layer"] = (
                    st.device_bytes() if hasattr(st, "device_bytes") else st.memory_bytes()) / B
                row["measured_host_bytes_per_seq_per_layer"] = (
                    st.host_bytes() if hasattr(st, "host_bytes") else 0) / B
            t_l, t_1 = times[L_m].median_ms, times[1].median_ms
            per_layer = (t_l - t_1) / (L_m - 1)
            t_full = t_1 + (mm["full_layers"] - 1) * per_layer
            row.update(ms_measured={str(L_m): t_l, "1": t_1}, graph=times[L_m].graph, ms_per_layer=per_layer,
                       ms=t_full, tokens_per_s=B / (t_full * 1e-3),
                       note=times[L_m].note or None)
            if name == "dense":
                dense_rows[n] = row
                row["floor_ms_at_3tbps"] = (mm["weights_bytes"] + B * mm["gpu_bytes_per_seq"]) / 3e12 * 1e3
            if dense_row is not None and name != "dense":
                row.update(baseline="dense", baseline_batch=dense_row["batch"], baseline_ms=dense_row["ms"],
                           baseline_tokens_per_s=dense_row["tokens_per_s"],
                           speedup=row["tokens_per_s"] / dense_row["tokens_per_s"])
            del cache
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            model.config.num_hidden_layers = L_m
        free_memory(dev)
        run.serving.append(row)
        print(f"[{run.elapsed():6.1f}s] {row}", flush=True)
        run.save()
    for n in args.contexts:
        combine(run, n)


def combine(run: Run, n: int) -> None:
    """Resident and offloaded batches served alternately (derived from the two measured rows, not measured)."""
    rows = {r["method"]: r for r in run.serving if r.get("length") == n and "ms" in r}
    if "a2ats-gpu" in rows and "a2ats-offload" in rows and "dense" in rows:
        g, o, d = rows["a2ats-gpu"], rows["a2ats-offload"], rows["dense"]
        tps = (g["batch"] + o["batch"]) / ((g["ms"] + o["ms"]) * 1e-3)
        run.serving.append({"method": "a2ats-gpu+offload (derived)", "length": n, "batch": g["batch"] + o["batch"],
                            "ms": g["ms"] + o["ms"], "tokens_per_s": tps, "speedup": tps / d["tokens_per_s"],
                            "baseline": "dense", "derived_from": ["a2ats-gpu", "a2ats-offload"]})


def print_table(run: Run) -> None:
    print("\nchecks:")
    for r in run.checks:
        print(f"  {r['method']:45s} ok={r['ok']}" + (f"  {r['error']}" if "error" in r else ""))
    print("\nkernels (one layer):")
    for r in run.kernels:
        if "ms" in r:
            name = r['method'] + (f"[{r['variant']}]" if "variant" in r else "")
            print(f"  {name:38s} B={r['batch']:3d} ms={r['ms']:.4f} floor={r['floor_ms_at_3tbps']:.4f} "
                  f"TB/s={r['tb_per_s']:.3f} sel={r['selected_fraction']:.3f}"
                  + (f" bn={r.get('block_n')} tiles={r.get('tiles_per_program')} compact={r.get('compact')}"
                     if "block_n" in r else ""))
        else:
            print(f"  {r['method']:38s} ERROR {r.get('error')}")
    print("  picked:", {k: run.extra.get(k) for k in ("select_variant", "append_variant", "fused_band_query",
                                                     "fused_assign_check", "select_equals_reference")})
    print("\nserving (full depth extrapolated from measured layer counts):")
    for r in run.serving:
        if "ms" in r:
            print(f"  N={r['length']:6d} {r['method']:28s} B={r['batch']:3d} ms={r['ms']:8.2f} "
                  f"tok/s={r['tokens_per_s']:9.1f} x_dense={r.get('speedup', 1.0):.2f} "
                  f"gpu/seq={r.get('gpu_bytes_per_seq', 0) / GiB:.3f}GiB host/seq={r.get('host_bytes_per_seq', 0) / GiB:.2f}GiB"
                  f" sel={r.get('selected_fraction')}")
        else:
            print(f"  N={r.get('length')} {r['method']:28s} {r.get('skipped') or r.get('error')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="a2ats_serving_h100.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the measured model (>= 2)")
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--systems", default="dense,a2ats-gpu,a2ats-offload,a2ats-offload-cpu")
    p.add_argument("--ratio", type=float, default=0.03)
    p.add_argument("--codebook", type=int, default=A2ATS().codebook,
                   help="codes per KV head (default: the method default); x (bands + 1) virtual codes <= 32768 for the Triton select")
    p.add_argument("--bands", type=lambda x: [int(v) for v in x.split(",") if v], default=[256, 1024, 4096])
    p.add_argument("--kernel-batch", type=int, default=14)
    p.add_argument("--cpu-path-batch", type=int, default=4)
    p.add_argument("--cpu-path-contexts", default="32768", help="contexts at which the eager CPU path runs")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--gpu-reserve-gib", type=float, default=3.0)
    p.add_argument("--host-reserve-gib", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=200.0)
    p.add_argument("--serving-codebooks", type=lambda x: [int(v) for v in x.split(",") if v], default=[],
                   help="also serve a2ats-gpu at these codebook sizes (rows a2ats-gpu@C)")
    p.add_argument("--quick-kernels", action="store_true", help="time one sparse-kernel setting, not the sweep")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU logic check)")
    p.add_argument("--skip", default="", help="parts to skip: checks,kernels,serving")
    args = p.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.systems = [s for s in args.systems.split(",") if s]
    args.cpu_path_contexts = [int(c) for c in args.cpu_path_contexts.split(",") if c]
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device(args.device)
    run = Run(args)
    preset = get_preset(args.preset)
    run.extra["preset"] = args.preset
    run.extra["method"] = A2ATS(ratio=args.ratio, codebook=args.codebook, bands=tuple(args.bands)).to_dict()
    run.extra["torch_threads"] = torch.get_num_threads()
    skip = set(args.skip.split(","))
    try:
        if "checks" not in skip:
            checks(run, dev)
            free_memory(dev)
            run.save()
        if "kernels" not in skip:
            kernel_bench(run, dev, preset)
            free_memory(dev)
            run.save()
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model = build_random_model(args.preset, dtype=dt, device=dev, num_layers=args.layers)
        if "checks" not in skip:
            preset_shape_check(run, model, dev)
            run.save()
        if "serving" not in skip:
            serving(run, model, preset, dev)
    finally:
        run.save()
        print_table(run)
        print(f"\nwrote {run.out / args.name} after {run.elapsed():.0f}s")


if __name__ == "__main__":
    main()
