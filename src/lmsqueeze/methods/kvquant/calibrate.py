"""KVQuant calibration: per-channel key ranges and per-layer K/V datatypes from a few calibration batches.

For each chunk of `layers_per_pass` layers:
1. a forward pass collects the chunk's pre-RoPE keys (sink tokens and padding left out); each channel's
   range is [quantile(f/2), quantile(1 - f/2)] with f = `key_range_fraction` (default: the outlier fraction;
   min/max when f = 0);
2. for "nuq", a forward (+ backward of the LM loss when `fisher`) pass normalises keys with those ranges and
   values per token (outliers set aside, as at inference), and adds the inliers to one histogram per layer
   for K and V, weighted by the Fisher information times the squared scale: grad^2 * s^2 (Eq. 7 of the
   paper; the reference code leaves out s^2). Weighted 1-D k-means on the histograms gives the datatypes.
3. with `key_fit="lloyd"` (beyond the paper), the same pass also fills one histogram per key channel, and
   each channel's range (centre and half-width) is refitted to minimise that channel's Fisher-weighted
   squared error under the layer's datatype, clipping included (Lloyd iterations: nearest code, then least
   squares), alternating with refits of the datatype. The quantile range is only the starting point: it
   wastes levels on the tails that the per-vector outlier slots cannot hold anyway.
"""

from __future__ import annotations

import logging
import time

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, model_fingerprint
from lmsqueeze.methods.kvquant import fisher
from lmsqueeze.methods.kvquant.codebooks import ChannelHistogram, Histogram, fit_channel_affine, fit_codebook
from lmsqueeze.methods.kvquant.quantizers import outlier_slots, token_scale_codes, token_scales

log = logging.getLogger(__name__)

REFINE_ROUNDS = 3  # key_fit="lloyd": alternations of per-channel range fits and datatype refits


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-column q-quantile (nearest rank) of x: [N, C] -> [C] (no size limit, unlike torch.quantile)."""
    n = x.shape[0]
    k = min(n, max(1, round(q * (n - 1)) + 1))
    return x.kthvalue(k, dim=0).values


def key_ranges(keys: list[torch.Tensor], fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """keys: list of [N_i, H, D] -> per-channel (lower, upper): [H, D] float32."""
    x = torch.cat([k.float() for k in keys]).flatten(1)
    H, D = keys[0].shape[1:]
    if fraction > 0:
        lo, hi = _kth(x, fraction / 2), _kth(x, 1 - fraction / 2)
    else:
        lo, hi = x.amin(0), x.amax(0)
    hi = torch.maximum(hi, lo + 1e-6)
    return lo.reshape(H, D).cpu(), hi.reshape(H, D).cpu()


def value_normalise(v: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v: [N, H, D] -> (x normalised, inlier mask, scale per vector [N, H, 1]) as the value quantizer does."""
    v = v.float()
    if n_out > 0:
        med = v.median(dim=-1, keepdim=True).values
        idx = (v - med).abs().topk(n_out, dim=-1).indices
        inlier = torch.ones_like(v, dtype=torch.bool).scatter_(-1, idx, False)
    else:
        inlier = torch.ones_like(v, dtype=torch.bool)
    u = torch.where(inlier, v, -torch.inf).amax(-1, keepdim=True)
    lo = torch.where(inlier, v, torch.inf).amin(-1, keepdim=True)
    s = ((u - lo) / 2).clamp_min(1e-8)
    return (v - (u + lo) / 2) / s, inlier, s


def calibrate_kvquant(method, model, batches) -> Artifact:
    """Run KVQuant calibration on `model` (unpatched) and return the artifact (see the module docstring)."""
    t0 = time.time()
    layers = model.model.layers
    attn0 = layers[0].self_attn
    H, D = model.config.num_key_value_heads, attn0.head_dim
    if D % 64 != 0:
        raise LmsqueezeError(f"kvquant needs a head dim that is a multiple of 64, got {D}")
    device = next(model.parameters()).device
    data = fisher.as_batches(batches, device, method.sink_tokens)
    n_out = outlier_slots(method.outliers, D)
    fit = method.datatype == "nuq"
    refine = method.key_fit == "lloyd"
    use_qnorm = method.use_qnorm
    tensors: dict[str, torch.Tensor] = {}
    per = max(1, method.layers_per_pass)
    with fisher.frozen(model):
        for first in range(0, len(layers), per):
            chunk = list(range(first, min(first + per, len(layers))))
            keys: dict[int, list[torch.Tensor]] = {i: [] for i in chunk}
            with fisher.capture(model, chunk, grad=False) as store, torch.no_grad():
                for b in data:
                    fisher.run(model, b, grad=False)
                    for i in chunk:
                        keys[i].append(store[i].k[b.keep].detach())
            ranges = {i: key_ranges(keys[i], method.range_fraction) for i in chunk}
            del keys
            hists = {i: (Histogram(device=device), Histogram(device=device),
                         ChannelHistogram(H * D, device=device) if refine else None)
                     for i in chunk} if fit or refine else {}
            if fit or refine:
                with fisher.capture(model, chunk, grad=method.fisher) as store:
                    for b in data:
                        fisher.run(model, b, grad=method.fisher)
                        for i in chunk:
                            _add_layer(store[i], b.keep, ranges[i], hists[i], n_out, method.fisher,
                                       method.key_token_scale)
                            store[i].k = store[i].v = None
            for i in chunk:
                lo, hi = ranges[i]
                kh, vh, ch = hists.get(i, (None, None, None))
                kcb = fit_codebook(method.datatype, method.bits, kh, use_qnorm)
                vcb = fit_codebook(method.datatype, method.bits, vh, use_qnorm)
                if ch is not None:
                    lo, hi, kcb = refine_key_ranges(method, ch, lo, hi, kcb, use_qnorm)
                tensors[f"layer{i}.k_lower"] = lo
                tensors[f"layer{i}.k_upper"] = hi
                tensors[f"layer{i}.k_levels"] = kcb.levels
                tensors[f"layer{i}.k_grid"] = torch.tensor([kcb.grid])
                tensors[f"layer{i}.v_levels"] = vcb.levels
                tensors[f"layer{i}.v_grid"] = torch.tensor([vcb.grid])
            log.info("kvquant: calibrated layers %d-%d", chunk[0], chunk[-1])
    tokens = int(sum(int(b.keep.sum()) for b in data))
    meta = {"tokens": tokens, "batches": len(data), "outlier_slots_per_vector": n_out,
            "seconds": round(time.time() - t0, 2)}
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors, meta=meta)


def refine_key_ranges(method, ch: ChannelHistogram, lo: torch.Tensor, hi: torch.Tensor, kcb, use_qnorm: bool):
    """key_fit="lloyd": per-channel ranges (and, for nuq, the datatype) refitted to the channel histograms.

    ch: [H*D] histograms of keys normalised by the quantile ranges lo, hi: [H, D]; weights grad^2 (Fisher) or
    counts. Returns (lower, upper, codebook)."""
    s, z = ((hi - lo) / 2).reshape(-1).double(), ((hi + lo) / 2).reshape(-1).double()
    dev = ch.weight.device
    for _ in range(REFINE_ROUNDS if method.datatype == "nuq" else 0):
        a, b = fit_channel_affine(ch, kcb.values)
        y = (ch.centers - b[:, None]) / a[:, None]
        w = ch.weight * ((s.to(dev) * a)[:, None] ** 2 if method.fisher else 1.0)
        inl = y.abs() <= 1
        pooled = Histogram(device=dev)
        pooled.add(y[inl], w[inl], ch.count[inl])
        kcb = fit_codebook("nuq", method.bits, pooled, use_qnorm)
    a, b = fit_channel_affine(ch, kcb.values)
    a, b = a.cpu(), b.cpu()
    zc, sc = z + s * b, s * a
    shape = lo.shape
    return (zc - sc).float().reshape(shape), (zc + sc).float().reshape(shape), kcb


def _add_layer(cap: fisher.Captured, keep: torch.Tensor, rng, hists, n_out: int, weighted: bool,
               token_scale: bool = False) -> None:
    """Add one batch of one layer's normalised keys and values to its histograms (keys also divided by their
    token scales when `token_scale`, as the quantizer does; the Fisher weight then carries (s r)^2)."""
    lo, hi = (t.to(keep.device) for t in rng)
    k, v = cap.k.detach()[keep].float(), cap.v.detach()[keep].float()      # [N, H, D]
    s = (hi - lo) / 2
    xk = (k - (hi + lo) / 2) / s
    g2 = cap.k.grad[keep].float() ** 2 if weighted else torch.ones_like(k)
    if hists[2] is not None:
        hists[2].add(xk.flatten(1), g2.flatten(1))
    scale = s
    if token_scale:
        r = token_scales(token_scale_codes(xk, n_out))[..., None]          # [N, H, 1]
        xk, scale = xk / r, s * r
    wk = g2 * scale**2 if weighted else g2
    inl = xk.abs() <= 1
    hists[0].add(xk[inl], wk[inl])
    xv, inl_v, sv = value_normalise(v, n_out)
    wv = (cap.v.grad[keep].float() ** 2 * sv**2) if weighted else torch.ones_like(v)
    hists[1].add(xv[inl_v], wv[inl_v])
