"""Swap a model's linears / MLPs for sparse ones from an artifact's thresholds, and undo it exactly.

Shared by CHESS, CATS and TEAL: the artifact's tensors `layers.{i}.{site}` (sites in `calibrate.py`) say
which modules of layer i become sparse:
  gate    -> layer.mlp becomes a SparseMLP (gate dense, up output-sparse, down input-sparse)
  q_in    -> self_attn.q_proj                      qkv_in -> self_attn.q_proj, k_proj, v_proj
  o_in    -> self_attn.o_proj                      mlp_in -> mlp.gate_proj, mlp.up_proj
  down_in -> mlp.down_proj
Attention itself (the cache, the softmax) is untouched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.chess.sparse_linear import SparseLinear, SparseMLP

log = logging.getLogger(__name__)

LINEAR_SITES = {
    "q_in": ("self_attn", ("q_proj",)),
    "qkv_in": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o_in": ("self_attn", ("o_proj",)),
    "mlp_in": ("mlp", ("gate_proj", "up_proj")),
    "down_in": ("mlp", ("down_proj",)),
}
SITES = ("gate", *LINEAR_SITES)
_KEY = re.compile(r"layers\.(\d+)\.(\w+)$")


def _parse(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[int, dict[str, torch.Tensor]]:
    by_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(num_layers)}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in SITES or int(m.group(1)) >= num_layers:
            raise LmsqueezeError(f"artifact tensor {key!r} is not a threshold of this {num_layers}-layer model; "
                                 "calibrate again")
        if bool(torch.isnan(value).any()):
            raise LmsqueezeError(f"artifact tensor {key!r} holds NaN; calibrate again")
        by_layer[int(m.group(1))][m.group(2)] = value
    return by_layer


def _relayout_transposed(w: torch.Tensor, undo: list[Callable[[], None]]) -> None:
    """Store w: [N, K] column-major in place (same parameter, same values); push the inverse on `undo`."""
    if w.dim() != 2 or not w.is_contiguous() or w.t().is_contiguous():
        return
    with torch.no_grad():
        w.data = w.data.t().contiguous().t()

    def restore() -> None:
        with torch.no_grad():
            w.data = w.data.contiguous()

    undo.append(restore)


def _swap(owner: nn.Module, name: str, new: nn.Module, undo: list[Callable[[], None]]) -> None:
    old = getattr(owner, name)
    setattr(owner, name, new)
    undo.append(lambda: setattr(owner, name, old))


def install_thresholds(model, tensors: dict[str, torch.Tensor], max_kernel_rows: int) -> Callable[[], None]:
    """Swap in the sparse modules that `tensors` describe; return an undo that restores the exact originals.

    If anything fails half-way, what was already swapped is restored before the error propagates.
    """
    layers = model.model.layers
    by_layer = _parse(tensors, len(layers))
    undo: list[Callable[[], None]] = []

    def undo_all() -> None:
        errors = []
        while undo:
            try:
                undo.pop()()
            except Exception as e:  # noqa: BLE001 - keep restoring the rest
                errors.append(e)
        if errors:
            raise errors[0]

    try:
        for i, layer in enumerate(layers):
            sites = by_layer[i]
            mlp = layer.mlp
            if "gate" in sites:
                if "mlp_in" in sites or "down_in" in sites:
                    raise LmsqueezeError(f"layer {i}: an artifact cannot hold both gate and mlp_in/down_in "
                                         "thresholds; calibrate again")
                t = sites["gate"].reshape(-1)
                inter = mlp.gate_proj.out_features
                if t.numel() not in (1, inter):
                    raise LmsqueezeError(f"layer {i}: gate thresholds have {t.numel()} entries, the MLP has "
                                         f"{inter} channels; calibrate on this model")
                _relayout_transposed(mlp.down_proj.weight, undo)
                _swap(layer, "mlp", SparseMLP(mlp, t.expand(inter).contiguous(), max_kernel_rows), undo)
            for site, (owner_name, names) in LINEAR_SITES.items():
                if site not in sites:
                    continue
                owner = getattr(layer, owner_name)
                threshold = float(sites[site].reshape(-1)[0])
                for name in names:
                    lin = getattr(owner, name)
                    if not isinstance(lin, nn.Linear):
                        raise LmsqueezeError(f"layer {i}: {owner_name}.{name} is a {type(lin).__name__}, not an "
                                             "nn.Linear; apply sparsity to an unmodified model")
                    _relayout_transposed(lin.weight, undo)
                    _swap(owner, name, SparseLinear(lin, threshold, max_kernel_rows), undo)
    except BaseException:
        undo_all()
        raise
    log.debug("installed sparse modules in %d layers", len(layers))
    return undo_all
