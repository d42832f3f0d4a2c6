"""Capture a fixed context's KV from a model: one chunked dense forward, keys stored at relative positions.

Convention (shared by Squeezed Attention and the baselines of methods/baselines that prepare a context):
token i of an S-token fixed context is stored with RoPE at position i - S, so the cache that later holds
the user input starts at position 0 and `get_seq_length()` counts user and generated tokens only. RoPE
attention depends on position differences alone, so this equals attending the context at 0..S-1 and the
user input at S, S+1, ... (exactly, up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.cache import LayerState, SqueezeCache, Step
from lmsqueeze.methods.slot_attention import slot_attention
from lmsqueeze.models.rope import apply_rope, rope_tables


@dataclass
class CapturedLayer:
    """keys, values: [Hkv, S, D] (keys RoPE'd at i - S); q_obs: [Hq, W, D] queries of the last W tokens
    (same convention); scaling: the layer's softmax scale; window: its sliding window or None."""

    keys: torch.Tensor
    values: torch.Tensor
    q_obs: torch.Tensor
    scaling: float
    window: int | None


class _CaptureState(LayerState):
    """Dense attention (absolute positions, as the model computes it) that also records what prepare needs."""

    def __init__(self, total: int, observation: int) -> None:
        super().__init__()
        self.total, self.observation = total, observation
        self.k_abs: list[torch.Tensor] = []
        self.k_rel: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.q_obs: list[torch.Tensor] = []
        self.scaling = 1.0
        self.window: int | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        self.scaling, self.window = step.scaling, step.window
        q_abs = apply_rope(q, step.cos, step.sin)
        self.k_abs.append(apply_rope(k, step.cos, step.sin))
        rel = step.positions - self.total
        cos_r, sin_r = rope_tables(step.rotary, rel, torch.float32)
        self.k_rel.append(apply_rope(k.float(), cos_r, sin_r).to(k.dtype))
        self.v.append(v)
        obs = rel[0] >= -self.observation
        if bool(obs.any()):
            self.q_obs.append(apply_rope(q.float(), cos_r, sin_r)[:, :, obs].to(q.dtype))
        start = self.length
        self.length += q.shape[2]
        keys = torch.cat(self.k_abs, 2)
        values = torch.cat(self.v, 2)
        return slot_attention(q_abs, keys, values, start, None, step.window, step.scaling)


@torch.inference_mode()
def capture_context(model, context_ids, observation: int, chunk_size: int = 2048) -> list[CapturedLayer]:
    """Run the fixed context through `model` (dense) and return per layer its KV at relative positions and
    the queries of its last `observation` tokens. context_ids: [S] or [1, S] token ids (or a list)."""
    import lmsqueeze
    from lmsqueeze.eval.decoding import prefill

    ids = torch.as_tensor(context_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise LmsqueezeError(f"the fixed context must be one non-empty sequence of token ids, got shape "
                             f"{tuple(ids.shape)}")
    S = ids.numel()
    if observation < 0 or observation >= S:
        raise LmsqueezeError(f"observation ({observation}) must be in [0, {S}) for a {S}-token fixed context")
    num_layers = len(model.model.layers)
    cache = SqueezeCache(lambda i: _CaptureState(S, observation), num_layers)
    with lmsqueeze.apply(model, None):
        prefill(model, ids, cache, chunk_size)
    out = []
    hq = model.config.num_attention_heads
    for st in cache.layers:
        keys = torch.cat(st.k_rel, 2)[0]
        q_obs = torch.cat(st.q_obs, 2)[0] if st.q_obs else keys.new_zeros(hq, 0, keys.shape[-1])
        out.append(CapturedLayer(keys=keys, values=torch.cat(st.v, 2)[0], q_obs=q_obs, scaling=st.scaling,
                                 window=st.window))
    return out


def reuse_capture(model, context_ids, observation: int, chunk_size: int = 2048,
                  captured: list[CapturedLayer] | None = None) -> list[CapturedLayer]:
    """`capture_context`, or a previous capture of the same context (with at least `observation` observation
    queries) cut down to the last `observation` queries: several methods prepared from one forward."""
    if captured is None:
        return capture_context(model, context_ids, observation, chunk_size)
    if len(captured) != len(model.model.layers) or any(c.q_obs.shape[1] < observation for c in captured):
        raise LmsqueezeError(f"the capture passed has {len(captured)} layers and {captured[0].q_obs.shape[1]} "
                             f"observation queries; this model needs {len(model.model.layers)} layers and "
                             f"{observation} queries: capture with observation >= {observation}")
    return [CapturedLayer(c.keys, c.values, c.q_obs[:, c.q_obs.shape[1] - observation:], c.scaling, c.window)
            for c in captured]


def context_positions(S: int, device=None) -> torch.Tensor:
    """Relative positions of an S-token fixed context: [S] int64 = -S .. -1."""
    return torch.arange(S, device=device) - S


@dataclass
class FixedKV:
    """A prepared fixed context on a device, in context order: keys, values [Hkv, S, D], positions [Hkv, S]
    int32 (relative), plus a method's own tensors in `extra`."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    extra: dict

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], device, dtype: torch.dtype) -> FixedKV:
        keys = t["keys"].to(device=device, dtype=dtype).contiguous()
        Hkv, S, _ = keys.shape
        pos = context_positions(S, device).to(torch.int32)[None].expand(Hkv, -1).contiguous()
        extra = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)).contiguous()
                 for k, v in t.items() if k not in ("keys", "values")}
        return cls(keys=keys, values=t["values"].to(device=device, dtype=dtype).contiguous(), positions=pos,
                   extra=extra)


def prepare_fixed_context(method, model, context_ids, observation: int = 0, per_layer=None,
                          chunk_size: int = 2048, meta: dict | None = None,
                          captured: list[CapturedLayer] | None = None):
    """An artifact holding a fixed context's KV per layer (context order, relative RoPE) for the baselines.

    per_layer(layer_idx, CapturedLayer) -> dict of extra tensors for that layer (e.g. SnapKV's rows);
    captured: a `capture_context` of this context to reuse (see `reuse_capture`).
    """
    from lmsqueeze.methods.base import Artifact, model_fingerprint
    from lmsqueeze.methods.squeezed.prepare import context_ids_from

    ids = context_ids_from(context_ids)
    layers = reuse_capture(model, ids, observation, chunk_size, captured)
    tensors: dict[str, torch.Tensor] = {"context_ids": ids.cpu()}
    for i, cap in enumerate(layers):
        tensors[f"layers.{i}.keys"] = cap.keys.cpu()
        tensors[f"layers.{i}.values"] = cap.values.cpu()
        for k, v in (per_layer(i, cap) if per_layer else {}).items():
            tensors[f"layers.{i}.{k}"] = v.cpu()
    return Artifact(method=method, fingerprint=model_fingerprint(model), tensors=tensors,
                    meta={"context_tokens": ids.numel(), **(meta or {})})
