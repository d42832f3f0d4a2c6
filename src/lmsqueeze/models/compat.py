"""Differences between the transformers 5.x releases we support (5.17 ... newest 5.x).

transformers 5.24 renamed the KV-cache argument of every forward from `past_key_values` to `cache` (the old
name still works, with a FutureWarning, until 5.40). `cache_kw(model, cache)` passes it under the name the
installed release uses: `model(input_ids=ids, **cache_kw(model, cache))`.
"""

from __future__ import annotations

import functools
import inspect

CACHE_KWARGS = ("past_key_values", "cache")  # transformers < 5.24 / >= 5.24


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The name the forward of `model` (a CausalLM, its decoder or a decoder layer) takes the cache under."""
    return _cache_kwarg_of(type(model))


def cache_kw(model, cache) -> dict:
    """{name: cache} for `model(**...)`: see the module docstring."""
    return {cache_kwarg(model): cache}


def passed_cache(arguments: dict):
    """The cache among a forward's bound arguments, under either name (also inside a `**kwargs` catch-all)."""
    extra = arguments.get("kwargs") or {}
    for name in CACHE_KWARGS:
        for where in (arguments, extra):
            if where.get(name) is not None:
                return where[name]
    return None
