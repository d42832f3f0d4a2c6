"""Spherical K-means (k-means++ init) of keys, batched over heads, in plain torch (GPU when the keys are).

Keys are L2-normalised before clustering, so the assignment is by cosine similarity; the centroid a
lookup scores against is the mean of the *raw* keys of its cluster (magnitude kept: it enters q·c).
"""

from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError

# assignment chunk: bound the [H, chunk, k] similarity matrix to about this many elements
_CHUNK_ELEMENTS = 1 << 26


def _assign(xn: torch.Tensor, cn: torch.Tensor) -> torch.Tensor:
    """xn: [H, N, D] unit rows, cn: [H, k, D] -> labels [H, N] int64 (argmax cosine), chunked over N."""
    H, N, _ = xn.shape
    k = cn.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, H * k))
    out = torch.empty(H, N, dtype=torch.int64, device=xn.device)
    for a in range(0, N, step):
        out[:, a:a + step] = torch.bmm(xn[:, a:a + step], cn.transpose(1, 2)).argmax(-1)
    return out


def _dots(xn: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """xn: [H, N, D], c: [H, D] -> [H, N] row dot products (a multiply-sum: einsum/bmm take a slow matvec path
    on the CPU)."""
    return (xn * c[:, None, :]).sum(-1)


def kmeans_pp_init(xn: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding on unit rows. xn: [H, N, D] -> initial centres [H, k, D] (rows of xn).

    generator: on xn's device (or None).
    Each next centre is drawn with probability proportional to its squared distance to the nearest centre
    so far (2 - 2 cos on the unit sphere); all heads are seeded together, one draw per head per step.
    """
    H, N, D = xn.shape
    rows = torch.arange(H, device=xn.device)
    first = torch.randint(0, N, (H,), generator=generator, device=xn.device)
    centres = torch.empty(H, k, D, dtype=xn.dtype, device=xn.device)
    centres[:, 0] = xn[rows, first]
    d2 = (2 - 2 * _dots(xn, centres[:, 0])).clamp_min_(0)
    for i in range(1, k):
        w = d2 + 1e-12  # all-zero distances (duplicate keys) still give a valid draw
        pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
        centres[:, i] = xn[rows, pick]
        d2 = torch.minimum(d2, (2 - 2 * _dots(xn, centres[:, i])).clamp_min_(0))
    return centres


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 16, seed: int = 0) -> torch.Tensor:
    """Cluster each head's rows by cosine similarity. x: [H, N, D] -> labels [H, N] int64 in [0, k).

    k-means++ init, then Lloyd steps (assign by max cosine, centre = normalised mean of the unit rows)
    until the labels stop changing or `iters` steps ran. An emptied cluster keeps its previous centre.
    """
    if x.dim() != 3 or x.shape[1] == 0:
        raise LmsqueezeError(f"spherical_kmeans wants x [heads, rows, dim] with rows > 0; got {tuple(x.shape)}")
    H, N, D = x.shape
    if not 1 <= k <= N:
        raise LmsqueezeError(f"k-means needs 1 <= clusters <= rows, got {k} clusters for {N} rows")
    if iters < 0:
        raise LmsqueezeError(f"k-means iters must be >= 0, got {iters}")
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    gen = torch.Generator(device=xn.device).manual_seed(seed)
    cn = kmeans_pp_init(xn, k, gen)
    labels = _assign(xn, cn)
    for _ in range(iters):
        sums = torch.zeros(H, k, D, dtype=xn.dtype, device=xn.device).scatter_add_(
            1, labels[..., None].expand(H, N, D), xn)
        counts = torch.zeros(H, k, dtype=xn.dtype, device=xn.device).scatter_add_(
            1, labels, torch.ones_like(labels, dtype=xn.dtype))
        new = torch.nn.functional.normalize(sums, dim=-1)
        cn = torch.where((counts > 0)[..., None], new, cn)
        new_labels = _assign(xn, cn)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the raw rows per cluster. x: [H, N, D], labels: [H, N] -> (centroids [H, k, D] fp32 (0 for
    an empty cluster), sizes [H, k] int64)."""
    H, N, D = x.shape
    sums = torch.zeros(H, k, D, dtype=torch.float32, device=x.device).scatter_add_(
        1, labels[..., None].expand(H, N, D), x.float())
    sizes = torch.zeros(H, k, dtype=torch.int64, device=x.device).scatter_add_(1, labels, torch.ones_like(labels))
    return sums / sizes.clamp_min(1)[..., None], sizes
