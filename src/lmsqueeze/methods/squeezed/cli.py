"""`lmsqueeze squeezed`: prepare a fixed context from a file once, then ask it any number of questions.

    lmsqueeze squeezed prepare doc.txt --out runs/doc --sparsity 0.9
    lmsqueeze squeezed ask runs/doc "What is the special magic number for fierce-beacon?"
    lmsqueeze squeezed ask runs/doc --questions questions.txt          # one question per line

The artifact directory holds the context's KV, clusters and thresholds (`lmsqueeze.load_artifact` reads it);
`ask` never prefills the context again: each question attends densely to itself and sparsely to the context.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from lmsqueeze.errors import LmsqueezeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Squeezed Attention: prepare a fixed context once, answer many questions about it.")

ModelOpt = typer.Option(None, "--model", help="local HF model directory (default: the bundled model)")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the model's)")
ContextArg = typer.Argument(..., help="text file holding the fixed context (document, code, ...)")
OutOpt = typer.Option(..., "--out", help="artifact directory to write")
ArtifactArg = typer.Argument(..., help="directory written by `lmsqueeze squeezed prepare`")
QuestionArg = typer.Argument(None, help="question(s) about the prepared context")
QuestionsOpt = typer.Option(None, "--questions", help="file with one question per line")


def _model(model: Path | None, device: str | None, dtype: str | None):
    import torch

    import lmsqueeze

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m, tok = lmsqueeze.load_model(model, dtype=dtype, device=device)
    if tok is None:
        raise LmsqueezeError("the model directory has no tokenizer; pass a directory with tokenizer.json")
    return m, tok


@app.command()
def prepare(
    context: Path = ContextArg,
    out: Path = OutOpt,
    sparsity: float = typer.Option(0.9, help="fraction of the context's keys not read per step"),
    centroids: float = typer.Option(0.05, help="K-means clusters per KV head, as a fraction of the keys"),
    hierarchical: str | None = typer.Option(None, help="two-level lookup 'coarse,fine', e.g. 0.01,0.05"),
    sinks: int = typer.Option(4, help="first context tokens always read"),
    observation: int = typer.Option(64, help="last context tokens used to calibrate (always read)"),
    model: Path | None = ModelOpt, device: str | None = DeviceOpt, dtype: str | None = DtypeOpt,
) -> None:
    """Prepare CONTEXT once (its KV, K-means clusters, calibrated thresholds) and save it to --out."""
    from lmsqueeze.methods.squeezed import SqueezedAttention

    if not context.is_file():
        raise LmsqueezeError(f"context file {context} does not exist")
    hier = tuple(float(x) for x in hierarchical.split(",")) if hierarchical else None
    method = SqueezedAttention(centroids=centroids, sparsity=sparsity, hierarchical=hier, sinks=sinks,
                               observation=observation)
    m, tok = _model(model, device, dtype)
    ids = tok(context.read_text())["input_ids"]
    limit = getattr(m.config, "max_position_embeddings", None)
    if limit and len(ids) >= limit:
        raise LmsqueezeError(f"the context has {len(ids)} tokens; the model handles {limit} positions (context "
                             "and questions together): shorten the file")
    t0 = time.perf_counter()
    art = method.prepare(m, ids)
    art.save(out)
    typer.echo(f"prepared {len(ids)} tokens in {time.perf_counter() - t0:.1f} s "
               f"(KV budget per step {method.kv_budget():.3f}); wrote {out}")


@app.command()
def ask(
    artifact: Path = ArtifactArg,
    question: list[str] = QuestionArg,
    questions: Path | None = QuestionsOpt,
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    model: Path | None = ModelOpt, device: str | None = DeviceOpt, dtype: str | None = DtypeOpt,
) -> None:
    """Answer each question (greedy) from the prepared context; the context is never prefilled again."""
    import lmsqueeze
    from lmsqueeze.methods.squeezed.answer import answer_many

    qs = list(question or [])
    if questions is not None:
        if not questions.is_file():
            raise LmsqueezeError(f"questions file {questions} does not exist")
        qs += [line for line in questions.read_text().splitlines() if line.strip()]
    if not qs:
        raise LmsqueezeError("give at least one question (argument or --questions FILE)")
    m, tok = _model(model, device, dtype)
    art = lmsqueeze.load_artifact(artifact)
    t0 = time.perf_counter()
    for q, a in zip(qs, answer_many(m, tok, art, qs, max_new_tokens)):
        typer.echo(f"Q: {q}\nA: {a}")
    typer.echo(f"[{len(qs)} questions in {time.perf_counter() - t0:.1f} s]", err=True)
