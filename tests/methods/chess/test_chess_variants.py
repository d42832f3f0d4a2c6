"""CHESS's variants: the W_down-weighted channel rule and the greedy per-layer sparsity allocation."""

from __future__ import annotations

import pytest
import torch

import lmsqueeze
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.chess import CHESS
from lmsqueeze.methods.chess.allocate import (
    allocation_levels,
    calibration_loss,
    combine_levels,
    greedy_allocation,
)
from lmsqueeze.methods.chess.calibrate import as_batches, calibrate_threshold_sweep, calibrate_thresholds
from lmsqueeze.methods.chess.thresholds import channel_thresholds, channel_weight, keep_fraction
from lmsqueeze.models.tiny import tiny_model


def _batches(n=2, B=2, T=48, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (B, T), generator=g) for _ in range(n)]


def _gate_acts(model, batches):
    """Per layer: act(gate_proj(x)) [N, I] on the dense model."""
    acts, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.gate_proj.register_forward_hook(
            lambda m, a, o, i=i, act=layer.mlp.act_fn: acts.setdefault(i, []).append(act(o).reshape(-1, o.shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in acts.items()}


def test_wdown_rule_weights_channels_by_down_column_norm():
    """Scaling W_down[:, 5] by 4 lowers channel 5's threshold 4x under 'wdown' and leaves 'paper' alone."""
    model = tiny_model("llama", intermediate_size=96)
    batches = _batches()
    base = {r: calibrate_thresholds(model, batches, "chess", 0.5, rule=r)["layers.0.gate"] for r in ("paper", "wdown")}
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 4
    new = {r: calibrate_thresholds(model, batches, "chess", 0.5, rule=r)["layers.0.gate"] for r in ("paper", "wdown")}
    torch.testing.assert_close(new["paper"], base["paper"])
    ratio = base["wdown"][5] / new["wdown"][5]
    others = torch.ones(96, dtype=torch.bool)
    others[5] = False
    # tau moves a little (one channel's importance changed); channel 5's threshold moves 4x relative to the rest
    rel = ratio / (base["wdown"][others] / new["wdown"][others]).median()
    assert abs(float(rel) - 4.0) < 0.2


def test_wdown_thresholds_reach_target_and_match_formula():
    model = tiny_model("qwen2", intermediate_size=128)
    batches = _batches(3)
    t = calibrate_thresholds(model, batches, "chess", 0.6, rule="wdown")
    acts = _gate_acts(model, batches)
    for i in range(len(model.model.layers)):
        assert abs((1 - keep_fraction(acts[i], t[f"layers.{i}.gate"])) - 0.6) < 0.05
    c = channel_weight(torch.tensor([1.0, 4.0, 0.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 2.0]]), "wdown")
    torch.testing.assert_close(c, torch.tensor([2.0, 4.0, 0.0]))
    torch.testing.assert_close(channel_thresholds(torch.tensor(8.0), c), torch.tensor([2.0, 2 ** 0.5, float("inf")]))
    with pytest.raises(LmsqueezeError, match="rule"):
        calibrate_thresholds(model, batches, "chess", 0.5, rule="nope")
    with pytest.raises(LmsqueezeError, match="rule"):
        CHESS(rule="nope")


def test_allocation_levels_and_combine():
    assert allocation_levels(0.25) == [0.0, 0.25, 0.5, 0.75]
    assert allocation_levels(0.05)[-1] == 0.95 and len(allocation_levels(0.05)) == 20
    with pytest.raises(LmsqueezeError, match="allocation_step"):
        allocation_levels(0.0)
    lv = [{"layers.0.gate": torch.full((4,), float(j)), "layers.1.gate": torch.full((4,), 10.0 + j),
           "layers.0.q_in": torch.tensor([7.0])} for j in range(3)]
    out = combine_levels(lv, [2, 1])
    assert out["layers.0.gate"][0] == 2 and out["layers.1.gate"][0] == 11 and out["layers.0.q_in"][0] == 7


def test_greedy_allocation_takes_the_cheapest_step_and_keeps_the_mean():
    """Each greedy step raises the layer whose raise costs the least calibration loss (checked against the
    candidates computed here), the reported loss is the allocation's, and the mean sparsity hits each target."""
    model = tiny_model("llama", num_hidden_layers=3, intermediate_size=64)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight *= 1e-3  # a layer whose channels cost ~nothing to drop
    batches = as_batches(_batches(2))
    levels = allocation_levels(0.25)
    sweep = calibrate_threshold_sweep(model, [{"input_ids": b, "attention_mask": m} for b, m in batches], "chess",
                                      levels, None)
    one = 0.25 / 3  # one increment of one layer
    got = greedy_allocation(model, batches, sweep, levels, [one, 0.25])
    cand = [calibration_loss(model, batches, combine_levels(sweep, [int(i == j) for j in range(3)])) for i in range(3)]
    assert got[one]["levels"] == [int(i == min(range(3), key=cand.__getitem__)) for i in range(3)]
    assert got[one]["levels"][1] == 1  # the cheap layer goes first
    for target, a in got.items():
        assert sum(a["sparsities"]) / 3 == pytest.approx(target)
        assert a["loss"] == pytest.approx(calibration_loss(model, batches, combine_levels(sweep, a["levels"])))
    assert all(x <= y for x, y in zip(got[one]["levels"], got[0.25]["levels"]))  # one greedy path
    with pytest.raises(LmsqueezeError, match="targets"):
        greedy_allocation(model, batches, sweep, levels, [0.8])


def test_greedy_chess_method_end_to_end(tmp_path):
    """CHESS(allocation='greedy') calibrates, records its per-layer sparsities, saves/loads and applies."""
    model = tiny_model("qwen3", num_hidden_layers=2, intermediate_size=64)
    method = CHESS(sparsity=0.5, rule="wdown", allocation="greedy", allocation_step=0.25)
    art = method.calibrate(model, _batches(1))
    sp = art.meta["layer_sparsities"]
    assert len(sp) == 2 and sum(sp) / 2 == pytest.approx(0.5)
    assert {"layers.0.q_in", "layers.1.o_in"} <= art.tensors.keys()
    loaded = lmsqueeze.load_artifact(art.save(tmp_path / "g"))
    assert loaded.method == method
    ids = torch.randint(0, 256, (1, 12))
    outs = []
    for a in (art, loaded):
        with torch.no_grad(), lmsqueeze.apply(model, a):
            outs.append(model(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    with pytest.raises(LmsqueezeError, match="multiple"):
        CHESS(sparsity=0.33, allocation="greedy", allocation_step=0.05)
    with pytest.raises(LmsqueezeError, match="allocation"):
        CHESS(allocation="best")
