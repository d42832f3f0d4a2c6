"""Why KVQuant keys lose quality on the zoo model: clipping, bias, RoPE/decode consistency (CPU, train split).

    python benchmarks/scripts/eval_kvquant_diagnose.py --out benchmarks/results/kvquant_quality_zoo_diagnosis_v2.json

All on --tokens tokens of the corpus train split after the calibration region (never the held-out text),
calibration --calib-samples x --calib-len tokens:
- clipping: per layer, the fraction of pre-RoPE key elements outside the calibrated per-channel range, the
  fraction of (token, head) vectors with more of them than the outlier slots, and the fraction actually clipped;
- bias: per layer, mean over channels of |mean(k_hat - k)| / rms(k_hat - k), and the full-sequence perplexity of
  quantized keys with that per-channel bias removed by an oracle (is bias what hurts?);
- logits at position --pos after a 256-token-chunk prefill and single-token decode steps against the unquantized
  model, for 8-bit uniform keys/values (quantile ranges with 1 slot, min/max ranges, ranges at the 0.1% quantile)
  and nuq3-1% (decode steps vs one prefill chunk: the two attention paths agree);
- outlier slots: chunked perplexity of nuq3 with 1, 2, 3 slots per vector (same ranges and datatype).
"""

from __future__ import annotations

import argparse
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
from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity
from lmsqueeze.eval.results import environment, model_info, write_json
from lmsqueeze.methods.kvquant import KVQuant, fisher
from lmsqueeze.methods.kvquant import calibrate as C
from lmsqueeze.methods.kvquant import method as M
from lmsqueeze.methods.kvquant.quantizers import KeyQuantizer, ValueQuantizer, dequantize_keys
from lmsqueeze.models.compat import cache_kw

sys.path.insert(0, str(Path(__file__).parent))
from eval_kvquant import validation_ids  # noqa: E402

log = logging.getLogger("eval_kvquant_diagnose")


def calibrate(model, batches, cfg: KVQuant, range_fraction: float | None = None):
    """Calibrate; `range_fraction` overrides the quantile that sets the key ranges (slots stay cfg.outliers)."""
    orig = C.key_ranges
    if range_fraction is not None:
        C.key_ranges = lambda keys, f: orig(keys, range_fraction)
    try:
        return cfg.calibrate(model, batches)
    finally:
        C.key_ranges = orig


def keys_of(model, ids):
    """Pre-RoPE keys of every layer: {layer: [1, Hkv, T, D]} float32."""
    L = len(model.model.layers)
    with fisher.capture(model, list(range(L)), grad=False) as store, torch.no_grad():
        model(input_ids=ids[None], use_cache=False)
        return {i: store[i].k.detach().transpose(1, 2).float().clone() for i in range(L)}


def fake_quant_nll(model, ids, fn) -> float:
    """Full-sequence mean NLL with each layer's pre-RoPE keys replaced by fn(layer, k) (token 0 kept)."""
    hooks = []
    for i, ly in enumerate(model.model.layers):
        D = ly.self_attn.head_dim

        def hook(mod, inp, out, i=i, D=D):
            x = out.reshape(*out.shape[:2], -1, D).transpose(1, 2)
            y = fn(i, x.float()).to(x.dtype)
            y[:, :, :1] = x[:, :, :1]
            return y.transpose(1, 2).reshape(out.shape)
        hooks.append(fisher.key_module(ly.self_attn).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids[None], labels=ids[None], use_cache=False).loss.item()
    finally:
        for h in hooks:
            h.remove()


def decode_logits(model, ids, art, pos: int, steps: int, one_chunk: bool) -> torch.Tensor:
    with torch.no_grad(), lmsqueeze.apply(model, art) as s:
        cache = s.new_cache()
        for st in range(0, pos, 256):
            model(input_ids=ids[None, st:min(st + 256, pos)], **cache_kw(model, cache), use_cache=True)
        if one_chunk:
            return model(input_ids=ids[None, pos:pos + steps], **cache_kw(model, cache), use_cache=True).logits[0]
        return torch.cat([model(input_ids=ids[None, t:t + 1], **cache_kw(model, cache), use_cache=True).logits[0]
                          for t in range(pos, pos + steps)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kvquant_quality_zoo_diagnosis_v2.json")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--pos", type=int, default=4000)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = lmsqueeze.load_model()
    need = 2 * args.calib_samples * args.calib_len
    ids = validation_ids(tok, args.tokens, need + 4096)
    batches = calibration_batches(tok, args.calib_samples, args.calib_len)
    res = {"kind": "kvquant.diagnosis", **environment(model.device), "model": model_info(model, "zoo:default"),
           "config": {"tokens": int(ids.numel()), "split": "train", "first_token": need + 4096, "pos": args.pos,
                      "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len}}}
    nuq3 = KVQuant(bits=3, kernel=False).calibrate(model, batches)
    keys = keys_of(model, ids)

    # clipping and bias of nuq3-1% keys
    layers, plain = [], {}
    for i, k in keys.items():
        kq, _ = nuq3.method.quantizers(nuq3, i)
        x = (k - kq.zeff[:, None]) / kq.s16.float()[:, None] * kq.codebook.grid
        out = (x.abs() > 1)[:, :, 1:]
        codes, outl, ks = kq.quantize(k)
        kd = dequantize_keys(kq, codes, outl, k.shape[-1], ks)
        plain[i] = kd
        e = (kd - k)[:, :, 1:]
        clipped = out & (e.abs() > 0.05 * (kq.upper - kq.lower)[:, None])
        bias, rms = e.mean(2), e.pow(2).mean(2).sqrt()
        layers.append({"layer": i, "outside_range_frac": out.float().mean().item(),
                       "vectors_over_slots_frac": (out.sum(-1) > kq.n_out).float().mean().item(),
                       "max_outside_per_vector": int(out.sum(-1).max()),
                       "clipped_frac": clipped.float().mean().item(),
                       "bias_over_rms_mean": (bias.abs() / rms).mean().item(),
                       "key_rel_err": (e.norm() / k[:, :, 1:].norm()).item()})
    res["nuq3_keys_by_layer"] = layers
    d = fake_quant_nll(model, ids, lambda i, k: k)
    q = fake_quant_nll(model, ids, lambda i, k: plain[i])
    qb = fake_quant_nll(model, ids, lambda i, k: plain[i] - (plain[i] - k)[:, :, 1:].mean(2, keepdim=True))
    res["bias_oracle_full_sequence_ppl_delta_pct"] = {"nuq3_keys": 100 * (math.exp(q - d) - 1),
                                                      "nuq3_keys_bias_removed": 100 * (math.exp(qb - d) - 1)}
    log.info("bias oracle: %s", res["bias_oracle_full_sequence_ppl_delta_pct"])
    write_json(args.out, res)

    # logits tracking at a long position
    with torch.no_grad():
        ref = model(input_ids=ids[None, :args.pos + 16]).logits[0, args.pos:args.pos + 16]

    def cmp(lg):
        kl = torch.nn.functional.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        return {"max_abs_logit_diff": (lg - ref).abs().max().item(), "kl_dense_to_quant": kl.item()}

    track = {}
    for name, cfg, frac in (("int8, quantile ranges at 1%, 1 slot", KVQuant(bits=8, datatype="int", kernel=False), None),
                            ("int8, min/max ranges, no slots", KVQuant(bits=8, datatype="int", outliers=0.0,
                                                                       kernel=False), None),
                            ("int8, ranges at the 0.1% quantile, 1 slot", KVQuant(bits=8, datatype="int",
                                                                                 kernel=False), 0.001)):
        track[name] = cmp(decode_logits(model, ids, calibrate(model, batches, cfg, frac), args.pos, 16, False))
        log.info("%s: %s", name, track[name])
    track["nuq3-1%, decode steps"] = cmp(decode_logits(model, ids, nuq3, args.pos, 16, False))
    track["nuq3-1%, one prefill chunk"] = cmp(decode_logits(model, ids, nuq3, args.pos, 16, True))
    res["logits_at_pos"] = track
    write_json(args.out, res)

    # outlier slots (keys and values share the slot count in the layout)
    pcfg = PerplexityConfig(context_length=args.tokens, chunk_size=256, max_tokens=args.tokens)
    dense = perplexity(model, ids, None, pcfg, progress=False).ppl
    orig = M.KVQuant.quantizers
    slots = {}
    for n in (1, 2, 3):
        def patched(self, artifact, i, n=n):
            kq, vq = orig(self, artifact, i)
            return KeyQuantizer(kq.codebook, kq.lower, kq.upper, n), ValueQuantizer(vq.codebook, n)
        M.KVQuant.quantizers = patched
        try:
            slots[str(n)] = 100 * (perplexity(model, ids, nuq3, pcfg, progress=False).ppl / dense - 1)
        finally:
            M.KVQuant.quantizers = orig
        log.info("nuq3 with %d slots: %+.2f%%", n, slots[str(n)])
    res["nuq3_ppl_delta_pct_by_slots"] = slots
    res["seconds"] = round(time.time() - t0, 1)
    write_json(args.out, res)
    print(res["nuq3_keys_by_layer"], res["bias_oracle_full_sequence_ppl_delta_pct"], track, slots, sep="\n")


if __name__ == "__main__":
    main()
