"""Device facts the benchmarks need: which device to run on, free memory, L2 size, measured copy bandwidth."""

from __future__ import annotations

import logging

import torch

from lmsqueeze.bench.timing import time_cuda
from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

CPU_PRESETS = ("tiny",)


def resolve_device(device: str, preset: str) -> torch.device:
    """The device to benchmark on: "auto" picks CUDA when present.

    Real-size presets need a CUDA GPU; on the CPU only the tiny preset runs, as a smoke test (times are
    not meaningful and a warning says so).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LmsqueezeError(f"unknown device {device!r}; use auto, cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmsqueezeError("this benchmark needs a CUDA GPU and none is available; "
                             "use --device cpu --preset tiny for a CPU smoke test")
    if dev.type != "cuda":
        if preset not in CPU_PRESETS:
            raise LmsqueezeError(f"preset {preset!r} needs a CUDA GPU (none is available or --device {device} "
                                 f"was given); use --preset tiny for a CPU smoke test")
        log.warning("running on %s: a smoke test only; its times say nothing about GPU speed", dev)
    return dev


def free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def fits(need_bytes: int, device: torch.device, margin: float = 0.9) -> bool:
    """Whether `need_bytes` fit in `margin` of the device's free memory (always True off CUDA)."""
    free = free_bytes(device)
    return free is None or need_bytes <= margin * free


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes (0 off CUDA or when unknown)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float | None:
    """Device-to-device copy bandwidth in TB/s (bytes read + written), measured now; None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup=3, iters=iters, use_graph=False)
    src = dst = None
    torch.cuda.empty_cache()
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e12
