"""Benchmark results as JSON: environment (commit, date, device, versions), command line and rows.

A result file (DESIGN.md, "Results") holds::

    {"schema": "lmsqueeze.bench/1", "kind": "decode_attention", "command": "...",
     "commit": "<sha>", "dirty": false, "date": "2026-11-24T08:00:00Z",
     "device": {"name": ..., "memory_gb": ..., ...}, "versions": {"torch": ..., ...},
     "rows": [{"method": ..., "ms": ..., "baseline": ..., "baseline_ms": ..., "speedup": ..., "tb_per_s": ...}],
     "extra": {...}}

Each timing row names its method and the baseline timed in the same run, both medians and their ratio
(`speedup` = baseline_ms / ms, > 1 is faster), and the achieved bandwidth for the bytes the method must move.
No hostname is recorded.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lmsqueeze.bench.timing import Timing
from lmsqueeze.errors import LmsqueezeError

SCHEMA = "lmsqueeze.bench/1"
REPO_ROOT = Path(__file__).resolve().parents[3]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-c", "safe.directory=*", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the code that runs: $LMSQUEEZE_GIT_COMMIT / $LMSQUEEZE_GIT_DIRTY when set, else git.

    The variables win because a copy of the tree (e.g. on a GPU machine) may carry a stale `.git` of an older
    commit while its files are newer: the caller who made the copy knows the commit. `safe.directory=*` lets
    git read a copied tree owned by another user.
    """
    dirty_env = os.environ.get("LMSQUEEZE_GIT_DIRTY")
    env_dirty = None if dirty_env is None else dirty_env not in ("0", "false", "")
    if os.environ.get("LMSQUEEZE_GIT_COMMIT"):
        return os.environ["LMSQUEEZE_GIT_COMMIT"], env_dirty
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return commit, (bool(status) if status is not None else None)
    return "unknown", env_dirty


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _lmsqueeze_version() -> str | None:
    """The package's own version when it runs from a source tree that is not installed (PYTHONPATH=src)."""
    import lmsqueeze

    return getattr(lmsqueeze, "__version__", None)


def device_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Name and memory of `device` (default: CUDA device 0 if there is one, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2),
                "sm_count": props.multi_processor_count,
                "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                "capability": f"{props.major}.{props.minor}"}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Commit, dirty flag, UTC date, device and library versions (no hostname)."""
    commit, dirty = git_state()
    return {
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_info(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "lmsqueeze": _version("lmsqueeze") or _lmsqueeze_version(),
        },
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command line that is running, as a shell string (`python -m lmsqueeze.bench.cli ...` if so)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("bench/cli.py", "bench\\cli.py")):
        argv = ["python", "-m", "lmsqueeze.bench.cli", *argv[1:]]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def timing_row(method: str, timing: Timing, *, baseline: str | None = None, baseline_timing: Timing | None = None,
               bytes_moved: int | None = None, peak_tb_per_s: float | None = None, **fields: Any) -> dict[str, Any]:
    """One result row: `fields` (the case: preset, batch, length...), the method's times, baseline and bandwidth.

    `bytes_moved`: the fewest bytes the method must read + write; gives `tb_per_s`, and with `peak_tb_per_s`
    the fraction of peak and the bandwidth floor `floor_ms`.
    """
    row: dict[str, Any] = {**fields, "method": method, "ms": timing.median_ms, "p10_ms": timing.p10_ms,
                           "p90_ms": timing.p90_ms, "iters": timing.iters, "graph": timing.graph}
    if timing.note:
        row["note"] = timing.note
    if baseline is not None and baseline_timing is not None:
        row.update(baseline=baseline, baseline_ms=baseline_timing.median_ms, baseline_graph=baseline_timing.graph,
                   speedup=baseline_timing.median_ms / timing.median_ms)
    if bytes_moved is not None:
        row["bytes"] = int(bytes_moved)
        row["tb_per_s"] = bytes_moved / (timing.median_ms * 1e-3) / 1e12
        if peak_tb_per_s:
            row["frac_of_peak"] = row["tb_per_s"] / peak_tb_per_s
            row["floor_ms"] = bytes_moved / (peak_tb_per_s * 1e12) * 1e3
    return row


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, dtypes/paths/devices -> str, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _clean(obj.item())
    return str(obj)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder + rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_result(kind: str, command: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    """The result document (see the module docstring) without writing it."""
    if not kind:
        raise LmsqueezeError("a result needs a kind, e.g. 'decode_attention'")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("method"):
            raise LmsqueezeError(f"result row {i} has no 'method'; every row must name its method")
    return _clean({"schema": SCHEMA, "kind": kind, "command": command, **environment(device), "rows": rows,
                   "extra": extra or {}})


def write_result(path: str | Path, kind: str, command: str, rows: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None, device: str | torch.device | None = None) -> Path:
    """Write a result JSON to `path` atomically and return the path."""
    doc = build_result(kind, command, rows, extra, device)
    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read_result(path: str | Path) -> dict[str, Any]:
    """Load a result JSON written by `write_result`."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmsqueezeError(f"cannot read result {path}: {e}") from None
    if doc.get("schema") != SCHEMA:
        raise LmsqueezeError(f"{path} is not an lmsqueeze bench result (schema {doc.get('schema')!r})")
    return doc
