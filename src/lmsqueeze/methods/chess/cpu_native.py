"""Native CPU kernels for CHESS (the paper's spvmm / vmmsp): a small C + OpenMP file compiled at first use.

Why: the torch-ops CPU path reads only the needed rows for the input-sparse GEMVs (`embedding_bag`), but the
output-sparse up_proj has to gather the surviving rows (a copy) before multiplying, which costs about as
much as the dense GEMV on a CPU. These loops read each surviving weight row once, in place.

The C source below is compiled with the system C compiler (`$CC`, else cc / gcc / clang;
`-O3 -march=native -fopenmp`) into $LMSQUEEZE_CACHE (default ~/.cache/lmsqueeze) the first time a CPU sparse
GEMV runs, keyed by a hash of the source, flags, compiler and CPU flags; it is loaded with ctypes and shares
torch's OpenMP runtime (torch already loaded libgomp.so.1). No compiler, a failed build, or
LMSQUEEZE_NO_NATIVE=1: `library()` returns None and `cpu.py` uses its torch-ops path (same results).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
MAX_BATCH = 16
_STATE: dict = {"tried": False, "lib": None}

SOURCE = r"""/* CHESS CPU sparse GEMVs (the paper's spvmm / vmmsp), compiled at first use by cpu_native.py.
 *
 * Plain C + OpenMP, no torch headers: called through ctypes with raw pointers. The OpenMP runtime is the one
 * torch already loaded (same soname), so these loops share torch's thread pool.
 *
 *   rows_axpy:  y[b, :] = sum_j xs[b, j] * W[idx[j], :]      (input-sparse: down / q / o with W = weight^T)
 *   rows_dot:   u[b, j] = dot(W[idx[j], :], x[b, :])         (output-sparse: up_proj)
 *
 * W rows have `ldw` elements (bf16 as uint16 bits, or float32); x, xs, y, u are float32; b < B <= 16.
 * Only rows idx[0..nnz) of W are read, each once (contiguous).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16f(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

#define LOAD_bf16(p, c) bf16f((p)[c])
#define LOAD_f32(p, c) ((p)[c])

#define DEFINE_KERNELS(SUF, T)                                                                          \
void rows_axpy_##SUF(const float* xs, int64_t B, const int64_t* idx, int64_t nnz, const T* w,          \
                     int64_t ldw, int64_t N, float* y, int nthreads) {                                  \
    float* part = (float*)calloc((size_t)nthreads * B * N, sizeof(float));                              \
    if (!part) return;                                                                                   \
    _Pragma("omp parallel num_threads(nthreads)")                                                       \
    {                                                                                                    \
        int t = omp_get_thread_num(), nt = omp_get_num_threads();                                        \
        int64_t j0 = nnz * t / nt, j1 = nnz * (t + 1) / nt;                                              \
        float* acc = part + (size_t)t * B * N;                                                           \
        for (int64_t j = j0; j < j1; j++) {                                                              \
            const T* wr = w + idx[j] * ldw;                                                              \
            for (int64_t b = 0; b < B; b++) {                                                            \
                float xv = xs[b * nnz + j];                                                              \
                if (xv == 0.0f) continue;                                                                \
                float* a = acc + b * N;                                                                  \
                _Pragma("omp simd")                                                                      \
                for (int64_t c = 0; c < N; c++) a[c] += xv * LOAD_##SUF(wr, c);                          \
            }                                                                                            \
        }                                                                                                \
        _Pragma("omp barrier")                                                                           \
        int64_t c0 = B * N * t / nt, c1 = B * N * (t + 1) / nt;                                          \
        for (int64_t c = c0; c < c1; c++) {                                                              \
            float s = 0.0f;                                                                              \
            for (int k = 0; k < nt; k++) s += part[(size_t)k * B * N + c];                               \
            y[c] = s;                                                                                    \
        }                                                                                                \
    }                                                                                                    \
    free(part);                                                                                          \
}                                                                                                        \
void rows_dot_##SUF(const float* x, int64_t B, const int64_t* idx, int64_t nnz, const T* w,            \
                    int64_t ldw, int64_t H, float* u, int nthreads) {                                   \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                  \
    for (int64_t j = 0; j < nnz; j++) {                                                                  \
        const T* wr = w + idx[j] * ldw;                                                                  \
        for (int64_t b = 0; b < B; b++) {                                                                \
            const float* xb = x + b * H;                                                                 \
            float s = 0.0f;                                                                              \
            _Pragma("omp simd reduction(+:s)")                                                           \
            for (int64_t c = 0; c < H; c++) s += LOAD_##SUF(wr, c) * xb[c];                              \
            u[b * nnz + j] = s;                                                                          \
        }                                                                                                \
    }                                                                                                    \
}

int omp_get_thread_num(void);
int omp_get_num_threads(void);

DEFINE_KERNELS(bf16, uint16_t)
DEFINE_KERNELS(f32, float)
"""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cc: str, so: Path) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        c_file, out = Path(tmp) / "chess_cpu.c", Path(tmp) / so.name
        c_file.write_text(SOURCE)
        subprocess.run([cc, *FLAGS, str(c_file), "-o", str(out)], check=True, capture_output=True, timeout=120)
        os.replace(out, so)  # atomic: a concurrent build never sees half a library


def library():
    """The loaded native library, or None when it cannot be built here (then the torch-ops path is used)."""
    if _STATE["tried"]:
        return _STATE["lib"]
    _STATE["tried"] = True
    if os.environ.get("LMSQUEEZE_NO_NATIVE", "0") == "1":
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: CHESS CPU kernels use torch ops")
        return None
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, cc, _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LMSQUEEZE_CACHE", Path.home() / ".cache" / "lmsqueeze"))
    so = cache / f"chess_cpu_{key}.so"
    try:
        if not so.exists():
            log.info("building CHESS CPU kernels: %s", so)
            _build(cc, so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        log.warning("CHESS CPU kernels could not be built (%s %s); using torch ops", e, err.decode()[-300:])
        return None
    p, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("rows_axpy_bf16", "rows_axpy_f32", "rows_dot_bf16", "rows_dot_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i64, p, i64, p, i64, i64, p, cint]
        fn.restype = None
    _STATE["lib"] = lib
    return lib


def supports(w: torch.Tensor, batch: int) -> bool:
    """Whether the native kernels take this weight (CPU, bf16/fp32, contiguous rows) and batch."""
    return (w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32) and w.dim() == 2
            and w.stride(1) == 1 and 1 <= batch <= MAX_BATCH and library() is not None)


def _suffix(w: torch.Tensor) -> str:
    return "bf16" if w.dtype == torch.bfloat16 else "f32"


def rows_axpy(w: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """y[b] = sum_j coef[b, j] * w[idx[j], :]. w: [R, N] (contiguous rows); idx: [n] int64; coef: [B, n]
    -> y: [B, N] float32. Reads rows idx of w once each."""
    lib = library()
    B, n = coef.shape
    N = w.shape[1]
    idx = idx.to(torch.int64).contiguous()
    coef = coef.to(torch.float32).contiguous()
    y = torch.empty(B, N, dtype=torch.float32)
    getattr(lib, "rows_axpy_" + _suffix(w))(coef.data_ptr(), B, idx.data_ptr(), n, w.data_ptr(), w.stride(0), N,
                                            y.data_ptr(), torch.get_num_threads())
    return y


def rows_dot(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """u[b, j] = dot(w[idx[j], :], x[b, :]). w: [R, C] (contiguous rows); idx: [n]; x: [B, C] -> [B, n] float32."""
    lib = library()
    B, C = x.shape
    n = idx.numel()
    idx = idx.to(torch.int64).contiguous()
    xf = x.to(torch.float32).contiguous()
    u = torch.empty(B, n, dtype=torch.float32)
    getattr(lib, "rows_dot_" + _suffix(w))(xf.data_ptr(), B, idx.data_ptr(), n, w.data_ptr(), w.stride(0), C,
                                           u.data_ptr(), torch.get_num_threads())
    return u
