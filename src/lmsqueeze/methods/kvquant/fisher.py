"""Capture pre-RoPE keys and values (and their LM-loss gradients) of a few layers at a time.

Forward hooks on each attention module's key output (`k_norm` where the family has one, else `k_proj`) and
`v_proj` replace the activation with a detached leaf that requires grad. Backward from the LM loss then
yields d loss / d K and d loss / d V for exactly those layers (nothing below them is differentiated, no
parameter gradients are kept); the caller reduces them to histograms layer by layer and drops them, so the
gradients of all layers never exist at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmsqueeze.errors import LmsqueezeError


@dataclass
class Captured:
    """One batch's activations of one layer: k, v: [B, T, Hkv, D]; .grad filled after backward."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class Batch:
    """input_ids: [B, T]; mask: [B, T] (1 = token); keep: [B, T] bool tokens used for statistics."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor = field(default=None)


def as_batches(batches, device: torch.device, sink_tokens: int) -> list[Batch]:
    """Calibration batches (tensors [B, T] or [T], or dicts with input_ids / attention_mask) -> Batch list.

    `keep` leaves out padding and the first `sink_tokens` tokens of each sequence (kept in fp16 at inference).
    """
    if isinstance(batches, (torch.Tensor, dict)):
        batches = [batches]
    out = []
    for b in batches:
        ids, mask = (b.get("input_ids"), b.get("attention_mask")) if isinstance(b, dict) else (b, None)
        if not isinstance(ids, torch.Tensor):
            raise LmsqueezeError("calibration batches must be token-id tensors [B, T] or dicts with input_ids")
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.ones_like(ids) if mask is None else (mask[None] if mask.dim() == 1 else mask)
        rank = mask.long().cumsum(-1) - 1
        keep = mask.bool() & (rank >= sink_tokens)
        out.append(Batch(ids.to(device), mask.to(device), keep.to(device)))
    if not out or not any(bool(b.keep.any()) for b in out):
        raise LmsqueezeError(f"calibration needs tokens beyond the first {sink_tokens} of a sequence; "
                             "pass more or longer batches")
    return out


def key_module(attn) -> torch.nn.Module:
    """The module whose output is the pre-RoPE key (after Qwen3's k_norm)."""
    return attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj


@contextlib.contextmanager
def capture(model, layers: list[int], grad: bool) -> Iterator[dict[int, Captured]]:
    """Hook the keys/values of `layers`; yields {layer: Captured} refilled at every forward."""
    store = {i: Captured() for i in layers}
    handles = []

    def hook(i: int, which: str):
        def fn(mod, inp, out):
            shaped = out.reshape(*out.shape[:2], -1, model.model.layers[i].self_attn.head_dim)
            if not torch.isfinite(shaped).all():
                raise LmsqueezeError(f"calibration {which} activations of layer {i} contain NaN or inf; check "
                                     "the model weights or load it in float32")
            leaf = shaped.detach().requires_grad_(grad)
            setattr(store[i], which, leaf)
            return leaf.reshape(out.shape)
        return fn

    try:
        for i in layers:
            attn = model.model.layers[i].self_attn
            handles.append(key_module(attn).register_forward_hook(hook(i, "k")))
            handles.append(attn.v_proj.register_forward_hook(hook(i, "v")))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """No parameter gradients (restored on exit); eval mode."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def run(model, batch: Batch, grad: bool) -> None:
    """One forward (and, with `grad`, backward of the LM loss over non-padding tokens)."""
    labels = batch.input_ids.masked_fill(batch.mask == 0, -100)
    with torch.set_grad_enabled(grad):
        out = model(input_ids=batch.input_ids, attention_mask=batch.mask, labels=labels if grad else None,
                    use_cache=False)
        if grad:
            if not torch.isfinite(out.loss):
                raise LmsqueezeError("the calibration loss is NaN or inf; check the model or load it in float32")
            out.loss.backward()
