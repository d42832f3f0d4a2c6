"""`lmsqueeze eval ...` (the typer sub-app `app`) and `lmsqueeze report` (the function `report`).

Every command loads a model (--model, default: the bundled zoo model), a method (--method-dir: a calibrated
artifact; --method: a method that needs no calibration; neither: Dense), runs one evaluation inside
`lmsqueeze.apply`, prints a summary and, with --out FILE, writes the result JSON (+ predictions CSV).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import typer

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)
app = typer.Typer(help="Evaluate a model with a method: perplexity, synthetic suite, fixed-context QA, LongBench.",
                  no_args_is_help=True, add_completion=False)

ModelOpt = typer.Option(None, "--model", help="Local Hugging Face model directory (default: bundled zoo model).")
MethodDirOpt = typer.Option(None, "--method-dir", help="Calibrated method artifact directory (default: dense).")
MethodOpt = typer.Option(None, "--method", help="Name of a method that needs no calibration (default: dense).")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
DtypeOpt = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on CPU).")
OutOpt = typer.Option(None, "--out", help="Write the result JSON here (and <stem>.predictions.csv beside it).")
DataOpt = typer.Option(None, "--data", help="Text file or directory (default: held-out text / corpus test split).")
ChunkOpt = typer.Option(2048, "--chunk-size", help="Tokens per forward call when prefilling.")
QuietOpt = typer.Option(False, "--quiet", help="No progress bars.")


def _user_errors(fn):
    """Print LmsqueezeError as one line and exit with code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmsqueezeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise LmsqueezeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise LmsqueezeError(f"give at least one value for {what}")
    return values


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise LmsqueezeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise LmsqueezeError(f"give at least one value for {what}")
    return values


def _names(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def _load(model_path, method_dir, method_name, device, dtype):
    """(model, tokenizer, method or artifact or None, model info, method info)."""
    import torch

    import lmsqueeze
    from lmsqueeze.eval.results import method_info, model_info
    from lmsqueeze.methods.base import get_method

    if method_dir is not None and method_name is not None:
        raise LmsqueezeError("give either --method-dir or --method, not both")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = lmsqueeze.load_model(model_path, dtype=dtype, device=device)
    if tokenizer is None:
        raise LmsqueezeError(f"the model directory {model_path} has no tokenizer; save one with the model")
    method = None
    if method_dir is not None:
        method = lmsqueeze.load_artifact(method_dir)
    elif method_name is not None:
        method = get_method(method_name)()
    path = model_path if model_path is not None else lmsqueeze.default_model_path()
    return model, tokenizer, method, model_info(model, path), method_info(method, method_dir)


def _finish(kind: str, summary: dict, records, out: Path | None, model, minfo, meth, data, config) -> None:
    from lmsqueeze.eval.results import make_result, save_result

    typer.echo(json.dumps(summary, indent=2, default=str))
    if out is not None:
        result = make_result(kind, summary, model=minfo, method=meth, data=data, config=config,
                             device=model.device)
        path = save_result(out, result, records)
        typer.echo(f"wrote {path}")


@app.command("ppl")
@_user_errors
def ppl(model: Path | None = ModelOpt, method_dir: Path | None = MethodDirOpt,
        method: str | None = MethodOpt, data: Path | None = DataOpt,
        context_length: int = typer.Option(2048, "--context-length", help="Tokens per window."),
        stride: int | None = typer.Option(None, "--stride", help="Window step (default: context length)."),
        max_tokens: int = typer.Option(65536, "--max-tokens", help="Tokens of text to score at most."),
        chunk_size: int = ChunkOpt, device: str | None = DeviceOpt, dtype: str | None = DtypeOpt,
        out: Path | None = OutOpt, quiet: bool = QuietOpt) -> None:
    """Perplexity over sliding windows of the evaluation text."""
    from lmsqueeze.data.corpus import token_stream
    from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity
    from lmsqueeze.eval.texts import eval_text

    config = PerplexityConfig(context_length=context_length, stride=stride, chunk_size=chunk_size,
                              max_tokens=max_tokens)
    m, tok, meth, minfo, mdict = _load(model, method_dir, method, device, dtype)
    text, dinfo = eval_text(data, max_chars=max_tokens * 8)
    ids = token_stream(tok, [text], max_tokens=max_tokens)
    result = perplexity(m, ids, meth, config, progress=not quiet)
    _finish("eval.ppl", result.to_dict(), None, out, m, minfo, mdict, {**dinfo, "tokens": len(ids)},
            {"context_length": config.context_length, "stride": config.stride, "chunk_size": chunk_size,
             "max_tokens": max_tokens})


@app.command("suite")
@_user_errors
def suite(model: Path | None = ModelOpt, method_dir: Path | None = MethodDirOpt,
          method: str | None = MethodOpt, data: Path | None = DataOpt,
          tasks: str = typer.Option("passkey,niah_single,niah_multikey,niah_multivalue,kv_retrieval,vt", "--tasks",
                                    help="Comma-separated tasks."),
          lengths: str = typer.Option("1024", "--lengths", help="Comma-separated prompt lengths in tokens."),
          depths: str = typer.Option("0.5", "--depths", help="Comma-separated needle depths in [0, 1]."),
          formats: str = typer.Option("prose", "--formats", help="Comma-separated formats: prose, code."),
          samples: int = typer.Option(4, "--samples", help="Prompts per task, format, length and depth."),
          seed: int = typer.Option(0, "--seed"),
          max_new_tokens: int | None = typer.Option(None, "--max-new-tokens",
                                                       help="Default: answer tokens + 8."),
          chunk_size: int = ChunkOpt, device: str | None = DeviceOpt, dtype: str | None = DtypeOpt,
          out: Path | None = OutOpt, quiet: bool = QuietOpt) -> None:
    """RULER-style synthetic tasks (passkey, needles, kv retrieval, variable tracking), exact-match scored."""
    from lmsqueeze.eval.suite import SuiteConfig, run_suite
    from lmsqueeze.eval.texts import eval_text

    config = SuiteConfig(tasks=_names(tasks), lengths=_ints(lengths, "--lengths"),
                         depths=_floats(depths, "--depths"), samples=samples, seed=seed,
                         formats=_names(formats), chunk_size=chunk_size, max_new_tokens=max_new_tokens)
    m, tok, meth, minfo, mdict = _load(model, method_dir, method, device, dtype)
    haystack, dinfo = eval_text(data, max_chars=8 * max(config.lengths) + 200_000)
    summary, records = run_suite(m, tok, haystack, meth, config, progress=not quiet)
    _finish("eval.suite", summary, records, out, m, minfo, mdict, dinfo, config.to_dict())


@app.command("fixed")
@_user_errors
def fixed(model: Path | None = ModelOpt, method_dir: Path | None = MethodDirOpt,
          method: str | None = MethodOpt, data: Path | None = DataOpt,
          context_length: int = typer.Option(4096, "--context-length", help="Context tokens."),
          facts: int = typer.Option(32, "--facts", help="Facts hidden in each context."),
          questions: int = typer.Option(16, "--questions", help="Questions per context."),
          samples: int = typer.Option(2, "--samples", help="Contexts."),
          kind: str = typer.Option("needles", "--kind", help="needles (in a corpus haystack) or kv (JSON/dict)."),
          fmt: str = typer.Option("code", "--format", help="code or prose."),
          rollback: str = typer.Option("auto", "--rollback", help="auto, crop or copy."),
          seed: int = typer.Option(0, "--seed"),
          max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
          chunk_size: int = ChunkOpt, device: str | None = DeviceOpt, dtype: str | None = DtypeOpt,
          out: Path | None = OutOpt, quiet: bool = QuietOpt) -> None:
    """Fixed-context mode: each context prefilled once, many questions answered from it."""
    from lmsqueeze.data.tasks import fixed_context_sample, haystack_lines
    from lmsqueeze.eval.fixed_context import FixedContextConfig, run_fixed_context
    from lmsqueeze.eval.texts import eval_text

    config = FixedContextConfig(chunk_size=chunk_size, max_new_tokens=max_new_tokens, rollback=rollback)
    if samples <= 0:
        raise LmsqueezeError(f"--samples must be positive, got {samples}")
    m, tok, meth, minfo, mdict = _load(model, method_dir, method, device, dtype)
    text, dinfo = eval_text(data, max_chars=8 * context_length + 200_000)
    lines = haystack_lines(text)
    contexts = [fixed_context_sample(tok, lines, context_length, facts, questions, seed, i, kind, fmt)
                for i in range(samples)]
    summary, records = run_fixed_context(m, tok, contexts, meth, config, progress=not quiet)
    _finish("eval.fixed", summary, records, out, m, minfo, mdict, dinfo,
            {"context_length": context_length, "facts": facts, "questions": questions, "samples": samples,
             "kind": kind, "format": fmt, "seed": seed, "rollback": rollback, "chunk_size": chunk_size,
             "max_new_tokens": max_new_tokens})


@app.command("longbench")
@_user_errors
def longbench(data: Path = typer.Option(..., "--data", help="LongBench JSONL file or directory of them."),
              model: Path | None = ModelOpt, method_dir: Path | None = MethodDirOpt,
              method: str | None = MethodOpt,
              datasets: str | None = typer.Option(None, "--datasets", help="Comma-separated datasets."),
              samples: int | None = typer.Option(None, "--samples", help="At most this many per dataset."),
              max_length: int = typer.Option(31500, "--max-length", help="Prompt tokens (middle truncation)."),
              max_new_tokens: int | None = typer.Option(None, "--max-new-tokens",
                                                           help="Default: LongBench's per dataset."),
              chat_template: bool = typer.Option(False, "--chat-template", help="Wrap prompts as a user turn."),
              chunk_size: int = ChunkOpt, device: str | None = DeviceOpt, dtype: str | None = DtypeOpt,
              out: Path | None = OutOpt, quiet: bool = QuietOpt) -> None:
    """LongBench-format JSONL, LongBench prompts and metrics."""
    from lmsqueeze.data.longbench import load_longbench
    from lmsqueeze.eval.longbench_eval import LongBenchConfig, run_longbench

    config = LongBenchConfig(max_length=max_length, chunk_size=chunk_size, max_new_tokens=max_new_tokens,
                             chat_template=chat_template)
    records_in = load_longbench(data, _names(datasets) if datasets else None, samples)
    m, tok, meth, minfo, mdict = _load(model, method_dir, method, device, dtype)
    summary, records = run_longbench(m, tok, records_in, meth, config, progress=not quiet)
    _finish("eval.longbench", summary, records, out, m, minfo, mdict,
            {"source": str(data), "datasets": sorted({s.dataset for s in records_in}), "samples": len(records_in)},
            {"max_length": max_length, "max_new_tokens": max_new_tokens, "chat_template": chat_template,
             "chunk_size": chunk_size})


@_user_errors
def report(results_dir: Path = typer.Argument(..., help="Folder of result JSON files."),
           out: Path | None = typer.Option(None, "--out", help="Folder for report.md and PNGs (default: DIR).")
           ) -> None:
    """Turn result JSON files into a markdown table and PNG plots."""
    from lmsqueeze.eval.report import make_report

    md, pngs = make_report(results_dir, out)
    typer.echo(f"wrote {md}")
    for p in pngs:
        typer.echo(f"wrote {p}")
