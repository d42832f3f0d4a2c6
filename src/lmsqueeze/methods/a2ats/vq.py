"""Query-aware vector quantization of keys (A²ATS): Cholesky of the query covariance, then K-means.

The retrieval score of a key k against a query q is q·k, so what matters is the error of the logit, not of
the key: E_q[(q·(k − ĉ))²] = (k − ĉ) H (k − ĉ)ᵀ with H = E[qᵀq] over (window-rotated) queries of the heads
that share the KV head. With H = L Lᵀ (Cholesky), ‖(k − ĉ) L‖² is that error, so plain Euclidean K-means on
the transformed keys x = k L minimizes it; the centroids c live in L-space and ĉ = c L⁻¹ is the key-space
centroid used to score (q·ĉ). Plain VQ (the ablation) is L = I.

All functions are batched over KV heads: x: [H, N, D] (H independent problems), centroids: [H, C, D].
"""

from __future__ import annotations

import logging

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

ASSIGN_CHUNK = 1 << 13  # points per distance block (memory: H * chunk * C floats)


def cholesky_factor(h: torch.Tensor, jitter: float = 1e-6) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = H / rms(H) + jitter·I, per head. h: [H, D, D] -> L: [H, D, D] float32.

    The scale does not change the K-means argmin; the jitter grows tenfold (up to 1e-1) until every
    factorisation succeeds, for rank-deficient covariances (few calibration tokens).
    """
    h = h.double()
    h = 0.5 * (h + h.transpose(-1, -2))
    rms = (h.pow(2).mean(dim=(-1, -2), keepdim=True)).sqrt().clamp_min(1e-30)
    h = h / rms
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    eps = jitter
    while True:
        L, info = torch.linalg.cholesky_ex(h + eps * eye)
        if int(info.abs().max()) == 0:
            return L.float()
        if eps >= 1e-1:
            raise LmsqueezeError("the calibration queries' covariance is not positive definite even with "
                                 "jitter 0.1; calibrate on more tokens")
        eps *= 10
        log.info("query covariance: Cholesky needed jitter %.0e", eps)


def shrink_metric(h: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) H / mean(diag H) + shrink I, per head. h: [H, D, D] -> float64 [H, D, D].

    H = E[qᵀq] of real queries is dominated by a few directions (the mean query); the error of a key
    along the other directions then costs almost nothing and such keys share codes, although single
    queries (a needle's) do look along them. Shrinking toward the identity (plain VQ's metric) keeps part
    of that error in the objective. Chosen on calibration data (benchmarks/scripts/eval_a2ats.py).
    """
    h = h.double()
    D = h.shape[-1]
    scale = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(D, dtype=h.dtype, device=h.device)
    return (1.0 - shrink) * h / scale + shrink * eye


def half_sq_norms(centroids: torch.Tensor) -> torch.Tensor:
    """[H, C, D] -> [H, C] float32: ‖c‖² / 2 (the assignment bias)."""
    return 0.5 * centroids.float().pow(2).sum(-1)


def assign(x: torch.Tensor, centroids: torch.Tensor, half_norms: torch.Tensor | None = None,
           chunk: int = ASSIGN_CHUNK) -> torch.Tensor:
    """Nearest centroid per point: argmax_c x·c − ‖c‖²/2. x: [H, N, D], centroids: [H, C, D] -> [H, N] int64."""
    if half_norms is None:
        half_norms = half_sq_norms(centroids)
    c = centroids.float().transpose(1, 2)
    out = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    for a in range(0, x.shape[1], chunk):
        s = torch.bmm(x[:, a:a + chunk].float(), c) - half_norms[:, None, :]
        out[:, a:a + chunk] = s.argmax(-1)
    return out


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D² sampling), per head. x: [H, N, D] float32 -> centroids [H, k, D]."""
    H, N, D = x.shape
    rows = torch.arange(H, device=x.device)
    first = torch.randint(0, N, (H,), generator=generator, device=x.device)
    centroids = torch.empty(H, k, D, dtype=x.dtype, device=x.device)
    centroids[:, 0] = x[rows, first]
    d2 = (x - centroids[:, :1]).pow(2).sum(-1)  # [H, N]
    for i in range(1, k):
        w = d2.clamp_min(0) + 1e-12  # duplicates: still a valid distribution
        pick = torch.multinomial(w, 1, generator=generator)[:, 0]
        centroids[:, i] = x[rows, pick]
        d2 = torch.minimum(d2, (x - centroids[:, i:i + 1]).pow(2).sum(-1))
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int = 25, tol: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Lloyd's K-means from k-means++ seeds, per head. x: [H, N, D] -> centroids [H, k, D] float32.

    Stops after `iters` iterations or when the centroids move less than `tol` (relative); an empty cluster
    keeps its centroid.
    """
    H, N, D = x.shape
    if N < k:
        raise LmsqueezeError(f"K-means with {k} centroids needs at least {k} calibration keys per head, got {N}; "
                             "calibrate on more tokens or use a smaller codebook")
    x = x.float()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    centroids = kmeans_plus_plus(x, k, gen)
    offsets = (torch.arange(H, device=x.device) * k)[:, None]
    for it in range(iters):
        codes = assign(x, centroids)
        flat = (codes + offsets).reshape(-1)
        sums = torch.zeros(H * k, D, dtype=torch.float32, device=x.device).index_add_(0, flat, x.reshape(-1, D))
        counts = torch.bincount(flat, minlength=H * k).to(torch.float32)[:, None]
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids.reshape(-1, D)).reshape(H, k, D)
        shift = (new - centroids).norm() / centroids.norm().clamp_min(1e-12)
        centroids = new
        if float(shift) < tol:
            log.debug("k-means converged after %d iterations", it + 1)
            break
    return centroids
