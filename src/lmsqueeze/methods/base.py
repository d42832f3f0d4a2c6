"""Method configs, the registry, and calibration artifacts (a directory: config.json + tensors.safetensors)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lmsqueeze.errors import LmsqueezeError

ARTIFACT_VERSION = 1
METHODS: dict[str, type[Method]] = {}


class Method:
    """Base of method configs (each a dataclass). Subclasses set `name` and implement `new_layer_state`.

    Methods that need calibration set `needs_calibration = True` and implement `calibrate(model, batches)`.
    Methods that replace modules (e.g. sparse linears) implement `install(model, artifact) -> undo`.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def new_layer_state(self, layer_idx: int, artifact: Artifact | None, max_length: int | None = None):
        raise NotImplementedError

    def install(self, model, artifact: Artifact | None):
        """Swap modules for the method's own; return a callable that restores them. Default: nothing."""
        return lambda: None

    def calibrate(self, model, batches) -> Artifact:
        if not self.needs_calibration:
            return Artifact(method=self, fingerprint=model_fingerprint(model))
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method config available by its `name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a `name`")
    METHODS[cls.name] = cls
    return cls


def method_from_dict(d: dict[str, Any]) -> Method:
    """Rebuild a method config from `Method.to_dict()` output."""
    d = dict(d)
    name = d.pop("name", None)
    if name not in METHODS:
        raise LmsqueezeError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def get_method(name: str) -> type[Method]:
    """The method config class registered under `name`."""
    if name not in METHODS:
        raise LmsqueezeError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def model_fingerprint(model) -> dict[str, Any]:
    """What an artifact must match: architecture, layer count, head shapes and a hash of a few weights.

    The hash uses bf16-rounded values, so the same weights loaded as fp32 or bf16 give the same fingerprint.
    """
    cfg = model.config
    h = hashlib.sha256()
    tensors = [model.get_input_embeddings().weight, model.model.layers[0].self_attn.q_proj.weight,
               model.model.layers[-1].mlp.down_proj.weight]
    for w in tensors:
        sample = w.detach().flatten()[:4096].to("cpu", torch.bfloat16).float().numpy().tobytes()
        h.update(sample)
    return {
        "architecture": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": model.model.layers[0].self_attn.head_dim,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "weights_sha256": h.hexdigest()[:16],
    }


@dataclass
class Artifact:
    """A calibrated method: its config, the fingerprint of the model it was made for, and its tensors."""

    method: Method
    fingerprint: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def check_model(self, model) -> None:
        """Raise LmsqueezeError if `model` is not the model this artifact was made for."""
        theirs = model_fingerprint(model)
        diff = [k for k in self.fingerprint if self.fingerprint[k] != theirs.get(k)]
        if diff:
            detail = ", ".join(f"{k}: artifact {self.fingerprint[k]} vs model {theirs.get(k)}" for k in diff[:3])
            raise LmsqueezeError(
                f"this {self.method.name} artifact was made for another model ({detail}); "
                "calibrate it again on this model"
            )

    def save(self, path: str | Path) -> Path:
        """Write the artifact directory atomically (temp dir + rename); an existing one is replaced."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            config = {"method": self.method.to_dict(), "version": ARTIFACT_VERSION,
                      "fingerprint": self.fingerprint, "meta": self.meta}
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / "tensors.safetensors"))
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "artifact")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact directory written by `Artifact.save`."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, tensor_file = path / "config.json", path / "tensors.safetensors"
    if not cfg_file.exists() or not tensor_file.exists():
        raise LmsqueezeError(
            f"{path} is not an lmsqueeze artifact (needs config.json and tensors.safetensors); "
            "create one with `lmsqueeze calibrate`"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LmsqueezeError(f"{cfg_file} is not valid JSON ({e}); calibrate again") from None
    if config.get("version") != ARTIFACT_VERSION:
        raise LmsqueezeError(
            f"{path} has artifact version {config.get('version')}, this lmsqueeze reads {ARTIFACT_VERSION}; "
            "calibrate again"
        )
    method = method_from_dict(config["method"])
    return Artifact(method=method, fingerprint=config["fingerprint"], tensors=load_file(str(tensor_file)),
                    meta=config.get("meta", {}))
