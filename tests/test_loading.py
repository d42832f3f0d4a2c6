"""load_model: local directories of the four families; bad paths give one-line errors."""

import json

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.tiny import save_tiny_model, tiny_model


def test_loads_each_family(tmp_path, family):
    path = save_tiny_model(tmp_path / family, family)
    model, tok = lmsqueeze.load_model(path)
    assert type(model).__name__.lower().startswith(family) and tok is None
    ref = tiny_model(family)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_dtype_and_device(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    model, _ = lmsqueeze.load_model(path, dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LmsqueezeError, match="unknown dtype"):
        lmsqueeze.load_model(path, dtype="fp8")


def test_missing_path(tmp_path):
    with pytest.raises(LmsqueezeError, match="does not exist"):
        lmsqueeze.load_model(tmp_path / "nope")


def test_not_a_model_dir(tmp_path):
    with pytest.raises(LmsqueezeError, match="config.json"):
        lmsqueeze.load_model(tmp_path)


def test_no_weights(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(LmsqueezeError, match="no weights"):
        lmsqueeze.load_model(path)


def test_unsupported_architecture(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmsqueezeError, match="unsupported architecture"):
        lmsqueeze.load_model(path)
