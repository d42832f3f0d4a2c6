"""KVQuant quality on the default zoo model: held-out perplexity, bits per element and 8K passkey, one run.

    python benchmarks/scripts/eval_kvquant.py --out benchmarks/results/kvquant_quality_zoo.json \
        --plot benchmarks/plots/kvquant_quality_zoo.png [--device cuda] [--max-tokens 16384]

Every method runs through lmsqueeze's own harness on the same tokens in the same process:
- selection (validation, never the held-out text): for each bit width, every KVQuant candidate in CANDIDATES
  (the paper's quantile key ranges, ranges at the 2% quantile, or per-channel Lloyd-refitted ranges,
  Fisher-weighted or not) is calibrated
  on --calib-samples x --calib-len tokens of the corpus train split and scored by perplexity on --val-tokens
  later tokens of the same train split (same protocol as below); the lowest validation perplexity gives the
  "nuqB-1%" rows. Every candidate is also reported on the held-out text (rows named after the candidate);
- perplexity: `lmsqueeze.eval.perplexity` (disjoint --context-length windows of the held-out text, each
  through a fresh cache), with prefill chunks of --chunk-size tokens (each chunk attends to itself in full
  precision and to the quantized past, so a smaller chunk leaves more of the context quantized: 256 is
  stricter than the CLI's default 2048);
- bits per element: allocated bits per cached K/V element (codes and every piece of metadata) of a cache
  preallocated for one window, as each method's cache reports it, with full-precision buffers (sinks, KIVI's
  recent-token window) counted at fp16;
- passkey (dense and the selected nuq3-1%, and with --passkey-window W also nuq3-1% with an fp16 window of W
  recent tokens): `lmsqueeze eval suite --tasks passkey --lengths 8192
  --formats prose,code`, --passkey-samples prompts per format and depth (3 depths), prefilled in chunks of
  --chunk-size tokens so the needle sits in the quantized cache.
KVQuant runs its PyTorch reference attention here (kernel=False: the same function as the Triton decode
kernel, whose speed and exactness are checked by the kernel tests and benchmarks).
Baselines: uniform int3/int4 per token, KIVI-2/KIVI-4 (groups of 32, fp16 window of 128), KVQuant variants
(no outliers, 3% outliers, an fp16 window of 128), and transformers' QuantizedCache when a backend (optimum-quanto
or hqq) is installed (recorded as unavailable otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze
from lmsqueeze.data.calibration import calibration_batches
from lmsqueeze.data.corpus import read_texts, token_stream
from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity
from lmsqueeze.eval.results import environment, method_info, model_info, write_json
from lmsqueeze.eval.suite import SuiteConfig, run_suite
from lmsqueeze.eval.texts import eval_text
from lmsqueeze.methods.baselines.int_uniform import IntUniform
from lmsqueeze.methods.baselines.kivi import KIVI
from lmsqueeze.methods.kvquant import KVQuant
from lmsqueeze.models.compat import cache_kw

log = logging.getLogger("eval_kvquant")

# KVQuant candidates per bit width, chosen between on validation data (train split): name suffix -> options
CANDIDATES = {"quantile": {"key_fit": "quantile", "fisher": True},
              "quantile-nofisher": {"key_fit": "quantile", "fisher": False},
              "lloyd": {"key_fit": "lloyd", "fisher": True},
              "lloyd-nofisher": {"key_fit": "lloyd", "fisher": False},
              # key ranges at the 2% quantile: the 1% budget's outlier word holds two entries (3% of D = 64)
              "quantile-r2": {"key_fit": "quantile", "fisher": True, "key_range_fraction": 0.02},
              "quantile-nofisher-r2": {"key_fit": "quantile", "fisher": False, "key_range_fraction": 0.02},
              # beyond the paper: one scale byte per key vector (key_token_scale)
              "quantile-r2-ts": {"key_fit": "quantile", "fisher": True, "key_range_fraction": 0.02,
                                 "key_token_scale": True},
              "quantile-ts": {"key_fit": "quantile", "fisher": True, "key_token_scale": True}}
BASELINES = {"dense": None, "int3": IntUniform(bits=3), "int4": IntUniform(bits=4),
             "kivi-2": KIVI(bits=2), "kivi-4": KIVI(bits=4)}
# variants of the selected configuration (name -> changes), reported on the held-out text
# ("-all-outliers": the selected key ranges with 16 outlier entries per vector, so that every element outside
# them is kept: the quality ceiling of more outlier storage, at a cost in bits)
VARIANTS = {"nuq3-0%": (3, {"outliers": 0.0, "key_range_fraction": None}),
            "nuq3-3%": (3, {"outliers": 0.03, "key_range_fraction": None}),
            "nuq4-1%-all-outliers": (4, {"outliers": 0.25}), "nuq3-1%-all-outliers": (3, {"outliers": 0.25}),
            "nuq4-1%-w128": (4, {"window": 128}), "nuq3-1%-w128": (3, {"window": 128}),
            "nuq2-1%-w128": (2, {"window": 128})}
ORDER = ["dense", "nuq4-1%", "nuq3-1%", "nuq2-1%", "int3", "int4", "kivi-2", "kivi-4", "nuq3-0%", "nuq3-3%",
         "nuq4-1%-all-outliers", "nuq3-1%-all-outliers", "nuq4-1%-w128", "nuq3-1%-w128", "nuq2-1%-w128"]


def kvquant(bits: int, **kw) -> KVQuant:
    return KVQuant(bits=bits, outliers=kw.pop("outliers", 0.01), kernel=False, **kw)


def hf_quantized_cache_status() -> dict:
    """Which transformers QuantizedCache backends are importable here (none are dependencies of lmsqueeze)."""
    has_optimum = importlib.util.find_spec("optimum") is not None
    found = {"quanto": has_optimum and importlib.util.find_spec("optimum.quanto") is not None,
             "hqq": importlib.util.find_spec("hqq") is not None}
    return {"backends_installed": [k for k, v in found.items() if v],
            "run": False if not any(found.values()) else None,
            "note": "transformers' QuantizedCache needs optimum-quanto or hqq; neither is installed here and "
                    "lmsqueeze does not depend on them, so this baseline was not run"
            if not any(found.values()) else "a backend is installed but this script does not wire it yet"}


def bits_per_element(model, method, ids: torch.Tensor, context: int) -> float | None:
    """Allocated bits per K/V element of a cache preallocated for `context` tokens (after 320 tokens)."""
    if method is None:
        return 16.0  # an fp16 KV cache (the CPU run itself computes in fp32)
    with lmsqueeze.apply(model, method) as session, torch.inference_mode():
        cache = session.new_cache(batch_size=1, max_length=context)
        model(input_ids=ids[None, :320].to(model.device), **cache_kw(model, cache), use_cache=True)
        layers = [ly for ly in cache.layers if hasattr(ly, "bits_per_element")]
        if not layers:
            return None
        for ly in layers:  # count full-precision buffers as fp16 (this CPU run keeps them in fp32)
            _fp32_to_fp16(vars(ly))
            kv = getattr(ly, "kv", None)
            if kv is not None:
                _fp32_to_fp16(vars(kv))
        return sum(ly.bits_per_element() for ly in layers) / len(layers)


def _fp32_to_fp16(attrs: dict) -> None:
    for name, t in list(attrs.items()):
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            attrs[name] = t.half()


def key_error_diagnosis(model, tok, ids: torch.Tensor, art, tokens: int = 2048) -> list[dict]:
    """Per layer, on the first `tokens` held-out tokens: relative error of the keys, of the attention scores
    q . k and the mean total-variation distance of each query's attention distribution, for this artifact's
    per-channel (pre-RoPE) keys and for per-token uniform int3 keys (post-RoPE, as the int3 baseline)."""
    from lmsqueeze.methods.baselines.int_uniform import dequantize_uniform, quantize_uniform
    from lmsqueeze.methods.kvquant import fisher
    from lmsqueeze.methods.kvquant.quantizers import dequantize_keys
    from lmsqueeze.models.rope import apply_rope

    layers = model.model.layers
    x = ids[None, :tokens]
    qs = {}
    hooks = [ly.self_attn.q_proj.register_forward_hook(lambda mod, i, o, j=j: qs.__setitem__(j, o.detach()))
             for j, ly in enumerate(layers)]
    try:
        with fisher.capture(model, list(range(len(layers))), grad=False) as store, torch.no_grad():
            model(input_ids=x, use_cache=False)
            keys = {i: store[i].k.detach().clone() for i in range(len(layers))}  # [1, T, H, D]
    finally:
        for h in hooks:
            h.remove()
    T = x.shape[1]
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(T)[None])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rows = []
    for i, ly in enumerate(layers):
        D = ly.self_attn.head_dim
        k = keys[i][0].transpose(0, 1)[None].float()                     # [1, H, T, D] pre-RoPE
        H = k.shape[1]
        q = qs[i].reshape(1, T, -1, D).transpose(1, 2).float()           # [1, Hq, T, D] pre-RoPE
        G = q.shape[1] // H
        qr = apply_rope(q, cos, sin)
        kr = apply_rope(k, cos, sin)
        kq, _vq = art.method.quantizers(art, i)
        codes, outl, ks = kq.quantize(k)
        k_nuq = apply_rope(dequantize_keys(kq, codes, outl, D, ks), cos, sin)
        c, sc, z = quantize_uniform(kr, 3)
        k_int = dequantize_uniform(c, sc, z)
        for kd in (k_nuq, k_int):  # the first token is a full-precision sink in both caches
            kd[:, :, 0] = kr[:, :, 0]
        ref = (qr @ kr.repeat_interleave(G, 1).transpose(-1, -2)) * D**-0.5
        p_ref = ref.masked_fill(~causal, -torch.inf).softmax(-1)
        row = {"layer": i}
        for name, kd in (("nuq_per_channel", k_nuq), ("int3_per_token", k_int)):
            s = (qr @ kd.repeat_interleave(G, 1).transpose(-1, -2)) * D**-0.5
            p = s.masked_fill(~causal, -torch.inf).softmax(-1)
            row[f"{name}_key_rel_err"] = ((kd - kr)[:, :, 1:].norm() / kr[:, :, 1:].norm()).item()
            row[f"{name}_score_rel_err"] = ((s - ref)[..., causal].norm() / ref[..., causal].norm()).item()
            row[f"{name}_attention_tv"] = (0.5 * (p - p_ref).abs().sum(-1)).mean().item()
        rows.append(row)
        log.info("diagnosis layer %d: %s", i, {k: round(v, 4) for k, v in row.items() if k != "layer"})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ppl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for r in rows:
        ax.scatter(r["bits_per_element"], r["ppl_delta_pct"], s=40)
        ax.annotate(r["method"], (r["bits_per_element"], r["ppl_delta_pct"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("allocated bits per K/V element (all metadata)")
    ax.set_ylabel("perplexity change vs dense (%)")
    ax.set_title(f"held-out perplexity, {result['config']['context_length']}-token windows")
    ax = axes[1]
    names = [r["method"] for r in rows]
    ax.bar(names, [r["ppl"] for r in rows], color=["gray" if n == "dense" else "C0" for n in names])
    ax.set_ylim(min(r["ppl"] for r in rows) * 0.97, max(r["ppl"] for r in rows) * 1.02)
    ax.set_ylabel("perplexity")
    ax.tick_params(axis="x", rotation=45)
    pk = result.get("passkey", {})
    if pk:
        ax.set_title("passkey 8K: " + ", ".join(f"{k} {v['mean_accuracy']:.2f}" for k, v in pk.items()))
    where = f"{result.get('device', '?')}, {result['config'].get('dtype', 'torch.float32').replace('torch.', '')}"
    fig.suptitle(f"KVQuant on zoo:default ({result['data']['tokens']} held-out tokens, {where})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def validation_ids(tok, tokens: int, skip: int) -> torch.Tensor:
    """`tokens` tokens of the corpus train split after its first `skip` (past the calibration region)."""
    need = skip + tokens
    ids = token_stream(tok, read_texts(None, split="train", max_chars=need * 8), max_tokens=need)
    if len(ids) < need:
        raise SystemExit(f"the train split gave {len(ids)} tokens, fewer than {need}")
    return torch.tensor(ids[skip:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kvquant_quality_zoo.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks/plots/kvquant_quality_zoo.png")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context-length", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--val-tokens", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=8192)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--passkey-samples", type=int, default=9, help="prompts per format and depth (0: skip)")
    ap.add_argument("--passkey-length", type=int, default=8192)
    ap.add_argument("--passkey-window", type=int, default=0,
                    help="also run the passkey for nuq3-1%% with an fp16 window of this many recent tokens")
    ap.add_argument("--diagnose", default=None, help="a calibrated method name: per-layer key / score / attention "
                    "errors of its keys against per-token int3 keys (written as 'diagnosis')")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="combine these result files (shards of one configuration run in parallel) into --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: past this, the extra rows (unselected candidates, variants) are skipped")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.plot)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = lmsqueeze.load_model(device=args.device)
    text, dinfo = eval_text(None, max_chars=args.max_tokens * 8)
    ids = torch.tensor(token_stream(tok, [text], max_tokens=args.max_tokens))
    calib_need = 2 * args.calib_samples * args.calib_len  # calibration_batches cuts from this many tokens
    val = validation_ids(tok, args.val_tokens, calib_need + 4096)
    pcfg = PerplexityConfig(context_length=args.context_length, chunk_size=args.chunk_size,
                            max_tokens=args.max_tokens)
    vcfg = PerplexityConfig(context_length=min(args.context_length, args.val_tokens), chunk_size=args.chunk_size,
                            max_tokens=args.val_tokens)
    bits_list = [int(b) for b in args.bits.split(",") if b]
    cands = [c for c in args.candidates.split(",") if c]
    result = {"kind": "kvquant.quality", **environment(model.device), "model": model_info(model, "zoo:default"),
              "data": {**dinfo, "tokens": int(ids.numel()), "split": "held-out"},
              "config": {"context_length": args.context_length, "chunk_size": args.chunk_size,
                         "max_tokens": args.max_tokens, "device": str(model.device), "dtype": str(model.dtype),
                         "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len, "split": "train"},
                         "validation": {"tokens": int(val.numel()), "split": "train",
                                        "first_token": calib_need + 4096,
                                        "rule": "per bit width, the candidate with the lowest validation ppl"}},
              "hf_quantized_cache": hf_quantized_cache_status(), "rows": [], "selection": {}}
    batches = calibration_batches(tok, args.calib_samples, args.calib_len)
    batches = [b.to(model.device) for b in batches]
    arts: dict[str, object] = {}

    def calibrated(name: str, cfg: KVQuant) -> object:
        if name not in arts:
            t = time.time()
            arts[name] = cfg.calibrate(model, batches)
            arts[name].meta["wall_seconds"] = round(time.time() - t, 1)
            log.info("calibrated %s in %.1f s", name, time.time() - t)
        return arts[name]

    # 1. selection on validation data (train split)
    dense_val = perplexity(model, val, None, vcfg, progress=False).ppl
    chosen: dict[int, str] = {}
    for bits in bits_list:
        scores = {}
        for c in cands:
            name = f"nuq{bits}-1%[{c}]"
            art = calibrated(name, kvquant(bits, **CANDIDATES[c]))
            scores[c] = perplexity(model, val, art, vcfg, progress=False).ppl
            log.info("validation %s: ppl %.4f (%+.2f%%)", name, scores[c], 100 * (scores[c] / dense_val - 1))
        chosen[bits] = min(scores, key=scores.get)
        result["selection"][f"nuq{bits}-1%"] = {
            "chosen": chosen[bits], "dense_val_ppl": dense_val,
            "val_ppl": scores, "val_delta_pct": {c: 100 * (v / dense_val - 1) for c, v in scores.items()}}
        write_json(args.out, result)

    # 2. held-out perplexity: dense and baselines, the selected rows, every candidate, variants
    def evaluate(name: str, meth, config) -> None:
        row = {"method": name, "config": method_info(config)}
        if hasattr(meth, "meta"):
            row["calibration_seconds"] = meth.meta.get("wall_seconds")
        t = time.time()
        res = perplexity(model, ids, meth, pcfg, progress=False)
        row.update(ppl=res.ppl, nll=res.nll, tokens=res.tokens, windows=res.windows,
                   ppl_seconds=round(time.time() - t, 1),
                   bits_per_element=bits_per_element(model, meth, ids, args.context_length))
        log.info("%s: ppl %.4f, %.2f bits/element", name, res.ppl, row["bits_per_element"] or math.nan)
        result["rows"].append(row)
        write_json(args.out, result)

    base = [n for n in args.baselines.split(",") if n]
    for name in ["dense"] if "dense" in base else []:
        evaluate(name, None, None)
    for bits in bits_list:
        cfg = kvquant(bits, **CANDIDATES[chosen[bits]])
        evaluate(f"nuq{bits}-1%", arts[f"nuq{bits}-1%[{chosen[bits]}]"], cfg)
    for name in [n for n in base if n != "dense"]:
        evaluate(name, BASELINES[name], BASELINES[name])

    # 3. passkey at 8K: dense vs the selected nuq3-1%
    if args.passkey_samples > 0 and 3 in chosen:
        scfg = SuiteConfig(tasks=("passkey",), lengths=(args.passkey_length,), depths=(0.1, 0.5, 0.9),
                           samples=args.passkey_samples, formats=("prose", "code"), chunk_size=args.chunk_size)
        haystack, _ = eval_text(None, max_chars=8 * args.passkey_length + 200_000)
        result["passkey_config"] = scfg.to_dict()
        result["passkey"] = {}
        runs = [("dense", None), ("nuq3-1%", arts[f"nuq3-1%[{chosen[3]}]"])]
        if args.passkey_window:  # the same calibration, with an fp16 window of recent tokens in the cache
            art = runs[1][1]
            runs.append((f"nuq3-1%-w{args.passkey_window}", type(art)(
                method=kvquant(3, **{**CANDIDATES[chosen[3]], "window": args.passkey_window}),
                fingerprint=art.fingerprint, tensors=art.tensors, meta=art.meta)))
        for name, meth in runs:
            t = time.time()
            summary, _records = run_suite(model, tok, haystack, meth, scfg, progress=False)
            summary["seconds"] = round(time.time() - t, 1)
            result["passkey"][name] = summary
            log.info("passkey %s: %s", name, summary["mean_accuracy"])
            write_json(args.out, result)

    # 4. every candidate that was not selected, then variants of the selected configuration
    def out_of_time(name: str) -> bool:
        if args.time_budget is not None and time.time() - t0 > args.time_budget:
            result.setdefault("skipped_for_time", []).append(name)
            return True
        return False

    for bits in bits_list:
        for c in cands:
            if c != chosen[bits] and not out_of_time(f"nuq{bits}-1%[{c}]"):
                evaluate(f"nuq{bits}-1%[{c}]", arts[f"nuq{bits}-1%[{c}]"], kvquant(bits, **CANDIDATES[c]))
    for name in [n for n in args.variants.split(",") if n]:
        bits, change = VARIANTS[name]
        if bits not in chosen or out_of_time(name):
            continue
        opts = {"key_range_fraction": 0.01, **CANDIDATES[chosen[bits]], **change}  # ranges stay the chosen ones
        if set(change) <= {"window"}:  # the window changes the cache, not the calibration
            art = arts[f"nuq{bits}-1%[{chosen[bits]}]"]
            art = type(art)(method=kvquant(bits, **opts), fingerprint=art.fingerprint, tensors=art.tensors,
                            meta=art.meta)
        else:
            art = calibrated(name, kvquant(bits, **opts))
        evaluate(name, art, kvquant(bits, **opts))
    if args.diagnose:
        result["diagnosis"] = {"method": args.diagnose,
                               "layers": key_error_diagnosis(model, tok, ids.to(model.device), arts[args.diagnose])}
        write_json(args.out, result)
    result["seconds"] = round(time.time() - t0, 1)
    finish(result, args.out, args.plot)


def finish(result: dict, out: Path, plot_path: Path) -> None:
    """Deltas against the dense row, acceptance, JSON, plot and a table."""
    dense = next((r for r in result["rows"] if r["method"] == "dense"), None)
    for r in result["rows"]:
        if dense is not None:
            r["ppl_delta_pct"] = 100 * (r["ppl"] / dense["ppl"] - 1)
    result["acceptance"] = acceptance(result)
    write_json(out, result)
    if dense is not None:
        plot(result, plot_path)
    print(f"\n{'method':28s} {'ppl':>9s} {'delta%':>8s} {'bits':>6s}")
    for r in result["rows"]:
        print(f"{r['method']:28s} {r['ppl']:9.4f} {r.get('ppl_delta_pct', math.nan):+8.2f} "
              f"{r['bits_per_element'] or math.nan:6.2f}")
    for k, v in result.get("passkey", {}).items():
        print(f"passkey 8K {k}: {v['mean_accuracy']:.3f} ({v['by_format']})")
    print(json.dumps(result["acceptance"], indent=1))


def merge(files: list[Path], out: Path, plot_path: Path) -> None:
    """One result from shards of the same configuration (same model, data and config; rows concatenated)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    base = dict(parts[0])
    for p in parts[1:]:
        if p["config"] != base["config"] or p["data"] != base["data"] or p["model"] != base["model"]:
            raise SystemExit(f"cannot merge {files}: different model, data or config")
    base["rows"] = sorted([r for p in parts for r in p["rows"]],
                          key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
    base["passkey"] = {k: v for p in parts for k, v in p.get("passkey", {}).items()}
    base["passkey_config"] = next((p["passkey_config"] for p in parts if "passkey_config" in p), None)
    base["shards"] = [{"command": p["command"], "git_commit": p["git_commit"], "date": p["date"],
                       "seconds": p.get("seconds")} for p in parts]
    base["command"] = " ".join(["python", "benchmarks/scripts/eval_kvquant.py", *sys.argv[1:]])
    finish(base, out, plot_path)

def acceptance(result: dict) -> dict:
    """The issue's quality targets, evaluated on this run's rows (None where a row is missing)."""
    rows = {r["method"]: r for r in result["rows"]}

    def delta(name):
        return rows[name].get("ppl_delta_pct") if name in rows else None

    out = {"nuq4_within_0.5pct": None if delta("nuq4-1%") is None else delta("nuq4-1%") <= 0.5,
           "nuq3_within_1.5pct": None if delta("nuq3-1%") is None else delta("nuq3-1%") <= 1.5}
    for mine in ("nuq3-1%", "nuq3-0%"):  # nuq3-0%: the same datatype without outlier slots (fewer bits)
        if mine not in rows:
            continue
        n3 = rows[mine]
        cmp = {}
        for other in ("int3", "int4", "kivi-2", "kivi-4"):
            if other in rows:
                o = rows[other]
                cmp[other] = {"nuq3_ppl_lower": n3["ppl"] < o["ppl"],
                              "nuq3_bits_le": n3["bits_per_element"] <= o["bits_per_element"]}
        out["nuq3_vs_baselines" if mine == "nuq3-1%" else "nuq3_0pct_vs_baselines"] = cmp
    pk = result.get("passkey", {})
    if "dense" in pk and "nuq3-1%" in pk:
        out["passkey_8k_unchanged"] = pk["nuq3-1%"]["mean_accuracy"] >= pk["dense"]["mean_accuracy"]
    return out


if __name__ == "__main__":
    main()
