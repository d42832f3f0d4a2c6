"""Evaluation results: one JSON per run (what was run, on what, where) plus a CSV of predictions.

A result names the model (path + fingerprint), the data, the method config, the command line, the git
commit, the date, the device and the library versions, then the metrics. Files are written to a temp file
and renamed, so a crash never leaves half a result.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_VERSION = 1


def git_commit() -> str | None:
    """HEAD of this repository, '+dirty' when tracked files changed (the bench's git_state, which falls back
    to $LMSQUEEZE_GIT_COMMIT / $LMSQUEEZE_GIT_DIRTY on copies without git)."""
    from lmsqueeze.bench.results import git_state

    commit, dirty = git_state()
    if not commit or commit == "unknown":
        return None
    return commit + ("+dirty" if dirty else "")


def device_name(device=None) -> str:
    """The GPU's name for a CUDA device, else the CPU's description."""
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str | None]:
    import torch
    import transformers

    import lmsqueeze

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": triton_version, "lmsqueeze": lmsqueeze.__version__}


def environment(device=None) -> dict[str, Any]:
    """Command line, git commit, UTC date, device and versions of this run."""
    return {"command": " ".join(sys.argv), "git_commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "versions": versions()}


def model_info(model, path: str | Path | None) -> dict[str, Any]:
    from lmsqueeze.methods.base import model_fingerprint

    return {"path": str(path) if path is not None else None, "fingerprint": model_fingerprint(model),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(model.device)}


def method_info(method, artifact_dir: str | Path | None = None) -> dict[str, Any]:
    """The method config as a dict ({'name': 'dense'} for None), plus the artifact directory if any."""
    from lmsqueeze.methods.base import Artifact

    if method is None:
        info: dict[str, Any] = {"name": "dense"}
    elif isinstance(method, Artifact):
        info = method.method.to_dict()
    else:
        info = method.to_dict()
    if artifact_dir is not None:
        info["artifact"] = str(artifact_dir)
    return info


def make_result(kind: str, metrics: dict, *, model: dict | None = None, method: dict | None = None,
                data: dict | None = None, config: dict | None = None, device=None) -> dict[str, Any]:
    """A result dict: kind ('eval.ppl', 'eval.suite', ...), environment, model, data, method, config, metrics."""
    return {"kind": kind, "version": RESULT_VERSION, **environment(device), "model": model or {},
            "data": data or {}, "method": method or {"name": "dense"}, "config": config or {}, "metrics": metrics}


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_predictions_csv(path: str | Path, records: Sequence[dict]) -> Path:
    """One row per record; columns are the union of record keys; lists and dicts are JSON-encoded."""
    path = Path(path)
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    atomic_write(path, buf.getvalue())
    return path


def save_result(path: str | Path, result: dict, records: Sequence[dict] | None = None) -> Path:
    """Write result JSON to `path` and, with records, `<stem>.predictions.csv` beside it (named in the JSON)."""
    path = Path(path)
    if records:
        csv_path = path.with_name(path.stem + ".predictions.csv")
        write_predictions_csv(csv_path, records)
        result = {**result, "predictions_csv": csv_path.name}
    return write_json(path, result)
