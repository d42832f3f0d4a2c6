"""Datatypes for normalised values in [-1, 1]: non-uniform (Fisher-weighted k-means), uniform int, NormalFloat.

A `Codebook` holds 2^bits sorted values as `levels * grid`. For bits <= 4 the levels are integers in
[-127, 127] (the k-means centroids snapped to a 255-level grid, moving each by at most grid / 2 = max|c| / 254),
which is what lets the decode kernel look codes up with byte permutes; the reference uses the same snapped
values, so kernel and reference compute the same function.

Fitting works on a `Histogram` of the normalised calibration values (fixed bins over [-1, 1], per-bin
Fisher weight and count), so calibration never holds all activations at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError

GRID_LEVELS = 127  # levels in [-127, 127]: a byte per entry after adding 128
NUM_BINS = 4096
KMEANS_ITERS = 60
NF_OFFSET = 0.9677  # QLoRA's NormalFloat construction: quantile range [1 - offset, offset]


@dataclass
class Codebook:
    """levels: [2^bits] float32 sorted ascending; value of code c = levels[c] * grid (in [-1, 1]-ish)."""

    levels: torch.Tensor
    grid: float

    @property
    def bits(self) -> int:
        return int(self.levels.numel()).bit_length() - 1

    @property
    def values(self) -> torch.Tensor:
        return self.levels * self.grid

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Code of the nearest value for every element of x (any shape); int64."""
        v = self.values.to(x.device, torch.float32)
        mid = (v[1:] + v[:-1]) / 2
        return torch.bucketize(x.float().contiguous(), mid)

    def table_words(self) -> list[int]:
        """The levels as bytes (level + 128), four codes per int32 (signed), for the kernel's byte permutes."""
        if self.bits > 4:
            raise LmsqueezeError("only 2/3/4-bit codebooks have a byte table")
        b = (self.levels.round().to(torch.int64) + 128).tolist()
        b = b + [128] * (16 - len(b))
        words = []
        for i in range(0, 16, 4):
            w = b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)
            words.append(w - 2**32 if w >= 2**31 else w)
        return words


def snap(values: torch.Tensor) -> Codebook:
    """Sorted values -> a Codebook; for <= 16 values, levels are snapped to integers in [-127, 127]."""
    values = torch.sort(values.float().cpu()).values
    top = float(values.abs().max())
    if not torch.isfinite(values).all() or top == 0.0:
        raise LmsqueezeError("a datatype's values must be finite and not all zero; calibrate again")
    grid = top / GRID_LEVELS
    levels = values / grid
    if values.numel() <= 16:
        levels = levels.round().clamp(-GRID_LEVELS, GRID_LEVELS)
    return Codebook(levels, grid)


def uniform_codebook(bits: int) -> Codebook:
    """Uniform intN: 2^bits evenly spaced values over [-1, 1]."""
    return snap(torch.linspace(-1.0, 1.0, 2**bits))


def normalfloat_codebook(bits: int) -> Codebook:
    """NormalFloat (QLoRA): quantiles of N(0, 1), asymmetric with an exact zero, scaled to [-1, 1]."""
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return snap((v / v.abs().max()).float())


class Histogram:
    """Weighted histogram of normalised values over [-1, 1]: Fisher weight, weighted sum and count per bin."""

    def __init__(self, bins: int = NUM_BINS, device: torch.device | str = "cpu") -> None:
        self.bins = bins
        self.weight = torch.zeros(bins, dtype=torch.float64, device=device)
        self.wsum = torch.zeros(bins, dtype=torch.float64, device=device)
        self.count = torch.zeros(bins, dtype=torch.float64, device=device)
        self.csum = torch.zeros(bins, dtype=torch.float64, device=device)
        self.csq = torch.zeros(bins, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, w: torch.Tensor, count: torch.Tensor | None = None) -> None:
        """x: normalised inliers (any shape, values in [-1, 1]); w: their weights (same shape); count: how many
        values each entry of x stands for (None: one each)."""
        x = x.reshape(-1).to(self.weight.device, torch.float64)
        w = w.reshape(-1).to(self.weight.device, torch.float64)
        n = torch.ones_like(x) if count is None else count.reshape(-1).to(self.weight.device, torch.float64)
        idx = ((x.clamp(-1, 1) + 1) * (self.bins / 2)).long().clamp_(0, self.bins - 1)
        self.weight.index_add_(0, idx, w)
        self.wsum.index_add_(0, idx, w * x)
        self.count.index_add_(0, idx, n)
        self.csum.index_add_(0, idx, n * x)
        self.csq.index_add_(0, idx, n * x * x)

    @property
    def centers(self) -> torch.Tensor:
        """Per-bin points: the weighted mean of the bin where it has weight, else the bin centre."""
        edges = torch.linspace(-1, 1, self.bins + 1, dtype=torch.float64, device=self.weight.device)
        mid = (edges[1:] + edges[:-1]) / 2
        return torch.where(self.weight > 0, self.wsum / self.weight.clamp_min(1e-300), mid)


def weighted_kmeans(hist: Histogram, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """1-D k-means of the histogram's points weighted by its Fisher weights (Lloyd, quantile init). -> [k]."""
    x, w = hist.centers, hist.weight
    if float(w.sum()) <= 0:
        w = hist.count
    if float(w.sum()) <= 0:
        raise LmsqueezeError("no calibration values to fit a datatype to; pass more or longer batches")
    cdf = torch.cumsum(w, 0) / w.sum()
    targets = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k
    c = x[torch.searchsorted(cdf, targets).clamp_(max=x.numel() - 1)]
    for _ in range(iters):
        c = torch.sort(c).values
        assign = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, assign, w * x)
        den = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, assign, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c)
        if torch.allclose(new, c, rtol=0, atol=1e-9):
            c = new
            break
        c = new
    return torch.sort(c).values.float().cpu()


def qnorm(values: torch.Tensor, hist: Histogram) -> torch.Tensor:
    """Q-Norm: rescale a datatype so its rounded values keep the inliers' mean and std (per the paper's repo).

    m1, s1: mean/std of the normalised inliers; m2, s2: after rounding each to its nearest value;
    returns values * s1 / s2 + (m1 - m2 * s1 / s2).
    """
    n = float(hist.count.sum())
    if n <= 0:
        return values
    m1 = float(hist.csum.sum()) / n
    s1 = max(float(hist.csq.sum()) / n - m1 * m1, 0.0) ** 0.5
    v = values.double().to(hist.count.device)
    assign = torch.bucketize(hist.centers, (v[1:] + v[:-1]) / 2)
    r = v[assign]
    m2 = float((hist.count * r).sum()) / n
    s2 = max(float((hist.count * r * r).sum()) / n - m2 * m2, 0.0) ** 0.5
    if s2 <= 0 or s1 <= 0:
        return values
    scale = s1 / s2
    return (values.double() * scale + (m1 - m2 * scale)).float()


def fit_codebook(datatype: str, bits: int, hist: Histogram | None, use_qnorm: bool = False) -> Codebook:
    """The codebook of `datatype` ("nuq" needs the histogram; "int" and "nf" ignore it)."""
    if datatype == "int":
        return uniform_codebook(bits)
    if datatype == "nf":
        return normalfloat_codebook(bits)
    if datatype != "nuq":
        raise LmsqueezeError(f"unknown datatype {datatype!r}; use 'nuq', 'int' or 'nf'")
    if hist is None:
        raise LmsqueezeError("the nuq datatype needs calibration data")
    values = weighted_kmeans(hist, 2**bits)
    if use_qnorm:
        values = qnorm(values, hist)
    return snap(values)


class ChannelHistogram:
    """Per-channel weighted histograms of normalised keys over [-reach, reach] (values beyond fall in the end
    bins, whose weighted mean still holds them): weight, weighted sum and count per (channel, bin), float64."""

    def __init__(self, channels: int, bins: int = 1024, reach: float = 2.0,
                 device: torch.device | str = "cpu") -> None:
        self.bins, self.reach = bins, reach
        self.weight = torch.zeros(channels, bins, dtype=torch.float64, device=device)
        self.wsum = torch.zeros(channels, bins, dtype=torch.float64, device=device)
        self.count = torch.zeros(channels, bins, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, w: torch.Tensor) -> None:
        """x, w: [N, C] normalised values of each channel and their weights."""
        C = self.weight.shape[0]
        x = x.reshape(-1, C).to(self.weight.device, torch.float64)
        w = w.reshape(-1, C).to(self.weight.device, torch.float64)
        b = ((x.clamp(-self.reach, self.reach) + self.reach) * (self.bins / (2 * self.reach))).long()
        flat = (b.clamp_(0, self.bins - 1) + torch.arange(C, device=b.device) * self.bins).reshape(-1)
        self.weight.view(-1).index_add_(0, flat, w.reshape(-1))
        self.wsum.view(-1).index_add_(0, flat, (w * x).reshape(-1))
        self.count.view(-1).index_add_(0, flat, torch.ones_like(x).reshape(-1))

    @property
    def centers(self) -> torch.Tensor:
        """[C, bins]: the weighted mean of each bin where it has weight, else the bin centre."""
        edges = torch.linspace(-self.reach, self.reach, self.bins + 1, dtype=torch.float64,
                               device=self.weight.device)
        mid = ((edges[1:] + edges[:-1]) / 2).expand_as(self.weight)
        return torch.where(self.weight > 0, self.wsum / self.weight.clamp_min(1e-300), mid)


def fit_channel_affine(hist: ChannelHistogram, values: torch.Tensor, iters: int = 20,
                       starts: tuple[float, ...] = (1.0, 0.75, 0.5, 0.35)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale a and offset b minimising sum w (x - (a * values[code] + b))^2, code = the nearest
    value of (x - b) / a (clamped to the ends, as the quantizer does). Lloyd iterations (nearest code, then
    weighted least squares; each lowers the error) from the data's min/max and from a = each of `starts`,
    b = 0; the best per channel.
    values: [K] sorted normalised datatype -> (a [C], b [C]) float64."""
    x, w = hist.centers, hist.weight
    v = values.to(x.device, torch.float64)
    mid = (v[1:] + v[:-1]) / 2
    has = w > 0
    lo = torch.where(has, x, torch.inf).amin(1)
    hi = torch.where(has, x, -torch.inf).amax(1)
    fin = torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)
    a_mm = torch.where(fin, (hi - lo) / (v[-1] - v[0]), 1.0)  # the data's min/max mapped to the end values
    b_mm = torch.where(fin, (hi + lo) / 2 - a_mm * (v[-1] + v[0]) / 2, 0.0)
    inits = [(a_mm, b_mm)] + [(torch.full_like(a_mm, a0), torch.zeros_like(b_mm)) for a0 in starts]
    best_a = best_b = best_e = None
    for a, b in inits:
        for _ in range(iters):
            c = v[torch.bucketize((x - b[:, None]) / a[:, None], mid)]
            sw, sc, scc = w.sum(1), (w * c).sum(1), (w * c * c).sum(1)
            sx, scx = (w * x).sum(1), (w * c * x).sum(1)
            det = sw * scc - sc * sc
            ok = det > 1e-12 * sw.clamp_min(1e-300) ** 2
            safe = det.where(ok, torch.ones_like(det))
            na, nb = (sw * scx - sc * sx) / safe, (scc * sx - sc * scx) / safe
            ok = ok & (na > 1e-3)
            a, b = torch.where(ok, na, a), torch.where(ok, nb, b)
        e = channel_error(hist, values, a, b)
        if best_e is None:
            best_a, best_b, best_e = a, b, e
        else:
            better = e < best_e
            best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
            best_e = torch.minimum(e, best_e)
    return best_a, best_b


def channel_error(hist: ChannelHistogram, values: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Weighted squared error per channel [C] of quantizing with scale a and offset b (normalised units)."""
    x, w = hist.centers, hist.weight
    v = values.to(x.device, torch.float64)
    c = v[torch.bucketize((x - b[:, None]) / a[:, None], (v[1:] + v[:-1]) / 2)]
    return (w * (x - a[:, None] * c - b[:, None]) ** 2).sum(1)
