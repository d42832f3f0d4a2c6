"""`prepare`: a fixed context -> a Squeezed Attention artifact (its KV, clusters and thresholds per layer)."""

from __future__ import annotations

import logging
import time

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, model_fingerprint
from lmsqueeze.methods.squeezed.context import context_positions, reuse_capture
from lmsqueeze.methods.squeezed.index import build_layer_index

log = logging.getLogger(__name__)


def context_ids_from(batches) -> torch.Tensor:
    """The fixed context's token ids from what `calibrate(model, batches)` receives: ids [S] / [1, S], a list
    of ids, or a list holding one such tensor."""
    if isinstance(batches, (list, tuple)) and batches and isinstance(batches[0], torch.Tensor):
        batches = batches[0]
    return torch.as_tensor(batches, dtype=torch.long).reshape(-1)


CLUSTER_FIELDS = ("centroids", "observation", "sinks", "kmeans_iters", "seed", "hierarchical")


def reusable_labels(method, reuse: Artifact | None, layer: int) -> torch.Tensor | None:
    """Layer `layer`'s cluster labels from `reuse` (a Squeezed artifact of the same context and clustering
    config, e.g. another sparsity), or None when there is nothing to reuse."""
    if reuse is None:
        return None
    other = reuse.method
    if getattr(other, "name", None) != "squeezed" or any(getattr(other, f) != getattr(method, f)
                                                          for f in CLUSTER_FIELDS) or method.hierarchical:
        raise LmsqueezeError("`reuse` needs a flat Squeezed artifact with the same centroids, observation, sinks, "
                             "kmeans_iters and seed; prepare without `reuse`")
    return reuse.tensors[f"layers.{layer}.labels"]


def prepare_squeezed(method, model, context_ids, chunk_size: int = 2048, captured=None,
                     reuse: Artifact | None = None) -> Artifact:
    """Capture the context's KV (one dense forward, or reuse `captured`), cluster every layer's keys per KV
    head (or take the clusters of `reuse`, an artifact of the same context), calibrate the thresholds on the
    last `method.observation` tokens. Returns the artifact (CPU)."""
    t0 = time.perf_counter()
    ids = context_ids_from(context_ids)
    if reuse is not None and not torch.equal(reuse.tensors["context_ids"].cpu(), ids.cpu()):
        raise LmsqueezeError("`reuse` was prepared for another context; prepare without `reuse`")
    layers = reuse_capture(model, ids, method.observation, chunk_size, captured)
    S = ids.numel()
    tensors: dict[str, torch.Tensor] = {"context_ids": ids.cpu()}
    stats = []
    for i, cap in enumerate(layers):
        t, st = build_layer_index(
            cap.keys, cap.values, context_positions(S, cap.keys.device), cap.q_obs, cap.scaling,
            centroids=method.centroids, sparsity=method.sparsity, observation=method.observation,
            hierarchical=method.hierarchical, coarse_sparsity=method.coarse_pruning, iters=method.kmeans_iters,
            seed=method.seed + i, sinks=method.sinks, threshold=method.threshold,
            labels=reusable_labels(method, reuse, i))
        tensors.update({f"layers.{i}.{k}": v.cpu() for k, v in t.items()})
        stats.append(st)
    meta = {"context_tokens": S, "layers": stats, "kv_budget": method.kv_budget(),
            "seconds": round(time.perf_counter() - t0, 3)}
    log.info("prepared a %d-token fixed context in %.1f s", S, meta["seconds"])
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors, meta=meta)
