"""Load local Hugging Face model directories (offline only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.families import SUPPORTED_ARCHITECTURES

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
DEFAULT_MODEL = "default"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def default_model_path() -> Path:
    """The bundled default zoo model's directory."""
    return ZOO_DIR / DEFAULT_MODEL


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype from a name; None means bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmsqueezeError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_dir(path: Path) -> dict:
    """Validate a local model directory before loading; return its config.json contents."""
    if not path.exists():
        raise LmsqueezeError(f"model path {path} does not exist; pass a local Hugging Face model directory")
    if not path.is_dir():
        raise LmsqueezeError(f"model path {path} is not a directory; pass a local Hugging Face model directory")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LmsqueezeError(f"{path} has no config.json; pass a directory written by save_pretrained()")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise LmsqueezeError(f"{path} has no weights (*.safetensors or *.bin); save the model with its weights")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LmsqueezeError(f"{cfg_file} is not valid JSON ({e}); re-save the model") from None
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise LmsqueezeError(
            f"unsupported architecture {archs or cfg.get('model_type')!r} in {path}; "
            f"lmsqueeze supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return cfg


def load_model(path: str | Path | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer from a local directory (no network).

    path: a local Hugging Face directory (Llama, Mistral, Qwen2, Qwen3); None loads the bundled zoo model.
    Returns (model in eval mode, tokenizer or None when the directory has no tokenizer files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path = default_model_path()
        if not path.exists():
            raise LmsqueezeError(
                "the bundled default model is not installed in this copy of lmsqueeze; pass a model path"
            )
    path = Path(path)
    check_model_dir(path)
    torch_dtype = parse_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise LmsqueezeError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
