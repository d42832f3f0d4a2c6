"""`lmsqueeze train ...`: tokenizer, model (a Llama) and looped (a parameter-shared decoder)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

app = typer.Typer(help="Train the zoo: a BPE tokenizer, a small Llama, a looped decoder (offline).",
                  no_args_is_help=True)

DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "zoo" / "tokenizer"


@app.command()
def tokenizer(
    out: Path = typer.Option(..., help="directory for tokenizer.json + tokenizer_config.json"),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size (special tokens included)"),
    max_chars: int = typer.Option(60_000_000, help="characters of training text to read"),
    data: list[Path] = typer.Option(None, help="text files / directories (default: this Python's sources)"),
    include_packages: bool = typer.Option(True, help="with the default corpus, also read site-packages"),
    seed: int = typer.Option(0),
) -> None:
    """Train a byte-level BPE tokenizer on the corpus train split."""
    from lmsqueeze.data.heldout import heldout_paths
    from lmsqueeze.train.corpus_stream import CorpusSpec, iter_texts
    from lmsqueeze.train.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

    spec = CorpusSpec(roots=[str(d) for d in data] if data else None, include_packages=include_packages,
                      max_chars=max_chars, seed=seed, exclude_paths=[] if data else heldout_paths())
    tok = train_tokenizer(iter_texts(spec, "train"), TokenizerConfig(vocab_size=vocab_size))
    save_tokenizer(tok, out)
    typer.echo(f"wrote {out} ({len(tok)} tokens)")


def _train(preset: str, out: Path, tokenizer_dir: Path, train_preset_name: str, time_budget_s: float | None,
           max_steps: int | None, device: str | None, max_chars: int, data: list[Path] | None,
           run_dir: Path | None, resume: bool, results: Path | None, retrieval_fraction: float) -> None:
    import sys

    from lmsqueeze.train.corpus_stream import CorpusSpec
    from lmsqueeze.train.presets import model_preset, train_preset
    from lmsqueeze.train.recipe import EvalConfig, prepare_data, train_and_evaluate
    from lmsqueeze.train.synthetic import RetrievalMix

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {k: v for k, v in (("time_budget_s", time_budget_s), ("max_steps", max_steps),
                                   ("device", device)) if v is not None}
    tcfg = train_preset(train_preset_name, **overrides)
    spec = CorpusSpec(roots=[str(d) for d in data] if data else None, max_chars=max_chars)
    data_ = prepare_data(tokenizer_dir, spec)
    mcfg = model_preset(preset, data_.encoder.get_vocab_size())
    if train_preset_name == "smoke":
        mcfg.max_position_embeddings = max(mcfg.max_position_embeddings, tcfg.seq_len)
        ecfg = EvalConfig(ppl_window=tcfg.seq_len, lengths=(tcfg.seq_len,), passkey_n=4, val_max_tokens=4096,
                          test_max_tokens=4096, periodic_windows=1, periodic_passkey_n=2)
    else:
        ecfg = EvalConfig()
    res = train_and_evaluate(preset, mcfg, tcfg, data_, RetrievalMix(fraction=retrieval_fraction),
                             run_dir=run_dir or out.with_name(out.name + "_run"), out_dir=out, ecfg=ecfg,
                             command=" ".join(sys.argv), resume=resume)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(res, indent=1) + "\n")
    f = res["final"]
    typer.echo(f"{preset}: {res['parameters']:,} params, {res['train']['tokens']:,} tokens, "
               f"val ppl {[round(x, 3) for x in f['validation']['ppl']]}, "
               f"test ppl {[round(x, 3) for x in f['test_heldout']['ppl']]} -> {out}")


_OPTS = dict(
    out=typer.Option(..., help="output model directory"),
    tokenizer_dir=typer.Option(DEFAULT_TOKENIZER, "--tokenizer", help="tokenizer directory"),
    train_preset_name=typer.Option("gpu", "--train-preset", help="gpu (8K, bf16) or smoke (tiny CPU run)"),
    time_budget_s=typer.Option(None, help="train for this many seconds (cosine schedule over the budget)"),
    max_steps=typer.Option(None, help="train for this many steps (whichever of steps/time ends first)"),
    device=typer.Option(None, help="cuda or cpu (default: the training preset's)"),
    max_chars=typer.Option(400_000_000, help="characters of corpus text to read"),
    data=typer.Option(None, help="text files / directories (default: this Python's stdlib + site-packages)"),
    run_dir=typer.Option(None, help="checkpoints and log.jsonl (default: OUT_run); resumed when present"),
    resume=typer.Option(True, help="resume from run_dir/checkpoint.pt when it exists"),
    results=typer.Option(None, help="write the results JSON here"),
    retrieval_fraction=typer.Option(0.4, help="share of training sequences with synthetic retrieval needles"),
)


@app.command()
def model(
    out: Path = _OPTS["out"], preset: str = typer.Option("default", help="default or tiny"),
    tokenizer_dir: Path = _OPTS["tokenizer_dir"], train_preset_name: str = _OPTS["train_preset_name"],
    time_budget_s: float = _OPTS["time_budget_s"], max_steps: int = _OPTS["max_steps"],
    device: str = _OPTS["device"], max_chars: int = _OPTS["max_chars"], data: list[Path] = _OPTS["data"],
    run_dir: Path = _OPTS["run_dir"], resume: bool = _OPTS["resume"], results: Path = _OPTS["results"],
    retrieval_fraction: float = _OPTS["retrieval_fraction"],
) -> None:
    """Train a LlamaForCausalLM and write a Hugging Face directory (config, safetensors, tokenizer)."""
    from lmsqueeze.errors import LmsqueezeError
    from lmsqueeze.train.presets import MODEL_PRESETS

    if MODEL_PRESETS.get(preset, {}).get("num_loops", 0) != 1:
        raise LmsqueezeError(f"preset {preset!r} is not a single-pass Llama; use default or tiny (or `train looped`)")
    _train(preset, out, tokenizer_dir, train_preset_name, time_budget_s, max_steps, device, max_chars, data,
           run_dir, resume, results, retrieval_fraction)


@app.command()
def looped(
    out: Path = _OPTS["out"], preset: str = typer.Option("looped-4x3", help="looped-4x3, looped-2x6 or tiny-looped"),
    tokenizer_dir: Path = _OPTS["tokenizer_dir"], train_preset_name: str = _OPTS["train_preset_name"],
    time_budget_s: float = _OPTS["time_budget_s"], max_steps: int = _OPTS["max_steps"],
    device: str = _OPTS["device"], max_chars: int = _OPTS["max_chars"], data: list[Path] = _OPTS["data"],
    run_dir: Path = _OPTS["run_dir"], resume: bool = _OPTS["resume"], results: Path = _OPTS["results"],
    retrieval_fraction: float = _OPTS["retrieval_fraction"],
) -> None:
    """Train a looped decoder with the weighted early-exit loss; write config.json + model.safetensors."""
    from lmsqueeze.errors import LmsqueezeError
    from lmsqueeze.train.presets import MODEL_PRESETS

    if MODEL_PRESETS.get(preset, {}).get("num_loops", 1) < 2:
        raise LmsqueezeError(f"preset {preset!r} is not looped; use looped-4x3, looped-2x6 or tiny-looped")
    _train(preset, out, tokenizer_dir, train_preset_name, time_budget_s, max_steps, device, max_chars, data,
           run_dir, resume, results, retrieval_fraction)
