"""`lmsqueeze bench e2e`: lmsqueeze's CUDA-graphed decode step against transformers' paths, in one run.

The lmsqueeze step is the one `lmsqueeze.generate` replays: the patched model over a preallocated
`SqueezeCache` whose decode reads device-side lengths (Triton decode attention over the filled slots).
Every cache holds the same random K/V (no 128K-token prefill), so first-step logits are compared too.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from lmsqueeze.bench.caches import kv_shape, random_kv
from lmsqueeze.bench.model import StepBench, decode_inputs, decode_step_bytes, register_step_variant
from lmsqueeze.models.compat import cache_kw

E2E_VARIANTS = "lmsqueeze-graph,hf-static-compile,hf-static-graph,hf-dynamic-eager"


def random_dense_cache(model: nn.Module, batch: int, length: int, seed: int = 0):
    """A Dense `SqueezeCache` holding `length` random tokens per sequence (the bench's shared random K/V),
    with room for one more, in static-decode mode."""
    from lmsqueeze.session import apply

    shape = kv_shape(model)
    with apply(model) as session:
        cache = session.new_cache(batch_size=batch, max_length=length + 1)
    for state, (k, v) in zip(cache.layers, random_kv(shape, batch, length, seed)):
        state.max_length = length + 1
        state.reserve(k, length + 1)
        state.k[:, :, :length].copy_(k)
        state.v[:, :, :length].copy_(v)
        state.length = length
    cache.start_static(torch.zeros(batch, dtype=torch.int32, device=shape.device))
    return cache


@register_step_variant("lmsqueeze-graph")
def lmsqueeze_graph(model: nn.Module, batch: int, length: int) -> StepBench:
    """lmsqueeze's decode step (Dense method), replayed as one CUDA graph."""
    from lmsqueeze.session import apply

    cache = random_dense_cache(model, batch, length)
    ids, pos = decode_inputs(model, batch, length)

    def step() -> torch.Tensor:  # writes slot `length` and reads length + 1 slots; replayable as is
        with apply(model):
            return model(input_ids=ids, position_ids=pos, **cache_kw(model, cache), use_cache=True,
                         logits_to_keep=1).logits
    return StepBench(step, decode_step_bytes(model, batch, length), model.device.type == "cuda", batch)


CHESS_STEP = {"sparsity": 0.5}  # the sparsity of the "lmsqueeze-chess" variant (`bench e2e --chess-sparsity`)


@register_step_variant("lmsqueeze-chess")
def lmsqueeze_chess(model: nn.Module, batch: int, length: int) -> StepBench:
    """lmsqueeze's decode step with CHESS (FFN + q_proj/o_proj inputs at CHESS_STEP["sparsity"]; thresholds
    calibrated on 2 x 256 random tokens), replayed as one CUDA graph. The sparse modules stay installed while the
    step lives (installing re-lays weights out, which a graph must not replay) and are removed when it is freed.
    The cache holds random K/V, so the q_proj/o_proj input sparsity at the step can differ from the target."""
    from lmsqueeze.methods.chess import CHESS
    from lmsqueeze.session import apply

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    calib = [torch.randint(0, model.config.vocab_size, (1, 256), generator=gen, device=device) for _ in range(2)]
    art = CHESS(sparsity=CHESS_STEP["sparsity"]).calibrate(model, calib)
    art.tensors = {k: v.to(device) for k, v in art.tensors.items()}
    cache = random_dense_cache(model, batch, length)
    ids, pos = decode_inputs(model, batch, length)
    stack = contextlib.ExitStack()
    stack.enter_context(apply(model, art))

    def step() -> torch.Tensor:
        return model(input_ids=ids, position_ids=pos, **cache_kw(model, cache), use_cache=True,
                     logits_to_keep=1).logits
    weakref.finalize(step, stack.close)
    return StepBench(step, decode_step_bytes(model, batch, length), model.device.type == "cuda", batch)


Opt = typer.Option


def e2e(preset: Annotated[str, Opt(help="model shape preset")] = "llama3-8b",
        lengths: Annotated[str, Opt(help="context lengths, comma-separated")] = "8192,32768,131072",
        batch: Annotated[str, Opt(help="batch sizes, comma-separated")] = "1,8",
        dtype: Annotated[str, Opt(help="bf16, fp16 or fp32")] = "bf16",
        variants: Annotated[str, Opt(help="comma-separated step variants")] = E2E_VARIANTS,
        baseline: Annotated[str, Opt(help="the variant the others are compared with")] = "hf-dynamic-eager",
        out: Annotated[Path | None, Opt(help="write the result JSON here")] = None,
        iters: int = 30, warmup: int = 5,
        device: Annotated[str, Opt(help="auto, cuda or cpu (cpu: tiny preset only)")] = "auto",
        peak_tbps: Annotated[float, Opt("--peak-tbps", help="bandwidth of the bytes floor")] = 3.0,
        num_layers: Annotated[int | None, Opt(help="keep only the first N layers")] = None,
        chess_sparsity: Annotated[float, Opt(help="sparsity of the lmsqueeze-chess variant")] = 0.5) -> None:
    """End-to-end decode step: lmsqueeze's graphed path vs transformers eager/static/compiled, bytes floor."""
    from lmsqueeze.bench.cli import run_step_command
    from lmsqueeze.methods.chess.thresholds import check_sparsity

    CHESS_STEP["sparsity"] = check_sparsity(chess_sparsity, "chess-sparsity")

    run_step_command("decode_e2e", preset, lengths, batch, dtype, variants, baseline, out, iters, warmup, device,
                     peak_tbps, num_layers, [
                         ("floor ms", "floor_ms", ".3f"), ("x floor", "x_floor", ".2f"),
                         ("tok/s", "tokens_per_s", ",.1f")], "end-to-end decode step")
