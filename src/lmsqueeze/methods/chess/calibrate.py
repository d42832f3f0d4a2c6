"""Calibration of activation thresholds for CHESS, CATS and TEAL: forward hooks on the dense model.

Every threshold is computed per calibration batch and then averaged over batches (the CHESS reference
code does the same over its 16 groups of 8,192 tokens), so memory stays at one layer's activations of one
batch. CHESS needs two passes: the first accumulates E[(W_up x)^2] per channel, the second computes the
per-layer importance quantile tau with it.

Threshold sites (artifact tensor `layers.{i}.{site}`):
  gate    [I]  keep FFN channel i iff |act(W_gate x)_i| > t_i       (CHESS: per channel; CATS: one value)
  q_in    [1]  input of q_proj (k_proj, v_proj stay dense)            (CHESS attention)
  qkv_in  [1]  input of q_proj, k_proj, v_proj                        (TEAL)
  o_in    [1]  input of o_proj                                        (CHESS attention, TEAL)
  mlp_in  [1]  input of gate_proj and up_proj                         (TEAL)
  down_in [1]  input of down_proj                                     (TEAL)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.chess.thresholds import (
    channel_thresholds,
    channel_weight,
    check_finite,
    check_rule,
    importance_threshold,
    magnitude_threshold,
)

log = logging.getLogger(__name__)

KINDS = ("chess", "cats", "teal")


def as_batches(batches) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Normalise calibration batches to a list of (input_ids [B, T], attention_mask [B, T] | None).

    Accepts tensors of token ids ([T] or [B, T]) or mappings with `input_ids` (and `attention_mask`).
    """
    if batches is None:
        raise LmsqueezeError("calibration needs batches of token ids: e.g. [torch.tensor([[1, 2, 3, ...]])]")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    out = []
    for b in batches:
        mask = None
        if isinstance(b, Mapping):
            if "input_ids" not in b:
                raise LmsqueezeError("a calibration batch given as a dict needs an 'input_ids' entry")
            ids, mask = b["input_ids"], b.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape != torch.as_tensor(ids).shape:
                raise LmsqueezeError("a calibration batch's attention_mask must have the shape of its input_ids")
        else:
            ids = b
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
            mask = mask[None] if isinstance(mask, torch.Tensor) and mask.dim() == 1 else mask
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise LmsqueezeError(
                f"calibration batches must be integer token ids of shape [B, T], got {tuple(ids.shape)} "
                f"{ids.dtype}"
            )
        out.append((ids, None if mask is None else torch.as_tensor(mask).bool()))
    if not out:
        raise LmsqueezeError("calibration got no batches; pass at least one batch of token ids")
    return out


class _Recorder:
    """Per-batch statistics of hooked activations, keyed by (layer, site)."""

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None  # [B, T] bool for the batch being run
        self.per_batch: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
        self.sq_sum: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = defaultdict(int)

    def tokens(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """x: [B, T, C] -> [N, C] (the valid tokens), after a NaN check."""
        check_finite(x, where)
        x = x.detach()
        if self.valid is not None:
            return x[self.valid.to(x.device)]
        return x.reshape(-1, x.shape[-1])


def _scalar_pre_hook(rec: _Recorder, layer: int, site: str, sparsities: tuple[float, ...]):
    def hook(module, args):
        x = rec.tokens(args[0], f"layer {layer} {site}")
        for s in sparsities:
            rec.per_batch[(layer, site, s)].append(magnitude_threshold(x, s))
    return hook


def _cats_gate_hook(rec: _Recorder, layer: int, act, sparsities: tuple[float, ...]):
    def hook(module, args, out):
        a = act(rec.tokens(out, f"layer {layer} gate_proj").float())
        for s in sparsities:
            rec.per_batch[(layer, "gate", s)].append(magnitude_threshold(a, s))
    return hook


def _up_square_hook(rec: _Recorder, layer: int):
    def hook(module, args, out):
        u = rec.tokens(out, f"layer {layer} up_proj").float()
        s = u.square().sum(0)
        rec.sq_sum[layer] = s if layer not in rec.sq_sum else rec.sq_sum[layer] + s
        rec.count[layer] += u.shape[0]
    return hook


def _chess_gate_hook(rec: _Recorder, layer: int, act, weight: torch.Tensor, sparsities: tuple[float, ...]):
    def hook(module, args, out):
        a = act(rec.tokens(out, f"layer {layer} gate_proj").float())
        for s in sparsities:
            rec.per_batch[(layer, "tau", s)].append(importance_threshold(a, weight, s))
    return hook


@torch.no_grad()
def _run(model, batches, rec: _Recorder, hooks: list) -> None:
    """Run the dense model over every batch with `hooks` = [(module, kind, fn)] installed, then remove them."""
    device = next(model.parameters()).device
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        for ids, mask in batches:
            rec.valid = mask
            model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device).long(),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
        rec.valid = None


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.float().cpu() for v in values]).mean(0)


def calibrate_thresholds(model, batches, kind: str, sparsity: float, attention_sparsity: float | None = None,
                         rule: str = "paper") -> dict[str, torch.Tensor]:
    """Thresholds for `kind` ('chess', 'cats' or 'teal') on the dense model, as artifact tensors.

    sparsity: target fraction of zeroed FFN activations (TEAL: of every linear's input); attention_sparsity:
    CHESS's fraction for the q_proj/o_proj inputs (None: no attention sparsification); rule: CHESS's channel
    importance (`thresholds.CHANNEL_RULES`). Returns {"layers.{i}.{site}": float32 tensor} (sites above).
    """
    att = None if attention_sparsity is None else [attention_sparsity]
    return calibrate_threshold_sweep(model, batches, kind, [sparsity], att, rule)[0]


def calibrate_threshold_sweep(model, batches, kind: str, sparsities, attention_sparsities=None, rule: str = "paper"
                              ) -> list[dict[str, torch.Tensor]]:
    """`calibrate_thresholds` for several sparsities from one pass over the batches (two for CHESS).

    sparsities: [S] targets; attention_sparsities: [S] CHESS q_proj/o_proj targets (pairs with sparsities)
    or None. Returns S dicts of artifact tensors, in the order given.
    """
    check_rule(rule)
    if kind not in KINDS:
        raise LmsqueezeError(f"unknown threshold kind {kind!r}; use one of {', '.join(KINDS)}")
    sps = tuple(float(s) for s in sparsities)
    atts = None if attention_sparsities is None else tuple(float(s) for s in attention_sparsities)
    if not sps or (atts is not None and len(atts) != len(sps)):
        raise LmsqueezeError("give one attention sparsity per FFN sparsity (or none)")
    data = as_batches(batches)
    layers = model.model.layers
    rec = _Recorder()
    hooks = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if kind == "teal":
            hooks += [(attn.q_proj, "pre", _scalar_pre_hook(rec, i, "qkv_in", sps)),
                      (attn.o_proj, "pre", _scalar_pre_hook(rec, i, "o_in", sps)),
                      (mlp.gate_proj, "pre", _scalar_pre_hook(rec, i, "mlp_in", sps)),
                      (mlp.down_proj, "pre", _scalar_pre_hook(rec, i, "down_in", sps))]
        elif kind == "cats":
            hooks.append((mlp.gate_proj, "post", _cats_gate_hook(rec, i, mlp.act_fn, sps)))
        else:
            hooks.append((mlp.up_proj, "post", _up_square_hook(rec, i)))
            if atts is not None:
                hooks += [(attn.q_proj, "pre", _scalar_pre_hook(rec, i, "q_in", tuple(dict.fromkeys(atts)))),
                          (attn.o_proj, "pre", _scalar_pre_hook(rec, i, "o_in", tuple(dict.fromkeys(atts))))]
    _run(model, data, rec, hooks)
    outs: list[dict[str, torch.Tensor]] = []
    for j, s in enumerate(sps):
        want = s if kind != "chess" else (None if atts is None else atts[j])
        outs.append({f"layers.{i}.{site}": _mean(v).reshape(-1) for (i, site, t), v in rec.per_batch.items()
                     if t == want})
    if kind == "chess":
        if any(rec.count[i] == 0 for i in range(len(layers))):
            raise LmsqueezeError("calibration saw no valid tokens; pass batches with unpadded tokens")
        weight = {i: channel_weight(rec.sq_sum[i] / rec.count[i], layer.mlp.down_proj.weight, rule)
                  for i, layer in enumerate(layers)}
        rec2 = _Recorder()
        hooks = [(layer.mlp.gate_proj, "post", _chess_gate_hook(rec2, i, layer.mlp.act_fn, weight[i], sps))
                 for i, layer in enumerate(layers)]
        _run(model, data, rec2, hooks)
        for out, s in zip(outs, sps):
            for i in range(len(layers)):
                tau = _mean(rec2.per_batch[(i, "tau", s)])
                out[f"layers.{i}.gate"] = channel_thresholds(tau, weight[i].float().cpu())
    log.info("calibrated %s thresholds for %d layers on %d batches at sparsities %s", kind, len(layers), len(data),
             sps)
    return [dict(sorted(o.items())) for o in outs]
