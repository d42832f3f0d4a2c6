"""KVQuant quality on the default zoo model: held-out perplexity, bits per element and 8K passkey, one run.

    python benchmarks/scripts/eval_kvquant.py --out benchmarks/results/kvquant_quality_zoo.json \
        --plot benchmarks/plots/kvquant_quality_zoo.png [--max-tokens 16384] [--chunk-size 256]

Every method runs through lmsqueeze's own harness on the same tokens in the same process:
- perplexity: `lmsqueeze.eval.perplexity` (the protocol of `lmsqueeze eval ppl --context-length 8192`: disjoint
  8192-token windows of the held-out text, each through a fresh cache), with prefill chunks of --chunk-size
  tokens (each chunk attends to itself in full precision and to the quantized past, so a smaller chunk leaves
  more of the context quantized: 256 is stricter than the CLI's default 2048);
- bits per element: allocated bits per cached K/V element (codes and every piece of metadata) of a cache
  preallocated for one window, as each method's cache reports it, with full-precision buffers (sinks, KIVI's
  recent-token window) counted at fp16 as on a GPU (this CPU run keeps them in fp32);
- passkey (dense and nuq3-1% only): `lmsqueeze eval suite --tasks passkey --lengths 8192 --formats prose,code`.
Methods: dense (the model's own precision: fp32 on the CPU), KVQuant nuq4/nuq3/nuq2 with 1% outliers (Fisher-
weighted, calibrated on --calib-samples x --calib-len tokens of the training corpus), nuq3 without outliers and
with 3% outliers, nuq4/3/2-1% with an fp16 window of the 128 most recent tokens (as KIVI keeps),
uniform int3 per token, KIVI-2 and KIVI-4 (groups of 32, fp16 window of 128), and transformers'
QuantizedCache when a backend (optimum-quanto or hqq) is installed (recorded as unavailable otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze
from lmsqueeze.data.calibration import calibration_batches
from lmsqueeze.data.corpus import token_stream
from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity
from lmsqueeze.eval.results import environment, method_info, model_info, write_json
from lmsqueeze.eval.suite import SuiteConfig, run_suite
from lmsqueeze.eval.texts import eval_text
from lmsqueeze.methods.baselines.int_uniform import IntUniform
from lmsqueeze.methods.baselines.kivi import KIVI
from lmsqueeze.methods.kvquant import KVQuant

log = logging.getLogger("eval_kvquant")

METHODS = {  # name -> (config, calibrated)
    "dense": (None, False),
    "nuq4-1%": (KVQuant(bits=4, outliers=0.01), True),
    "nuq3-1%": (KVQuant(bits=3, outliers=0.01), True),
    "nuq2-1%": (KVQuant(bits=2, outliers=0.01), True),
    "nuq3-0%": (KVQuant(bits=3, outliers=0.0), True),
    "nuq3-3%": (KVQuant(bits=3, outliers=0.03), True),
    "nuq4-1%-w128": (KVQuant(bits=4, outliers=0.01, window=128), True),  # + fp16 window of 128 recent tokens,
    "nuq3-1%-w128": (KVQuant(bits=3, outliers=0.01, window=128), True),  # like KIVI's residual
    "nuq2-1%-w128": (KVQuant(bits=2, outliers=0.01, window=128), True),
    "nuq3-1%-nofisher": (KVQuant(bits=3, outliers=0.01, fisher=False), True),  # ablations of the nuq3 miss
    "nuq3-1%-sink8": (KVQuant(bits=3, outliers=0.01, sink_tokens=8), True),
    "int3": (IntUniform(bits=3), False),
    "kivi-2": (KIVI(bits=2), False),
    "kivi-4": (KIVI(bits=4), False),
}


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
        model(input_ids=ids[None, :320], past_key_values=cache, use_cache=True)
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
        codes, outl = kq.quantize(k)
        k_nuq = apply_rope(dequantize_keys(kq, codes, outl, D), cos, sin)
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
    fig.suptitle(f"KVQuant on zoo:default ({result['data']['tokens']} held-out tokens, CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kvquant_quality_zoo.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks/plots/kvquant_quality_zoo.png")
    ap.add_argument("--context-length", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--passkey-samples", type=int, default=1, help="prompts per format and depth (0: skip)")
    ap.add_argument("--passkey-methods", default="dense,nuq3-1%")
    ap.add_argument("--diagnose", default=None, help="a calibrated method name: per-layer key / score / attention "
                    "errors of its keys against per-token int3 keys (written as 'diagnosis')")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="combine these result files (shards of one configuration run in parallel) into --out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.plot)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = lmsqueeze.load_model()
    text, dinfo = eval_text(None, max_chars=args.max_tokens * 8)
    ids = torch.tensor(token_stream(tok, [text], max_tokens=args.max_tokens))
    pcfg = PerplexityConfig(context_length=args.context_length, chunk_size=args.chunk_size,
                            max_tokens=args.max_tokens)
    result = {"kind": "kvquant.quality", **environment(model.device), "model": model_info(model, "zoo:default"),
              "data": {**dinfo, "tokens": int(ids.numel()), "split": "held-out"},
              "config": {"context_length": args.context_length, "chunk_size": args.chunk_size,
                         "max_tokens": args.max_tokens, "calibration": {
                             "samples": args.calib_samples, "seq_len": args.calib_len, "split": "train"}},
              "hf_quantized_cache": hf_quantized_cache_status(), "rows": []}
    names = [n for n in args.methods.split(",") if n]
    batches = calibration_batches(tok, args.calib_samples, args.calib_len)
    methods, calib_s = {}, {}

    def prepared(name):
        if name not in methods:
            cfg, calibrated = METHODS[name]
            t = time.time()
            methods[name] = cfg.calibrate(model, batches) if calibrated else cfg
            if calibrated:
                calib_s[name] = round(time.time() - t, 1)
        return methods[name]

    for name in names:
        meth = prepared(name)
        row = {"method": name, "config": method_info(METHODS[name][0])}
        if name in calib_s:
            row["calibration_seconds"] = calib_s[name]
        t = time.time()
        res = perplexity(model, ids, meth, pcfg, progress=False)
        row.update(ppl=res.ppl, nll=res.nll, tokens=res.tokens, windows=res.windows,
                   ppl_seconds=round(time.time() - t, 1),
                   bits_per_element=bits_per_element(model, meth, ids, args.context_length))
        log.info("%s: ppl %.4f, %.2f bits/element", name, res.ppl, row["bits_per_element"] or math.nan)
        result["rows"].append(row)
        write_json(args.out, result)
    if args.diagnose:
        result["diagnosis"] = {"method": args.diagnose,
                               "layers": key_error_diagnosis(model, tok, ids, prepared(args.diagnose))}
        write_json(args.out, result)
    if args.passkey_samples > 0:
        scfg = SuiteConfig(tasks=("passkey",), lengths=(8192,), depths=(0.1, 0.5, 0.9),
                           samples=args.passkey_samples, formats=("prose", "code"))
        haystack, _ = eval_text(None, max_chars=8 * 8192 + 200_000)
        result["passkey_config"] = scfg.to_dict()
        result["passkey"] = {}
        for name in [n for n in args.passkey_methods.split(",") if n]:
            t = time.time()
            summary, _records = run_suite(model, tok, haystack, prepared(name), scfg, progress=False)
            summary["seconds"] = round(time.time() - t, 1)
            result["passkey"][name] = summary
            log.info("passkey %s: %s", name, summary["mean_accuracy"])
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
    print(f"\n{'method':10s} {'ppl':>9s} {'delta%':>8s} {'bits':>6s}")
    for r in result["rows"]:
        print(f"{r['method']:10s} {r['ppl']:9.4f} {r.get('ppl_delta_pct', math.nan):+8.2f} "
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
    order = list(METHODS)
    base["rows"] = sorted([r for p in parts for r in p["rows"]], key=lambda r: order.index(r["method"]))
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
    if "nuq3-1%" in rows:
        n3 = rows["nuq3-1%"]
        cmp = {}
        for other in ("int3", "kivi-2", "kivi-4"):
            if other in rows:
                o = rows[other]
                cmp[other] = {"nuq3_ppl_lower": n3["ppl"] < o["ppl"],
                              "nuq3_bits_le": n3["bits_per_element"] <= o["bits_per_element"]}
        out["nuq3_vs_baselines"] = cmp
    pk = result.get("passkey", {})
    if "dense" in pk and "nuq3-1%" in pk:
        out["passkey_8k_unchanged"] = pk["nuq3-1%"]["mean_accuracy"] >= pk["dense"]["mean_accuracy"]
    return out


if __name__ == "__main__":
    main()
