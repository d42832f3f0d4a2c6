"""The `lmsqueeze` command line: demo, generate, calibrate, eval, report, bench, train, methods."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import typer

from lmsqueeze.errors import LmsqueezeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast and small long-context LLM inference on Hugging Face models.")

SUBAPPS = {  # name -> (module, attribute, help)
    "eval": ("lmsqueeze.eval.cli", "app", "Quality: perplexity, long-context suite, fixed context, LongBench."),
    "bench": ("lmsqueeze.bench.cli", "app", "Speed and memory benchmarks on the GPU."),
    "train": ("lmsqueeze.train.cli", "app", "Train the zoo: tokenizer, models, looped decoders."),
    "squeezed": ("lmsqueeze.methods.squeezed.cli", "app", "Squeezed Attention: prepare a document once, ask it."),
}


def _parse_sets(pairs: list[str]) -> dict:
    """['bits=3', 'outliers=0.01'] -> {'bits': 3, 'outliers': 0.01} (ints, floats, bools, None, strings)."""
    import json

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise LmsqueezeError(f"--set takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
def methods() -> None:
    """List the registered methods and their options."""
    import dataclasses

    from lmsqueeze.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                           if f.default is not dataclasses.MISSING)
        typer.echo(f"{name:14s} {'(calibrated) ' if cls.needs_calibration else ''}{fields}")


@app.command()
def calibrate(
    method: str = typer.Argument(..., help="method name (see `lmsqueeze methods`)"),
    out: Path = typer.Option(..., "--out", help="artifact directory to write"),
    model: Path | None = typer.Option(None, help="local HF model directory (default: bundled model)"),
    set_: list[str] = typer.Option([], "--set", help="method option key=value (repeatable)"),
    data: list[Path] = typer.Option([], help="calibration text files/dirs (default: Python stdlib)"),
    samples: int = typer.Option(16, help="calibration sequences"),
    seq_len: int = typer.Option(2048, help="tokens per calibration sequence (16 x 2048 follows KVQuant's set size)"),
    device: str = typer.Option("cpu"), dtype: str | None = typer.Option(None),
) -> None:
    """Calibrate a method on a model and save the artifact."""
    import lmsqueeze
    from lmsqueeze.data.calibration import calibration_batches
    from lmsqueeze.methods import get_method

    cls = get_method(method)
    try:
        config = cls(**_parse_sets(set_))
    except TypeError as e:
        raise LmsqueezeError(f"bad option for {method}: {e}") from None
    m, tok = lmsqueeze.load_model(model, dtype=dtype, device=device)
    if tok is None:
        raise LmsqueezeError("the model directory has no tokenizer; calibration needs one")
    max_pos = getattr(m.config, "max_position_embeddings", None) or seq_len
    if seq_len > max_pos:
        typer.echo(f"calibration sequences shortened to the model's {max_pos} positions", err=True)
        seq_len = max_pos
    batches = calibration_batches(tok, samples, seq_len, roots=list(data) or None)
    artifact = config.calibrate(m, batches)
    artifact.save(out)
    typer.echo(f"wrote {out}")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="prompt text (or @file to read it from a file)"),
    model: Path | None = typer.Option(None, help="local HF model directory (default: bundled model)"),
    method_dir: Path | None = typer.Option(None, help="artifact directory (default: dense)"),
    max_new_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0), seed: int | None = typer.Option(None),
    device: str = typer.Option("cpu"), dtype: str | None = typer.Option(None),
) -> None:
    """Generate text, streaming tokens as they come."""
    import lmsqueeze
    from lmsqueeze.generation import generate as run_generate

    if prompt.startswith("@"):
        path = Path(prompt[1:])
        if not path.is_file():
            raise LmsqueezeError(f"prompt file {path} does not exist")
        prompt = path.read_text()
    m, tok = lmsqueeze.load_model(model, dtype=dtype, device=device)
    if tok is None:
        raise LmsqueezeError("the model directory has no tokenizer; pass a directory with tokenizer.json")
    method = lmsqueeze.load_artifact(method_dir) if method_dir else None
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    printed: list[int] = []

    def stream(token) -> None:
        printed.append(int(token[0]))
        sys.stdout.write(tok.decode(printed[-1:]))
        sys.stdout.flush()

    out = run_generate(m, ids, max_new_tokens=max_new_tokens, method=method, temperature=temperature,
                       top_p=top_p, seed=seed, on_token=stream)
    sys.stdout.write("\n")
    typer.echo(f"[{out.steps} tokens, prefill {out.prefill_s * 1e3:.0f} ms, "
               f"{out.decode_tokens_per_s:.1f} tokens/s decode]", err=True)


@app.command()
def demo(
    model: Path | None = typer.Option(None, help="local HF model directory (default: bundled model)"),
    device: str = typer.Option("cpu"), tokens: int = typer.Option(2048, help="held-out tokens to score"),
    out: Path | None = typer.Option(None, help="also write the table as JSON here"),
) -> None:
    """Every method on the bundled model: quality, memory and speed in one table."""
    from lmsqueeze.demo import run_demo

    run_demo(model, device=device, tokens=tokens, out=out)


@app.command()
def report(
    results: Path = typer.Argument(..., help="folder of result JSON files"),
    out: Path = typer.Option(Path("benchmarks/plots"), help="where to write the table and plots"),
) -> None:
    """Turn result JSON files into a markdown table and PNG plots."""
    mod = importlib.import_module("lmsqueeze.eval.report")
    table, plots = mod.report(results, out)
    typer.echo(f"wrote {table}")
    for plot in plots:
        typer.echo(f"wrote {plot}")


def _mount_subapps() -> None:
    if getattr(app, "_lmsqueeze_mounted", False):
        return
    app._lmsqueeze_mounted = True
    for name, (module, attr, help_text) in SUBAPPS.items():
        try:
            sub = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:  # a part not built yet in this checkout
            if e.name != module:
                raise
            continue
        app.add_typer(sub, name=name, help=help_text)


def _is(exc: BaseException, name: str) -> bool:
    """Whether exc is a click exception of that class name (typer may vendor its own click)."""
    return any(c.__name__ == name for c in type(exc).__mro__)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line (no traceback) and exit with code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _mount_subapps()
    try:
        result = app(args=argv, standalone_mode=False)
    except LmsqueezeError as e:
        print(f"lmsqueeze: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmsqueeze: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _is(e, "ClickException"):
            e.show()
            return e.exit_code
        if _is(e, "Abort"):
            print("lmsqueeze: aborted", file=sys.stderr)
            return 130
        raise
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())
