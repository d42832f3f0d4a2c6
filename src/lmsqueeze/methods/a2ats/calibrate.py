"""A²ATS calibration: collect keys and (window-rotated) queries, then fit one codebook per layer and KV head.

Keys: pre-RoPE with windowed RoPE (post-RoPE for the no-windowed-RoPE ablation). Queries: rotated as if at
each distance band's distance, pooled (post-RoPE for the ablation); only their second moment H = E[qᵀq] per
KV group is kept. Then
per layer: L = chol(H) (identity for plain VQ), K-means of the keys in L-space (vq.py), and the three
tensors the decode step needs (state.Codebooks).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.a2ats import vq
from lmsqueeze.methods.a2ats.windowed_rope import band_distances, distance_tables, wrope_query
from lmsqueeze.methods.base import Artifact, model_fingerprint
from lmsqueeze.methods.cache import SqueezeCache, Step
from lmsqueeze.methods.dense import DenseState
from lmsqueeze.models.compat import cache_kw
from lmsqueeze.models.rope import apply_rope

log = logging.getLogger(__name__)


def as_batches(batches) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Calibration batches -> [(input_ids [B, T], attention_mask [B, T] | None)].

    Accepts a tensor of token ids ([T] or [B, T]), a dict with `input_ids` (and `attention_mask`), or a list
    of those.
    """
    if batches is None:
        raise LmsqueezeError("a2ats calibration needs batches of token ids, e.g. [torch.tensor([[1, 2, 3]])]")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    out = []
    for b in batches:
        mask = None
        if isinstance(b, Mapping):
            if "input_ids" not in b:
                raise LmsqueezeError("a calibration batch given as a dict needs an 'input_ids' entry")
            ids, mask = torch.as_tensor(b["input_ids"]), b.get("attention_mask")
        else:
            ids = torch.as_tensor(b)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise LmsqueezeError(f"calibration batches must be integer token ids [B, T], got {tuple(ids.shape)} "
                                 f"{ids.dtype}")
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(ids.shape).bool()
        out.append((ids, mask))
    if not out:
        raise LmsqueezeError("a2ats calibration got no batches; pass at least one batch of token ids")
    return out


class _Collector:
    """Keys [N, Hkv, D] (host, model dtype) and query second moments [Hkv, D, D] (float64) per layer."""

    def __init__(self, windowed: bool, distances: tuple[int, ...]) -> None:
        self.windowed, self.distances = windowed, distances
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.qq: dict[int, torch.Tensor] = {}
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor, step: Step) -> None:
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        if self.windowed:
            if self.tables is None:
                self.tables = [distance_tables(step.rotary, d, torch.float32, q.device) for d in self.distances]
            qss, ks = [wrope_query(q.float(), *t) for t in self.tables], k
        else:
            qss, ks = [apply_rope(q, step.cos, step.sin).float()], apply_rope(k, step.cos, step.sin)
        keep = torch.ones(B, T, dtype=torch.bool, device=q.device) if step.valid is None else step.valid
        kk = ks.permute(0, 2, 1, 3)[keep]  # [N, Hkv, D]
        h = 0
        for qs in qss:
            qk = qs.permute(0, 2, 1, 3)[keep].reshape(-1, Hkv, Hq // Hkv, D)  # [N, Hkv, G, D]
            x = qk.permute(1, 0, 2, 3).reshape(Hkv, -1, D)
            h = h + torch.bmm(x.transpose(1, 2), x).double()
        self.qq[layer] = self.qq[layer] + h if layer in self.qq else h
        self.keys.setdefault(layer, []).append(kk.detach().to("cpu"))


class _CollectState(DenseState):
    """Dense attention that also hands each layer's q/k to the collector."""

    def __init__(self, collector: _Collector, layer: int) -> None:
        super().__init__()
        self.collector, self.layer = collector, layer

    def attend(self, q, k, v, step):
        self.collector.record(self.layer, q, k, step)
        return super().attend(q, k, v, step)


@torch.no_grad()
def collect(model, batches, windowed: bool, distances: tuple[int, ...], chunk: int = 2048) -> _Collector:
    """Run the calibration batches through the model (dense attention, chunked prefill) and collect; the
    queries' second moment pools the rotations to every band distance."""
    from lmsqueeze.session import apply

    collector = _Collector(windowed, tuple(distances))
    num_layers = len(model.model.layers)
    device = next(model.parameters()).device
    with apply(model, None):
        for ids, mask in as_batches(batches):
            cache = SqueezeCache(lambda i: _CollectState(collector, i), num_layers)
            ids = ids.to(device)
            if mask is not None:  # padded batches go in one forward (positions follow the mask)
                m = mask.to(device).long()
                pos = (m.cumsum(-1) - 1).clamp_min(0)
                model(input_ids=ids, attention_mask=m, position_ids=pos, **cache_kw(model, cache), use_cache=True)
                continue
            for a in range(0, ids.shape[1], chunk):
                model(input_ids=ids[:, a:a + chunk], **cache_kw(model, cache), use_cache=True)
    return collector


def fit_layer(keys: torch.Tensor, qq: torch.Tensor | None, codebook: int, iters: int, tol: float, seed: int,
              device: torch.device, shrink: float = 0.0) -> tuple[dict[str, torch.Tensor], float]:
    """Codebooks of one layer. keys: [N, Hkv, D]; qq: [Hkv, D, D] query second moment or None (plain VQ);
    shrink: blend of the query metric with the identity (`vq.shrink_metric`).

    Returns tensors (assign, score: [Hkv, C, D], half_norms: [Hkv, C], chol: [Hkv, D, D], all float32 on
    the CPU) and the mean relative quantization error in L-space.
    """
    x = keys.to(device, torch.float32).permute(1, 0, 2).contiguous()  # [Hkv, N, D]
    Hkv, _, D = x.shape
    if qq is None:
        L = torch.eye(D, device=device).expand(Hkv, D, D).contiguous()
    else:
        L = vq.cholesky_factor(vq.shrink_metric(qq.to(device), shrink) if shrink > 0 else qq.to(device))
    xl = torch.bmm(x, L)
    centroids = vq.kmeans(xl, codebook, iters=iters, tol=tol, seed=seed)  # [Hkv, C, D] in L-space
    codes = vq.assign(xl, centroids)
    err = (xl - centroids.gather(1, codes[..., None].expand(-1, -1, D))).pow(2).sum(-1)
    rel = float((err.sum() / xl.pow(2).sum().clamp_min(1e-30)).item())
    assign_cb = torch.bmm(centroids, L.transpose(1, 2))  # a_c = L c: k·a_c = (kL)·c
    score_cb = torch.linalg.solve_triangular(L, centroids, upper=False, left=False)  # ĉ L = c
    tensors = {"assign": assign_cb, "score": score_cb, "half_norms": vq.half_sq_norms(centroids), "chol": L}
    return {k: v.float().cpu().contiguous() for k, v in tensors.items()}, rel


def calibrate_a2ats(method, model, batches) -> Artifact:
    """Fit the codebooks of `method` (an A2ATS config) on `batches`; returns the artifact."""
    distances = band_distances(method.window, method.bands, method.distance)
    collector = collect(model, batches, method.windowed_rope, distances, method.calib_chunk)
    num_layers = len(model.model.layers)
    if len(collector.keys) != num_layers:
        raise LmsqueezeError("calibration saw no attention layers; is this a supported model?")
    device = next(model.parameters()).device if method.kmeans_device == "auto" else torch.device(method.kmeans_device)
    gen = torch.Generator().manual_seed(method.seed)
    tensors, errors, counts = {}, [], []
    for i in range(num_layers):
        keys = torch.cat(collector.keys.pop(i), dim=0)
        if keys.shape[0] > method.max_keys:
            keys = keys[torch.randperm(keys.shape[0], generator=gen)[:method.max_keys]]
        counts.append(int(keys.shape[0]))
        qq = collector.qq.pop(i) if method.query_aware else None
        layer, rel = fit_layer(keys, qq, method.codebook, method.kmeans_iters, method.kmeans_tol,
                               method.seed + i, device, method.shrink)
        errors.append(rel)
        for name, t in layer.items():
            tensors[f"layer{i}.{name}"] = t
        log.info("a2ats layer %d: %d keys, relative quantization error %.4f", i, keys.shape[0], rel)
    meta = {"keys_per_layer": counts, "relative_quantization_error": errors}
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors, meta=meta)
