"""`lmsqueeze bench ...`: decode attention, decode step, prefill and memory benchmarks (typer sub-app).

Each command times a sweep, prints a table and, with --out, writes a result JSON (see bench/results.py).
Real-size presets need a CUDA GPU; `--preset tiny --device cpu` is a smoke test. Run standalone with
`python -m lmsqueeze.bench.cli attention ...`; on a copy of the tree without .git, set LMSQUEEZE_GIT_COMMIT.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

app = typer.Typer(help="Speed and memory benchmarks on random-weight models of real shapes.",
                  no_args_is_help=True, add_completion=False)

Preset = Annotated[str, typer.Option(help="model shape: llama3-8b, llama2-7b, mistral-7b, qwen2.5-7b or tiny")]
Lengths = Annotated[str, typer.Option(help="context lengths in tokens, comma-separated (32k = 32768)")]
Batch = Annotated[str, typer.Option(help="batch sizes, comma-separated")]
Dtype = Annotated[str, typer.Option(help="bf16, fp16 or fp32")]
Out = Annotated[Path | None, typer.Option(help="write the result JSON here")]
Device = Annotated[str, typer.Option(help="auto, cuda, cuda:N or cpu (cpu: tiny preset only)")]
Peak = Annotated[float, typer.Option("--peak-tbps", help="bandwidth the rows are compared with (H100: 3.0)")]
NumLayers = Annotated[int | None, typer.Option(help="keep only the first N layers (smoke runs)")]


def _setup(preset: str, device: str, dtype: str):
    import torch  # noqa: F401 - imported here so `--help` stays fast

    from lmsqueeze.bench.device import resolve_device
    from lmsqueeze.bench.presets import get_preset
    from lmsqueeze.models.loading import parse_dtype

    get_preset(preset)
    dev = resolve_device(device, preset)
    return dev, parse_dtype(dtype, dev)


def _finish(kind: str, rows: list[dict[str, Any]], skipped: list[str], extra: dict[str, Any], out: Path | None,
            device, columns: list[tuple[str, Any, str]], title: str) -> None:
    """Write the JSON (if `out`) and print `rows` as a table; `columns`: (header, row key or function, format)."""
    from rich.console import Console
    from rich.table import Table

    from lmsqueeze.bench.results import command_line, write_result

    extra = dict(extra, skipped=skipped)
    if out is not None:
        path = write_result(out, kind, command_line(), rows, extra, device)
        log.info("wrote %s", path)
    table = Table(title=title)
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = key(r) if callable(key) else r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        table.add_row(*cells)
    console = Console(width=max(120, Console().width))
    console.print(table)
    for msg in skipped:
        console.print(f"[yellow]skipped: {msg}")
    for msg in extra.get("correctness_failures", []):
        console.print(f"[red]correctness: {msg}")
    if out is not None:
        console.print(f"wrote {out}")


@app.command()
def attention(preset: Preset = "llama3-8b", lengths: Lengths = "32768,131072", batch: Batch = "1",
              dtype: Dtype = "bf16",
              variants: Annotated[str, typer.Option(help="comma-separated variants; sdpa is always the baseline")]
              = "sdpa",
              out: Out = None, iters: int = 50, warmup: int = 10,
              graph: Annotated[bool, typer.Option(help="time CUDA-graph replays")] = True,
              device: Device = "auto", peak_tbps: Peak = 3.0) -> None:
    """Decode attention of one layer: one query token over an N-token KV cache, each variant vs dense SDPA."""
    from lmsqueeze.bench.attention import ATTENTION_VARIANTS, check_rows, run_attention_sweep
    from lmsqueeze.bench.device import measure_copy_bandwidth
    from lmsqueeze.bench.options import parse_int_list, parse_names

    lens, batches = parse_int_list(lengths, "lengths"), parse_int_list(batch, "batch sizes")
    names = parse_names(variants, ATTENTION_VARIANTS, "attention variant")
    dev, dt = _setup(preset, device, dtype)
    copy_bw = measure_copy_bandwidth(dev)
    rows, skipped = run_attention_sweep(preset, lens, batches, dt, dev, names, warmup, iters, graph, peak_tbps)
    extra = dict(options=dict(preset=preset, lengths=lens, batch=batches, dtype=str(dt), variants=names,
                              iters=iters, warmup=warmup, graph=graph),
                 peak_tb_per_s=peak_tbps, measured_copy_tb_per_s=copy_bw, correctness_failures=check_rows(rows))
    _finish("decode_attention", rows, skipped, extra, out, dev, [
        ("B", "batch", ""), ("N", "length", ""), ("method", "method", ""), ("ms", "ms", ".4f"),
        ("MB", lambda r: r["bytes"] / 1e6, ",.1f"), ("TB/s", "tb_per_s", ".3f"), ("of peak", "frac_of_peak", ".1%"),
        ("vs sdpa", "speedup", ".3f"), ("rel err", "rel_err", ".1e"), ("graph", "graph", "")],
        f"decode attention, {preset}, {dt}")


def _model(preset: str, device: str, dtype: str, num_layers: int | None):
    from lmsqueeze.bench.presets import build_random_model

    dev, dt = _setup(preset, device, dtype)
    return dev, dt, build_random_model(preset, dt, dev, num_layers)


@app.command()
def step(preset: Preset = "llama3-8b", lengths: Lengths = "32768", batch: Batch = "1", dtype: Dtype = "bf16",
         variants: Annotated[str, typer.Option(help="comma-separated step variants")]
         = "hf-static-graph,hf-static-eager,hf-dynamic-eager",
         baseline: Annotated[str, typer.Option(help="the variant the others are compared with")] = "hf-static-graph",
         out: Out = None, iters: int = 30, warmup: int = 5, device: Device = "auto", peak_tbps: Peak = 3.0,
         num_layers: NumLayers = None) -> None:
    """Whole-model decode step over an N-token cache (random weights): latency, TB/s and tokens/s at batch B."""
    run_step_command("decode_step", preset, lengths, batch, dtype, variants, baseline, out, iters, warmup,
                     device, peak_tbps, num_layers, [
                         ("tok/s", "tokens_per_s", ",.1f"), ("TB/s", "tb_per_s", ".3f"),
                         ("of peak", "frac_of_peak", ".1%")], "decode step")


def run_step_command(kind: str, preset: str, lengths: str, batch: str, dtype: str, variants: str, baseline: str,
                     out: Path | None, iters: int, warmup: int, device: str, peak_tbps: float,
                     num_layers: int | None, columns: list, title: str) -> list[dict[str, Any]]:
    """Parse the options, time every step variant over the sweep, print a table with `columns` and write JSON.

    Shared by `bench step` and `bench e2e`; rows also get `x_floor` (time over the bytes floor)."""
    from lmsqueeze.bench.model import STEP_VARIANTS, run_step_sweep, weight_bytes
    from lmsqueeze.bench.options import parse_int_list, parse_names

    lens, batches = parse_int_list(lengths, "lengths"), parse_int_list(batch, "batch sizes")
    names = parse_names(variants, STEP_VARIANTS, "step variant")
    parse_names([baseline], STEP_VARIANTS, "baseline variant")
    dev, dt, model = _model(preset, device, dtype, num_layers)
    rows, skipped = run_step_sweep(model, lens, batches, names, baseline, warmup, iters, peak_tbps,
                                   preset=preset, dtype=str(dt), num_layers=model.config.num_hidden_layers)
    for row in rows:
        row["x_floor"] = row["ms"] / row["floor_ms"]
    extra = dict(options=dict(preset=preset, lengths=lens, batch=batches, dtype=str(dt), variants=names,
                              baseline=baseline, iters=iters, warmup=warmup, num_layers=num_layers),
                 weight_bytes=weight_bytes(model), peak_tb_per_s=peak_tbps)
    _finish(kind, rows, skipped, extra, out, dev, [
        ("B", "batch", ""), ("N", "length", ""), ("method", "method", ""), ("ms", "ms", ".3f"), *columns,
        (f"vs {baseline}", "speedup", ".3f"), ("logits err", "logits_rel_err", ".1e"), ("graph", "graph", "")],
        f"{title}, {preset}, {dt}")
    return rows


@app.command()
def prefill(preset: Preset = "llama3-8b", lengths: Lengths = "32768", batch: Batch = "1", dtype: Dtype = "bf16",
            chunk: Annotated[int, typer.Option(help="tokens per forward for chunked variants")] = 4096,
            variants: Annotated[str, typer.Option(help="comma-separated prefill variants")]
            = "hf-dynamic-full,hf-static-chunked",
            out: Out = None, iters: int = 20, warmup: int = 1, device: Device = "auto",
            num_layers: NumLayers = None) -> None:
    """Prefill latency of a random B x P prompt (tokens/s, TFLOP/s), whole vs chunked."""
    from lmsqueeze.bench.options import parse_int_list, parse_names
    from lmsqueeze.bench.prefill import PREFILL_VARIANTS, run_prefill_sweep

    lens, batches = parse_int_list(lengths, "lengths"), parse_int_list(batch, "batch sizes")
    names = parse_names(variants, PREFILL_VARIANTS, "prefill variant")
    dev, dt, model = _model(preset, device, dtype, num_layers)
    rows, skipped = run_prefill_sweep(model, lens, batches, chunk, names, None, warmup, iters,
                                      preset=preset, dtype=str(dt), num_layers=model.config.num_hidden_layers)
    extra = dict(options=dict(preset=preset, lengths=lens, batch=batches, dtype=str(dt), variants=names,
                              chunk=chunk, iters=iters, warmup=warmup, num_layers=num_layers))
    _finish("prefill", rows, skipped, extra, out, dev, [
        ("B", "batch", ""), ("P", "length", ""), ("method", "method", ""), ("chunk", "chunk", ""),
        ("ms", "ms", ".1f"), ("tok/s", "tokens_per_s", ",.0f"), ("TFLOP/s", "tflop_per_s", ".1f"),
        ("vs " + names[0], "speedup", ".3f"), ("logits err", "logits_rel_err", ".1e")],
        f"prefill, {preset}, {dt}")


@app.command()
def memory(preset: Preset = "llama3-8b", lengths: Lengths = "32768", batch: Batch = "1", dtype: Dtype = "bf16",
           chunk: Annotated[int, typer.Option(help="tokens per forward of the chunked prefill")] = 4096,
           out: Out = None, device: Device = "auto", num_layers: NumLayers = None) -> None:
    """Peak GPU memory: weights, KV cache, one decode step, prefill (torch.cuda.max_memory_allocated)."""
    from lmsqueeze.bench.memory import memory_report
    from lmsqueeze.bench.options import parse_int_list

    lens, batches = parse_int_list(lengths, "lengths"), parse_int_list(batch, "batch sizes")
    if chunk < 1:
        raise LmsqueezeError(f"chunk must be a positive number of tokens, got {chunk}")
    dev, dt, model = _model(preset, device, dtype, num_layers)
    rows, skipped = memory_report(model, lens, batches, chunk, preset=preset, dtype=str(dt))
    extra = dict(options=dict(preset=preset, lengths=lens, batch=batches, dtype=str(dt), chunk=chunk,
                              num_layers=num_layers))
    _finish("memory", rows, skipped, extra, out, dev, [
        ("stage", "stage", ""), ("method", "method", ""), ("B", "batch", ""), ("N", "length", ""),
        ("allocated GiB", "allocated_gib", ".3f"), ("peak GiB", "peak_gib", ".3f"),
        ("expected GiB", "expected_gib", ".3f")], f"memory, {preset}, {dt}")


@app.command()
def plot(result: Annotated[Path, typer.Argument(help="a decode_attention result JSON")],
         png: Annotated[Path, typer.Argument(help="where to write the PNG")]) -> None:
    """Plot achieved TB/s per method from a decode-attention result JSON."""
    from lmsqueeze.bench.plot import plot_attention

    typer.echo(f"wrote {plot_attention(result, png)}")


def _register_e2e() -> None:
    from lmsqueeze.bench.e2e import e2e

    app.command("e2e")(e2e)


_register_e2e()


def main() -> None:
    """Entry point for `python -m lmsqueeze.bench.cli`: LmsqueezeError -> one line on stderr, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except LmsqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
