"""Where KVQuant's key error comes from on the zoo model: simulated ("fake") quantization of the pre-RoPE keys only.

    python benchmarks/scripts/kvquant_key_ablation.py --out benchmarks/results/kvquant_key_ablation_cpu.json

Every k_proj output (all tokens but the first, which stays full precision as the sink) is replaced by its
quantized value, so every query reads quantized keys (stricter than the cache path, where a prefill chunk
reads its own keys in full precision); values stay full precision. Held-out perplexity over --windows windows of
--context tokens. Variants: per-channel ranges at a quantile (calibration: --calib-samples x 2048 train tokens),
1-D k-means codebooks per layer / per head / per channel (unweighted), sparse outliers per vector (the largest
excursions outside the range, kept exactly) capped at 1 or 2 or unlimited, and per-token uniform keys.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze
from lmsqueeze.bench.results import command_line, write_result
from lmsqueeze.data.calibration import calibration_batches
from lmsqueeze.data.corpus import token_stream
from lmsqueeze.eval.texts import eval_text


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """Sorted k centroids of the values x (any shape), initialised at quantiles; at most 2M samples."""
    x = x.flatten()
    if x.numel() > 2_000_000:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    c = torch.quantile(x, torch.linspace(0.5 / k, 1 - 0.5 / k, k))
    for _ in range(iters):
        a = (x[:, None] - c[None]).abs().argmin(1)
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean()
    return c.sort().values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kvquant_key_ablation_cpu.json"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = lmsqueeze.load_model(device="cpu", dtype=torch.float32)
    model.eval()
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    D = model.model.layers[0].self_attn.head_dim
    text, _ = eval_text(None, max_chars=args.windows * args.context * 8)
    ids = torch.tensor(token_stream(tok, [text], max_tokens=args.windows * args.context))
    wins = [ids[i:i + args.context] for i in range(0, ids.numel() - args.context + 1, args.context)]
    state: dict = {"collect": True, "fn": None}
    keys: dict[int, list[torch.Tensor]] = {i: [] for i in range(L)}

    def hook(i):
        def run(_mod, _inp, out):
            if state["collect"]:
                keys[i].append(out.detach().reshape(-1, H, D)[1:])
                return out
            if state["fn"] is None:
                return out
            x = out.reshape(*out.shape[:-1], H, D)
            xq = state["fn"](x, i)
            xq[:, :1] = x[:, :1]
            return xq.reshape(out.shape)
        return run

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(hook(i))
    with torch.no_grad():
        for b in calibration_batches(tok, args.calib_samples, 2048):
            model(b)
    state["collect"] = False
    K = {i: torch.cat(keys[i]) for i in range(L)}  # [N, H, D]

    @functools.cache
    def ranges(i: int, frac: float):
        x = K[i].flatten(1)
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(i))[:200_000]]
        return torch.quantile(x, frac / 2, 0).reshape(H, D), torch.quantile(x, 1 - frac / 2, 0).reshape(H, D)

    @functools.cache
    def codebooks(i: int, bits: int, frac: float, group: str) -> torch.Tensor:
        lo, hi = ranges(i, frac)
        x = (K[i] - (hi + lo) / 2) / ((hi - lo) / 2)
        out = torch.empty(H, D, 2**bits)
        if group == "layer":
            out[:] = kmeans_1d(x[x.abs() <= 1], 2**bits)
        for h in range(H) if group != "layer" else []:
            if group == "head":
                out[h] = kmeans_1d(x[:, h][x[:, h].abs() <= 1], 2**bits)
            else:
                for d in range(D):
                    xc = x[:, h, d]
                    out[h, d] = kmeans_1d(xc[xc.abs() <= 1], 2**bits, iters=15)
        return out

    def per_channel(bits: int, frac: float, slots: int | None, group: str):
        def fn(x, i):
            lo, hi = ranges(i, frac)
            z, s = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-6)
            xn = (x - z) / s
            c = codebooks(i, bits, frac, group)
            xc = xn.clamp(-1, 1)
            q = c.expand(*xc.shape, -1).gather(-1, (xc[..., None] - c).abs().argmin(-1, keepdim=True))[..., 0]
            if slots is None:
                keep = xn.abs() > 1
            else:
                mag, idx = xn.abs().topk(slots, -1)
                keep = torch.zeros_like(xn, dtype=torch.bool).scatter_(-1, idx, mag > 1)
            return torch.where(keep, xn, q) * s + z
        return fn

    def per_token(bits: int):
        def fn(x, _i):
            u, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
            z, s = (u + lo) / 2, ((u - lo) / 2).clamp_min(1e-6)
            c = torch.linspace(-1, 1, 2**bits)
            return c[((x - z) / s)[..., None].sub(c).abs().argmin(-1)] * s + z
        return fn

    def ppl(fn) -> float:
        state["fn"] = fn
        nll, n = 0.0, 0
        with torch.no_grad():
            for w in wins:
                lp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
                nll -= float(lp.gather(-1, w[1:, None]).sum())
                n += w.numel() - 1
        return math.exp(nll / n)

    variants = {}
    for bits in (4, 3):
        for slots, name in ((1, "1 outlier"), (2, "2 outliers"), (None, "all outliers")):
            variants[f"nuq{bits} per-channel, 2% ranges, layer codebook, {name}"] = per_channel(
                bits, 0.02, slots, "layer")
        variants[f"nuq{bits} per-channel, 1% ranges, layer codebook, 2 outliers"] = per_channel(bits, 0.01, 2, "layer")
        for group in ("head", "channel"):
            variants[f"nuq{bits} per-channel, 2% ranges, {group} codebooks, 2 outliers"] = per_channel(
                bits, 0.02, 2, group)
        variants[f"int{bits} per-token (min/max, no outliers)"] = per_token(bits)
    dense = ppl(None)
    rows = [{"method": "dense", "ppl": dense, "ppl_delta_pct": 0.0}]
    print(f"dense {dense:.4f}", flush=True)
    for name, fn in variants.items():
        p = ppl(fn)
        rows.append({"method": name, "ppl": p, "ppl_delta_pct": 100 * (p / dense - 1)})
        print(f"{name:64s} {p:.4f} {100 * (p / dense - 1):+.2f}%", flush=True)
    extra = {"model": "zoo:default", "keys_only": True, "regime": "fake quantization of every k_proj output",
             "windows": len(wins), "context": args.context, "calibration_tokens": int(sum(k.shape[0] for k in K.values()) // L),
             "seconds": round(time.time() - t0, 1)}
    print(f"wrote {write_result(args.out, 'kvquant.key_ablation', command_line(), rows, extra, 'cpu')}")


if __name__ == "__main__":
    main()
