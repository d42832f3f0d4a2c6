"""End-to-end zoo recipes: data, training, export and the card's evaluation of one model.

`prepare_data` starts the corpus stream (background) and tokenizes validation and the held-out text;
`train_and_evaluate` trains one preset, writes the model directory (a HF Llama for single-pass models,
a looped directory otherwise) and returns the results dictionary that goes into benchmarks/results/.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmsqueeze.models.looped import (
    LoopedConfig,
    LoopedDecoder,
    greedy_decode,
    load_looped,
    num_parameters,
    save_looped,
)
from lmsqueeze.train.batches import MixedSampler
from lmsqueeze.train.corpus_stream import CorpusSpec, TokenStream, start_stream
from lmsqueeze.train.evaluate import hf_logits_fn, looped_logits_fn, perplexity
from lmsqueeze.train.loop import TrainConfig, train_loop
from lmsqueeze.train.passkey import EVAL_FORMATS, EVAL_LENGTHS, CaseBuilder, passkey_suite
from lmsqueeze.train.synthetic import RetrievalMix, RetrievalSynth
from lmsqueeze.train.tokenizer import fast_encoder, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ZooData:
    """Everything the trainings share: tokenizer, the growing train stream, validation and test tokens."""

    tokenizer_dir: Path
    encoder: object
    bos_id: int
    eos_id: int
    train: TokenStream
    val_tokens: np.ndarray
    test_tokens: np.ndarray
    val_stats: dict
    harness: dict | None = None  # samples of lmsqueeze.data.tasks, built in the background


@dataclass(slots=True)
class EvalConfig:
    """Sizes of the final and periodic evaluations."""

    ppl_window: int = 8192
    lengths: tuple[int, ...] = EVAL_LENGTHS
    formats: tuple[str, ...] = EVAL_FORMATS
    passkey_n: int = 40
    batch_size: int = 8
    val_max_tokens: int | None = 1_000_000
    test_max_tokens: int | None = None  # None: the whole held-out text
    periodic_windows: int = 4
    periodic_passkey_n: int = 8


def run_meta(command: str) -> dict:
    """Provenance for a results file: command, git commit, date, device and library versions."""
    import tokenizers
    import transformers

    commit = os.environ.get("LMSQUEEZE_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"command": command, "git_commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def encode_text(encoder, text: str) -> np.ndarray:
    return np.asarray(encoder.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def prepare_data(tokenizer_dir: str | Path, corpus: CorpusSpec, val_max_chars: int = 4_000_000,
                 background: bool = True, harness_lengths: tuple[int, ...] = (), harness_n: int = 10) -> ZooData:
    """Start the train stream; tokenize validation (same roots, validation split) and the held-out text;
    start building the evaluation harness's prompts at `harness_lengths` (none when empty)."""
    from lmsqueeze.data.heldout import heldout_paths, load_heldout_text

    tokenizer_dir = Path(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    if corpus.roots is None and not corpus.exclude_paths:
        corpus.exclude_paths = heldout_paths()
    train = start_stream(corpus, "train", tokenizer_dir, tok.eos_token_id, background=background)
    val_spec = CorpusSpec(roots=corpus.roots, include_packages=corpus.include_packages, max_chars=val_max_chars,
                          seed=corpus.seed, exclude_paths=corpus.exclude_paths)
    val = start_stream(val_spec, "validation", tokenizer_dir, tok.eos_token_id, background=False)
    encoder = fast_encoder(tokenizer_dir)
    test = encode_text(encoder, load_heldout_text())
    harness = None
    if harness_lengths:
        from lmsqueeze.train.harness_check import start_building

        harness = start_building(load_tokenizer(tokenizer_dir), load_heldout_text(), harness_lengths, harness_n)
    return ZooData(tokenizer_dir, encoder, tok.bos_token_id, tok.eos_token_id, train,
                   val.view().astype(np.int64), test, dict(val.stats), harness)


def harness_scores(data: ZooData, logits_fn, device) -> dict | None:
    """Scores on the harness's prompts (waits for them to be built); None when none were asked for."""
    if data.harness is None:
        return None
    from lmsqueeze.train.harness_check import score_harness

    data.harness["thread"].join()
    if "error" in data.harness:
        return {"error": data.harness["error"]}
    return score_harness(logits_fn, data.harness["samples"], device)


def periodic_evaluator(data: ZooData, builder: CaseBuilder, ecfg: EvalConfig, device):
    """evaluate(model) for the training loop: validation loss per pass on a few windows + a small passkey check
    at the longest evaluation length."""
    seq_len = ecfg.ppl_window
    n_tok = ecfg.periodic_windows * (seq_len - 1)
    amp = torch.device(device).type == "cuda"

    def evaluate(model: LoopedDecoder) -> dict:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            fn = looped_logits_fn(model)
            ppl = perplexity(fn, data.val_tokens, seq_len, data.bos_id, batch_size=ecfg.batch_size,
                             device=device, max_tokens=n_tok)
            pk = passkey_suite(fn, builder, lengths=(max(ecfg.lengths),), formats=("code", "prose"),
                               n=ecfg.periodic_passkey_n, batch_size=ecfg.batch_size, device=device)
        return {"val_ppl": ppl["ppl"], "val_tokens": ppl["tokens"],
                "passkey": {f: v[str(max(ecfg.lengths))]["acc"][-1] for f, v in pk.items()}}
    return evaluate


def _eval_hf(out_dir: Path, module: LoopedDecoder, data: ZooData, builder, ecfg: EvalConfig, device, window: int):
    """Load the exported HF dir the way users do and measure it."""
    try:
        from lmsqueeze.models.loading import load_model
    except ImportError:  # the loader is not there: fall back to transformers
        load_model = None
    res: dict = {}
    if load_model is not None:
        model, tok = load_model(out_dir, dtype=torch.float32, device=device)
        res["loaded_with"] = "lmsqueeze.models.loading.load_model"
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
        res["loaded_with"] = "AutoModelForCausalLM.from_pretrained"
    tok = load_tokenizer(out_dir)
    res["tokenizer_adds_bos"] = tok("x")["input_ids"][0] == tok.bos_token_id
    ids = torch.from_numpy(data.val_tokens[: min(512, len(data.val_tokens))][None]).to(device)
    with torch.no_grad():
        ref = module.to(device=device, dtype=torch.bfloat16).float()(ids)[-1]  # the saved (bf16) weights
        got = model(input_ids=ids).logits
    res["export_max_abs_logit_diff_fp32"] = float((got - ref).abs().max())
    fn = hf_logits_fn(model)
    with torch.no_grad():
        res["validation"] = perplexity(fn, data.val_tokens, window, data.bos_id, batch_size=4, device=device,
                                       max_tokens=ecfg.val_max_tokens)
        res["test_heldout"] = perplexity(fn, data.test_tokens, window, data.bos_id, batch_size=4, device=device,
                                         max_tokens=ecfg.test_max_tokens)
    del model
    model, _ = (load_model(out_dir, dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32,
                           device=device) if load_model is not None else (None, None))
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out_dir).to(device).eval()
    res["passkey_dtype"] = str(next(model.parameters()).dtype)
    res["passkey"] = passkey_suite(hf_logits_fn(model), builder, ecfg.lengths, ecfg.formats, ecfg.passkey_n,
                                   batch_size=ecfg.batch_size, device=device)
    res["harness"] = harness_scores(data, hf_logits_fn(model), device)
    return res


def _eval_looped(out_dir: Path, data: ZooData, builder, ecfg: EvalConfig, device, window: int):
    res: dict = {"loaded_with": "lmsqueeze.models.looped.load_looped"}
    model, _ = load_looped(out_dir, dtype=torch.float32, device=device)
    fn = looped_logits_fn(model)
    with torch.no_grad():
        res["validation"] = perplexity(fn, data.val_tokens, window, data.bos_id, batch_size=4, device=device,
                                       max_tokens=ecfg.val_max_tokens)
        res["test_heldout"] = perplexity(fn, data.test_tokens, window, data.bos_id, batch_size=4, device=device,
                                         max_tokens=ecfg.test_max_tokens)
        prompt = torch.from_numpy(data.test_tokens[:64].reshape(2, 32)).to(device)
        fast = greedy_decode(model, prompt, 16)
        slow = prompt
        for _ in range(16):
            slow = torch.cat([slow, model(slow)[-1][:, -1].argmax(-1, keepdim=True)], dim=1)
    res["greedy_cache_equals_full_forward"] = bool(torch.equal(fast, slow))
    if torch.device(device).type == "cuda":
        model = model.to(torch.bfloat16)
    res["passkey_dtype"] = str(next(model.parameters()).dtype)
    res["passkey"] = passkey_suite(looped_logits_fn(model), builder, ecfg.lengths, ecfg.formats, ecfg.passkey_n,
                                   batch_size=ecfg.batch_size, device=device)
    res["harness"] = harness_scores(data, looped_logits_fn(model), device)
    return res


def train_and_evaluate(name: str, model_cfg: LoopedConfig, train_cfg: TrainConfig, data: ZooData,
                       mix: RetrievalMix, run_dir: str | Path, out_dir: str | Path, ecfg: EvalConfig = EvalConfig(),
                       command: str = "", resume: bool = True, min_stream_tokens: int | None = None,
                       init_from: str | Path | None = None) -> dict:
    """Train preset `name`, write its model directory to `out_dir`, evaluate it; returns the results dict.

    init_from: an exported single-pass directory to continue training from (a fine-tuning stage; its
    `zoo_card.json` is kept in the card as the earlier stage), else fresh weights.
    """
    from lmsqueeze.train.export import load_single_pass, save_hf

    device = train_cfg.device
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    t0 = time.perf_counter()
    data.train.wait_for(min_stream_tokens or 20 * (train_cfg.seq_len + 1))
    wait_s = time.perf_counter() - t0
    torch.manual_seed(train_cfg.seed)
    base = None
    if init_from is not None:
        model = load_single_pass(init_from, model_cfg)
        card_file = Path(init_from) / "zoo_card.json"
        base = {"path": str(init_from), "card": json.loads(card_file.read_text()) if card_file.exists() else None}
    else:
        model = LoopedDecoder(model_cfg)
        model.init_weights(seed=train_cfg.seed)
    synth = RetrievalSynth(data.encoder, mix) if mix.fraction > 0 else None
    sampler = MixedSampler(data.train, data.bos_id, synth, seed=train_cfg.seed)
    builder = CaseBuilder(data.encoder, data.bos_id, data.test_tokens)
    evaluate = periodic_evaluator(data, builder, ecfg, device)
    summary = train_loop(model, sampler, train_cfg, run_dir, evaluate=evaluate, resume=resume)
    log.info("%s: trained %d steps, %d tokens in %.1fs", name, summary["steps"], summary["tokens"], summary["elapsed_s"])
    n_params = num_parameters(model)
    card = {"name": name, "architecture": model_cfg.to_dict(), "parameters": n_params,
            "tokens_seen": summary["tokens"], "steps": summary["steps"], "train_time_s": summary["elapsed_s"],
            "training_mix": {"corpus": "Python sources of the training machine (stdlib + site-packages), "
                                       "train split by path hash, held-out files excluded",
                             "retrieval": mix.describe()}}
    if base is not None:
        card["earlier_stage"] = base["card"]
    if model_cfg.num_loops == 1:
        save_hf(model, out_dir, data.tokenizer_dir, card=card)
    else:
        save_looped(model, out_dir, tokenizer_dir=data.tokenizer_dir)
        (out_dir / "zoo_card.json").write_text(json.dumps(card, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.suffix == ".safetensors")
    t_eval = time.perf_counter()
    window = ecfg.ppl_window
    if model_cfg.num_loops == 1:
        final = _eval_hf(out_dir, model, data, builder, ecfg, device, window)
    else:
        final = _eval_looped(out_dir, data, builder, ecfg, device, window)
    final["eval_time_s"] = time.perf_counter() - t_eval
    log.info("%s: final evaluation took %.1fs", name, final["eval_time_s"])
    return {"meta": run_meta(command), "name": name, "model_config": model_cfg.to_dict(), "parameters": n_params,
            "weights_bytes": size, "train": {k: v for k, v in summary.items() if k != "log"},
            "data_wait_s": wait_s, "corpus": {"train": dict(data.train.stats), "validation": data.val_stats,
                                              "test_heldout_tokens": len(data.test_tokens)},
            "mix": mix.describe(), "init_from": base, "final": final, "log": summary["log"]}
