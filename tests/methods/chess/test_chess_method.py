"""CHESS / CATS / TEAL as methods: calibration, install/undo, artifacts, sparsity targets, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import METHODS
from lmsqueeze.methods.baselines.cats import CATS
from lmsqueeze.methods.baselines.teal import TEAL
from lmsqueeze.methods.chess import CHESS, SparseLinear, SparseMLP
from lmsqueeze.methods.chess.calibrate import calibrate_threshold_sweep, calibrate_thresholds
from lmsqueeze.methods.chess.thresholds import keep_fraction
from lmsqueeze.models.tiny import tiny_model
from lmsqueeze.models.compat import cache_kw


def _batches(n=3, B=2, T=40, vocab=256):
    return [torch.randint(0, vocab, (B, T)) for _ in range(n)]


def _snapshot(model):
    """Every submodule object and (pointer, stride, values) of every parameter."""
    mods = {name: m for name, m in model.named_modules()}
    params = {name: (p, p.data_ptr(), p.stride(), p.detach().clone()) for name, p in model.named_parameters()}
    return mods, params


def _assert_restored(model, snap):
    mods, params = snap
    assert {name: m for name, m in model.named_modules()} == mods
    for name, p in model.named_parameters():
        p0, _, stride, value = params[name]
        assert p is p0 and p.stride() == stride and p.is_contiguous(), name
        assert torch.equal(p.detach(), value), name


def test_methods_are_registered():
    assert {"chess", "cats", "teal"} <= set(METHODS)
    assert METHODS["chess"] is CHESS and METHODS["cats"] is CATS and METHODS["teal"] is TEAL


def test_sparsity_zero_equals_dense(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    for method in (CHESS(sparsity=0.0), CATS(sparsity=0.0), TEAL(sparsity=0.0)):
        art = method.calibrate(model, _batches(1))
        for rows in (16, 0):  # sparse kernels for small calls / masked dense math only
            method.max_kernel_rows = rows
            with torch.no_grad(), lmsqueeze.apply(model, art) as session:
                out = model(ids).logits
                cache = session.new_cache()
                model(ids[:, :6], **cache_kw(model, cache))
                step = model(ids[:, 6:7], **cache_kw(model, cache)).logits  # 2 rows: the kernel path
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(step[:, 0], ref[:, 6], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method, family, shape", [
    (CHESS(sparsity=0.5), "llama", {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}),
    (CATS(sparsity=0.6), "qwen2", {}),
    (TEAL(sparsity=0.4), "qwen3", {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 128}),
])
def test_kernel_path_equals_masked_dense_path(method, family, shape):
    """Decode steps (batch 3) through the sparse kernels (CPU path) give the logits of the masked dense math."""
    model = tiny_model(family, **shape)
    art = method.calibrate(model, _batches())
    ids = torch.randint(0, 256, (3, 12))
    outs = []
    for rows in (16, 0):
        method.max_kernel_rows = rows
        with torch.no_grad(), lmsqueeze.apply(model, art) as session:
            cache = session.new_cache()
            model(ids[:, :8], **cache_kw(model, cache))
            outs.append(torch.cat([model(ids[:, j:j + 1], **cache_kw(model, cache)).logits for j in range(8, 12)], 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        dense = model(ids).logits[:, 8:]
    assert (outs[0] - dense).abs().max() > 1e-3  # sparsity changed something


def test_install_swaps_the_right_modules_and_undo_restores_them():
    model = tiny_model("qwen3")
    snap = _snapshot(model)
    art = CHESS(sparsity=0.5).calibrate(model, _batches(1))
    layer = model.model.layers[0]
    orig_mlp, orig_q = layer.mlp, layer.self_attn.q_proj
    with lmsqueeze.apply(model, art):
        assert isinstance(layer.mlp, SparseMLP) and layer.mlp.up_proj is orig_mlp.up_proj
        assert isinstance(layer.self_attn.q_proj, SparseLinear) and layer.self_attn.q_proj.linear is orig_q
        assert isinstance(layer.self_attn.o_proj, SparseLinear)
        assert isinstance(layer.self_attn.k_proj, nn.Linear) and isinstance(layer.self_attn.v_proj, nn.Linear)
        w = orig_mlp.down_proj.weight
        assert w.t().is_contiguous() and not w.is_contiguous()  # stored transposed in place, no copy kept
    _assert_restored(model, snap)

    art = TEAL(sparsity=0.5).calibrate(model, _batches(1))
    with pytest.raises(RuntimeError, match="boom"), lmsqueeze.apply(model, art):
        assert all(isinstance(getattr(layer.self_attn, n), SparseLinear) for n in ("q_proj", "k_proj", "v_proj"))
        assert isinstance(layer.mlp.down_proj, SparseLinear)
        raise RuntimeError("boom")
    _assert_restored(model, snap)


def test_failed_install_restores_what_it_swapped():
    model = tiny_model("llama")
    snap = _snapshot(model)
    art = CHESS(sparsity=0.5).calibrate(model, _batches(1))
    art.tensors["layers.1.gate"] = torch.zeros(7)  # wrong size: fails at layer 1, after layer 0 was swapped
    with pytest.raises(LmsqueezeError, match="gate thresholds"), lmsqueeze.apply(model, art):
        pass
    _assert_restored(model, snap)


def test_calibrate_save_load_apply(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 10))
    for method in (CHESS(sparsity=0.5, attention_sparsity=0.3), CATS(0.5), TEAL(0.5)):
        art = method.calibrate(model, _batches(2))
        loaded = lmsqueeze.load_artifact(art.save(tmp_path / method.name))
        assert loaded.method == method and loaded.tensors.keys() == art.tensors.keys()
        outs = []
        for a in (art, loaded):
            with torch.no_grad(), lmsqueeze.apply(model, a):
                outs.append(model(ids).logits)
        torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    other = tiny_model(family, seed=1)
    with pytest.raises(LmsqueezeError, match="another model"), lmsqueeze.apply(other, loaded):
        pass


def _activations(model, batches):
    """Per layer: act(gate) [N, I], q_proj input, o_proj input, gate input, down input (all [N, C])."""
    store: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def pre(site, i=i):
            return lambda m, args: store.setdefault((i, site), []).append(args[0].reshape(-1, args[0].shape[-1]))
        def post(i=i, act=layer.mlp.act_fn):
            return lambda m, args, out: store.setdefault((i, "a"), []).append(act(out).reshape(-1, out.shape[-1]))
        hooks += [layer.self_attn.q_proj.register_forward_pre_hook(pre("q")),
                  layer.self_attn.o_proj.register_forward_pre_hook(pre("o")),
                  layer.mlp.gate_proj.register_forward_pre_hook(pre("mlp")),
                  layer.mlp.down_proj.register_forward_pre_hook(pre("down")),
                  layer.mlp.gate_proj.register_forward_hook(post())]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


@pytest.mark.parametrize("kind, s", [("chess", 0.5), ("chess", 0.7), ("cats", 0.5), ("teal", 0.3)])
def test_thresholds_reach_target_sparsity_on_calibration_data(kind, s):
    model = tiny_model("llama", intermediate_size=256)
    batches = _batches(4, B=2, T=64)
    att = 0.4 if kind == "chess" else None
    t = calibrate_thresholds(model, batches, kind, s, att)
    acts = _activations(model, batches)
    for i in range(len(model.model.layers)):
        if kind in ("chess", "cats"):
            gate = t[f"layers.{i}.gate"]
            assert gate.shape == ((256,) if kind == "chess" else (1,))
            assert abs((1 - keep_fraction(acts[(i, "a")], gate)) - s) < 0.04
        if kind == "chess":
            assert len(set(t[f"layers.{i}.gate"].tolist())) > 100  # channel-wise, not one value
            for site, key in (("q", "q_in"), ("o", "o_in")):
                assert abs((1 - keep_fraction(acts[(i, site)], t[f"layers.{i}.{key}"])) - att) < 0.04
        if kind == "teal":
            for site, key in (("q", "qkv_in"), ("o", "o_in"), ("mlp", "mlp_in"), ("down", "down_in")):
                assert abs((1 - keep_fraction(acts[(i, site)], t[f"layers.{i}.{key}"])) - s) < 0.04


@pytest.mark.parametrize("kind, att", [("chess", (0.2, 0.5, 0.5)), ("teal", None)])
def test_sweep_equals_one_calibration_per_sparsity(kind, att):
    model = tiny_model("llama", intermediate_size=128)
    batches = _batches(1, B=2, T=32)
    sps = (0.3, 0.5, 0.7)
    sweep = calibrate_threshold_sweep(model, batches, kind, sps, att)
    assert len(sweep) == 3
    for j, s in enumerate(sps):
        one = calibrate_thresholds(model, batches, kind, s, None if att is None else att[j])
        assert sweep[j].keys() == one.keys()
        for k in one:
            torch.testing.assert_close(sweep[j][k], one[k], rtol=0, atol=0)
    with pytest.raises(LmsqueezeError):
        calibrate_threshold_sweep(model, batches, "chess", sps, (0.5,))


def test_chess_ranks_channels_by_importance():
    """A channel with 4x the up-activation scale gets half the gate threshold (t_i ~ 1/sqrt(E[u_i^2]))."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3] *= 4
    t = calibrate_thresholds(model, _batches(2), "chess", 0.5)["layers.0.gate"]
    t_ref = calibrate_thresholds(tiny_model("llama"), _batches(2), "chess", 0.5)["layers.0.gate"]
    assert t[3] < 0.5 * t.median() and t_ref[3] > 0.5 * t_ref.median()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_sparsity_raises(bad):
    for cls in (CHESS, CATS, TEAL):
        with pytest.raises(LmsqueezeError, match="sparsity"):
            cls(sparsity=bad)
    if bad is not None:  # None means "same as sparsity"
        with pytest.raises(LmsqueezeError, match="attention_sparsity"):
            CHESS(sparsity=0.5, attention_sparsity=bad)


def test_bad_inputs_raise():
    model = tiny_model("llama")
    with pytest.raises(LmsqueezeError, match="max_kernel_rows"):
        CHESS(max_kernel_rows=17)
    with pytest.raises(LmsqueezeError, match="token ids"):
        CHESS().calibrate(model, [torch.randn(2, 8)])
    with pytest.raises(LmsqueezeError, match="no batches"):
        CHESS().calibrate(model, [])
    with pytest.raises(LmsqueezeError, match="needs calibration"), lmsqueeze.apply(model, CHESS()):
        pass
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")  # NaN reaches every later input
    for method in (CHESS(), CATS(), TEAL()):
        with pytest.raises(LmsqueezeError, match="NaN"):
            method.calibrate(model, _batches(1))


def test_padding_is_ignored_in_calibration():
    """Padded positions (attention_mask 0) do not move the thresholds."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 30))
    padded = torch.cat([ids, torch.randint(0, 256, (1, 10))], 1)
    mask = torch.cat([torch.ones(1, 30), torch.zeros(1, 10)], 1).long()
    a = calibrate_thresholds(model, [ids], "cats", 0.5)
    b = calibrate_thresholds(model, [{"input_ids": padded, "attention_mask": mask}], "cats", 0.5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_generate_with_sparsity_zero_matches_dense():
    """lmsqueeze.generate (static decode step) with CHESS at sparsity 0 picks the dense greedy tokens."""
    from lmsqueeze.generation import generate

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 7))
    art = CHESS(sparsity=0.0).calibrate(model, _batches(1))
    dense = generate(model, ids, max_new_tokens=6).new_tokens
    assert torch.equal(generate(model, ids, max_new_tokens=6, method=art).new_tokens, dense)
