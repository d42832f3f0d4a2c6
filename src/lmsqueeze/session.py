"""`apply(model, method)`: patch a model's attention (and modules) for a method, restore on exit."""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.rmsnorm import fused_rms_norm_forward
from lmsqueeze.methods.base import Artifact, Method
from lmsqueeze.methods.cache import SqueezeCache, Step
from lmsqueeze.methods.dense import Dense
from lmsqueeze.methods.slot_attention import slot_attention
from lmsqueeze.models.attention import lmsqueeze_attention_forward
from lmsqueeze.models.compat import cache_kwarg, passed_cache
from lmsqueeze.models.families import attention_modules, sliding_window
from lmsqueeze.models.rope import apply_rope

ATTN_IMPL = "lmsqueeze"  # not a registered mask function: transformers then builds no 4D mask


class Session:
    """A model patched for one method. Make caches with `new_cache()`."""

    def __init__(self, model, method: Method, artifact: Artifact | None) -> None:
        self.model = model
        self.method = method
        self.artifact = artifact
        self.num_layers = len(model.model.layers)
        # one-shot state (calls without an lmsqueeze cache): fresh per forward
        self._oneshot: SqueezeCache | None = None
        self._foreign_valid: torch.Tensor | None = None

    def new_cache(self, batch_size: int | None = None, max_length: int | None = None) -> SqueezeCache:
        """An empty cache for this method; `max_length` preallocates that many slots per layer."""
        if max_length is not None and max_length <= 0:
            raise LmsqueezeError(f"max_length must be positive, got {max_length}")
        return SqueezeCache(
            lambda i: self.method.new_layer_state(i, self.artifact, max_length), self.num_layers,
            batch_size=batch_size, max_length=max_length,
        )

    # called by the decoder's forward pre-hook, before any layer runs
    def begin_forward(self, attention_mask: torch.Tensor | None, num_new: int, cache) -> None:
        if isinstance(cache, SqueezeCache):
            cache.begin_forward(attention_mask, num_new)
            return
        if attention_mask is not None and attention_mask.dim() != 2:
            raise LmsqueezeError("lmsqueeze takes a 2D attention_mask [batch, length]")
        self._foreign_valid = attention_mask.bool() if attention_mask is not None else None
        if isinstance(self.method, Dense):
            return
        if isinstance(cache, Cache) and (cache.get_seq_length() > 0 or getattr(cache, "_lmsqueeze_seen", False)):
            raise LmsqueezeError(
                f"the {self.method.name} method needs its own cache: pass past_key_values=session.new_cache()"
            )
        self._oneshot = self.new_cache()
        self._oneshot.begin_forward(attention_mask, num_new)

    def attend(self, module, q, k, v, cos, sin, positions, cache) -> torch.Tensor:
        """Route one layer's attention to the backend. q: [B, Hq, T, D], k/v: [B, Hkv, T, D] pre-RoPE."""
        idx = module.layer_idx
        if positions is None:
            positions = torch.arange(q.shape[2], device=q.device)[None].expand(q.shape[0], -1)
        static = {}
        if isinstance(cache, SqueezeCache):
            state, valid = cache.layers[idx], cache.pending_valid
            if cache.slot is not None and q.shape[2] == 1:
                static = dict(lengths=cache.lengths, slot=cache.slot, starts=cache.starts)
        elif isinstance(self.method, Dense):
            return self._dense_foreign(module, q, k, v, cos, sin, cache)
        else:
            if self._oneshot is None:
                raise LmsqueezeError("the patched model was called without going through its decoder")
            if isinstance(cache, Cache):  # mark it: reusing it later would silently drop this context
                cache._lmsqueeze_seen = True
            state, valid = self._oneshot.layers[idx], self._oneshot.pending_valid
        step = Step(cos=cos, sin=sin, positions=positions, valid=valid, scaling=module.scaling,
                    window=sliding_window(module), layer_idx=idx, rotary=self.model.model.rotary_emb, **static)
        return state.attend(q, k, v, step)

    def _dense_foreign(self, module, q, k, v, cos, sin, cache) -> torch.Tensor:
        """Dense attention with a transformers cache (or none): exactly what unpatched transformers does."""
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        start = 0
        if isinstance(cache, Cache):
            start = cache.get_seq_length(module.layer_idx)
            k, v = cache.update(k, v, module.layer_idx)
        valid = self._foreign_valid
        if valid is not None:
            if valid.shape[1] != k.shape[2]:
                valid = valid[:, -k.shape[2]:] if valid.shape[1] > k.shape[2] else None
            if valid is not None and bool(valid.all()):
                valid = None
        return slot_attention(q, k, v, start, valid, sliding_window(module), module.scaling)


def _as_method(method_or_artifact) -> tuple[Method, Artifact | None]:
    if method_or_artifact is None:
        return Dense(), None
    if isinstance(method_or_artifact, Artifact):
        return method_or_artifact.method, method_or_artifact
    if isinstance(method_or_artifact, Method):
        if method_or_artifact.needs_calibration:
            raise LmsqueezeError(
                f"the {method_or_artifact.name} method needs calibration: artifact = "
                f"method.calibrate(model, batches) (fixed-context methods: method.prepare(model, context_ids)), "
                f"then apply(model, artifact)"
            )
        return method_or_artifact, None
    raise LmsqueezeError(
        f"apply() takes a method config, an artifact or None, not {type(method_or_artifact).__name__}"
    )


def _decoder_pre_hook(session: Session, signature: inspect.Signature):
    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        num_new = (ids if ids is not None else embeds).shape[1]
        session.begin_forward(bound.get("attention_mask"), num_new, passed_cache(bound))
    return hook


@contextlib.contextmanager
def apply(model, method=None) -> Iterator[Session]:
    """Patch `model` for `method` (a method config, an artifact, or None for Dense); restore on exit.

    Inside the block `model(...)` and `model.generate(...)` run the method; `generate` without
    `past_key_values` gets `session.new_cache()` automatically.
    """
    modules = attention_modules(model)
    rms_norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")
                 and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None]
    if getattr(model, "_lmsqueeze_session", None) is not None:
        raise LmsqueezeError("this model is already patched by lmsqueeze; nest no apply() blocks")
    method, artifact = _as_method(method)
    if artifact is not None:
        artifact.check_model(model)
    session = Session(model, method, artifact)
    decoder = model.model
    old_impl = model.config._attn_implementation
    undo_modules = None
    handle = None
    try:
        for m in modules:
            m._lmsqueeze_session = session
            m.forward = types.MethodType(lmsqueeze_attention_forward, m)
        handle = decoder.register_forward_pre_hook(
            _decoder_pre_hook(session, inspect.signature(decoder.forward)), with_kwargs=True
        )
        model.config._attn_implementation = ATTN_IMPL
        original_generate = model.generate
        cache_name = cache_kwarg(decoder)

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            if passed_cache(kwargs) is None and kwargs.get("use_cache", True):
                kwargs[cache_name] = session.new_cache()
            return original_generate(*args, **kwargs)

        model.generate = generate
        model._lmsqueeze_session = session
        for m in rms_norms:  # one fused launch on CUDA, transformers' own math elsewhere
            m.forward = types.MethodType(fused_rms_norm_forward, m)
        undo_modules = method.install(model, artifact)
        yield session
    finally:
        if undo_modules is not None:
            undo_modules()
        for m in modules:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_lmsqueeze_session", None)
        for m in rms_norms:
            m.__dict__.pop("forward", None)
        if handle is not None:
            handle.remove()
        model.__dict__.pop("generate", None)
        model.__dict__.pop("_lmsqueeze_session", None)
        model.config._attn_implementation = old_impl
