"""apply() installs and always removes the patch; caches crop; errors say what to do."""

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Method
from lmsqueeze.methods.cache import LayerState
from lmsqueeze.methods.dense import DenseState
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw


def test_restores_on_exit_and_on_exception():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    impl = model.config._attn_implementation
    with lmsqueeze.apply(model):
        assert "forward" in attn.__dict__
    assert "forward" not in attn.__dict__ and "generate" not in model.__dict__
    assert model.config._attn_implementation == impl
    with pytest.raises(RuntimeError), lmsqueeze.apply(model):
        raise RuntimeError("boom")
    assert "forward" not in attn.__dict__ and model.config._attn_implementation == impl
    assert not model.model._forward_pre_hooks


def test_nested_apply_is_an_error():
    model = tiny_model("llama")
    with lmsqueeze.apply(model), pytest.raises(LmsqueezeError, match="already patched"):
        with lmsqueeze.apply(model):
            pass


def test_crop_rolls_back():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad(), lmsqueeze.apply(model) as session:
        full = session.new_cache()
        ref = model(ids, **cache_kw(model, full)).logits
        cache = session.new_cache()
        model(ids[:, :15], **cache_kw(model, cache))
        cache.crop(-5)
        assert cache.get_seq_length() == 10
        out = model(ids[:, 10:], **cache_kw(model, cache)).logits
    assert (out - ref[:, 10:]).abs().max() <= 1e-4


def test_max_length_preallocates():
    model = tiny_model("llama")
    with torch.no_grad(), lmsqueeze.apply(model) as session:
        cache = session.new_cache(max_length=1000)
        model(torch.randint(0, 256, (2, 7)), **cache_kw(model, cache))
    state = cache.layers[0]
    assert isinstance(state, DenseState) and state.capacity >= 1000


class _NeedsCalibration(Method):
    name = "needs-calibration"
    needs_calibration = True


class _Windowless(Method):
    """A non-dense method: attends only to the current call's tokens (enough to test routing)."""

    name = "test-local"

    def new_layer_state(self, layer_idx, artifact, max_length=None):
        return DenseState(max_length)


def test_bad_method_inputs():
    model = tiny_model("llama")
    with pytest.raises(LmsqueezeError, match="calibrat"):
        with lmsqueeze.apply(model, _NeedsCalibration()):
            pass
    with pytest.raises(LmsqueezeError, match="method config"):
        with lmsqueeze.apply(model, "dense"):
            pass
    with torch.no_grad(), lmsqueeze.apply(model, _Windowless()) as session:
        ids = torch.randint(0, 256, (1, 8))
        out = model(ids)  # one-shot through a fresh state
        with pytest.raises(LmsqueezeError, match="new_cache"):
            model(ids[:, :1], **cache_kw(model, out.past_key_values))
        assert isinstance(session.new_cache().layers[0], LayerState)


def test_unpatched_model_with_our_cache_is_an_error():
    model = tiny_model("llama")
    with lmsqueeze.apply(model) as session:
        cache = session.new_cache()
    with pytest.raises(LmsqueezeError, match="apply"):
        model(torch.randint(0, 256, (1, 4)), **cache_kw(model, cache))


def test_unsupported_model_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LmsqueezeError, match="unsupported architecture"):
        with lmsqueeze.apply(model):
            pass
