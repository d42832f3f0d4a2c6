"""Artifacts: saved atomically, loaded back, refused on another model."""

import json

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import METHODS, Artifact, get_method, model_fingerprint
from lmsqueeze.methods.dense import Dense
from lmsqueeze.models.tiny import tiny_model


def make_artifact(model):
    art = Dense().calibrate(model, batches=[])
    art.tensors["layers.0.scale"] = torch.randn(4, 3)
    art.meta["note"] = "test"
    return art


def test_round_trip(tmp_path):
    model = tiny_model("llama")
    art = make_artifact(model)
    art.save(tmp_path / "a")
    back = lmsqueeze.load_artifact(tmp_path / "a")
    assert isinstance(back.method, Dense) and back.meta == {"note": "test"}
    assert torch.equal(back.tensors["layers.0.scale"], art.tensors["layers.0.scale"])
    with lmsqueeze.apply(model, back):
        pass


def test_registry():
    assert METHODS["dense"] is Dense and get_method("dense") is Dense
    with pytest.raises(LmsqueezeError, match="unknown method"):
        get_method("nope")


def test_fingerprint_independent_of_dtype():
    model = tiny_model("llama")
    assert model_fingerprint(model) == model_fingerprint(tiny_model("llama").to(torch.bfloat16))


def test_wrong_model_is_refused(tmp_path):
    art = make_artifact(tiny_model("llama", seed=0))
    art.save(tmp_path / "a")
    other = tiny_model("llama", seed=1)
    with pytest.raises(LmsqueezeError, match="another model"):
        with lmsqueeze.apply(other, lmsqueeze.load_artifact(tmp_path / "a")):
            pass
    with pytest.raises(LmsqueezeError, match="another model"):
        with lmsqueeze.apply(tiny_model("qwen3"), lmsqueeze.load_artifact(tmp_path / "a")):
            pass


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    art = make_artifact(tiny_model("llama"))
    art.save(tmp_path / "a")
    before = (tmp_path / "a" / "config.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        art.save(tmp_path / "a")
    with pytest.raises(OSError):
        art.save(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert (tmp_path / "a" / "config.json").read_text() == before  # the old artifact is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left


def test_overwrite_replaces(tmp_path):
    model = tiny_model("llama")
    art = make_artifact(model)
    art.save(tmp_path / "a")
    art.meta["note"] = "second"
    art.save(tmp_path / "a")
    assert lmsqueeze.load_artifact(tmp_path / "a").meta["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_bad_artifact_dirs(tmp_path):
    with pytest.raises(LmsqueezeError, match="not an lmsqueeze artifact"):
        lmsqueeze.load_artifact(tmp_path)
    art = make_artifact(tiny_model("llama"))
    art.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["version"] = 999
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmsqueezeError, match="version"):
        lmsqueeze.load_artifact(tmp_path / "a")
    cfg["version"], cfg["method"]["name"] = 1, "nope"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmsqueezeError, match="unknown method"):
        lmsqueeze.load_artifact(tmp_path / "a")
    assert isinstance(Artifact, type)
