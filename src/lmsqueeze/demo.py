"""`lmsqueeze demo`: every available method on one model, quality / memory / speed in one table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.compat import cache_kw

log = logging.getLogger(__name__)


def demo_model(path: Path | None, device: str):
    """The model to demo: the given path, else the bundled zoo model, else a tiny random one (warned)."""
    import lmsqueeze
    from lmsqueeze.models.loading import default_model_path

    if path is not None or default_model_path().exists():
        model, tok = lmsqueeze.load_model(path, device=device)
        return model, tok, str(path or default_model_path())
    from lmsqueeze.models.tiny import tiny_model

    log.warning("the bundled zoo model is not installed: demo runs on a TINY RANDOM model; "
                "its quality numbers mean nothing")
    return tiny_model("llama").to(device), None, "tiny-random-llama (no zoo model bundled)"


DEMO_METHODS = (  # (label, method name, options): what the demo runs, cheap enough for a CPU
    ("dense", "dense", {}),
    ("kvquant nuq4-1%", "kvquant", {"bits": 4}),
    ("kvquant nuq3-1%", "kvquant", {"bits": 3}),
    ("kivi-2", "kivi", {"bits": 2}),
    ("int3 per token", "int-uniform", {"bits": 3}),
    ("chess 50%", "chess", {"sparsity": 0.5}),
    ("cats 50%", "cats", {"sparsity": 0.5}),
)


def demo_methods() -> list[tuple[str, object]]:
    """(label, method config) for every demo entry whose method is registered."""
    from lmsqueeze.methods import METHODS

    return [(label, METHODS[name](**opts)) for label, name, opts in DEMO_METHODS if name in METHODS]


def demo_tokens(tok, n: int, vocab: int) -> torch.Tensor:
    """n held-out tokens (the bundled held-out text when there is a tokenizer, else seeded random ids)."""
    if tok is None:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    try:
        from lmsqueeze.data.heldout import load_heldout_text

        text = load_heldout_text()
    except ImportError:
        from lmsqueeze.data.corpus import read_texts

        text = "\n\n".join(read_texts(split="test", max_chars=n * 8))
    ids = tok(text[: n * 8], add_special_tokens=False)["input_ids"][:n]
    return torch.tensor(ids, dtype=torch.long)


def run_demo(path: Path | None = None, device: str = "cpu", tokens: int = 2048, out: Path | None = None) -> list:
    """Score, size and time every demo method; print a table; return its rows."""
    import lmsqueeze
    from lmsqueeze.data.calibration import calibration_batches
    from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity
    from lmsqueeze.generation import generate

    if tokens < 256:
        raise LmsqueezeError(f"--tokens must be at least 256, got {tokens}")
    model, tok, name = demo_model(path, device)
    ids = demo_tokens(tok, tokens, model.config.vocab_size)
    context = min(1024, len(ids))
    batches = (calibration_batches(tok, 4, 256) if tok is not None
               else [torch.randint(0, model.config.vocab_size, (1, 256))])
    rows = []
    for label, config in demo_methods():
        t0 = time.perf_counter()
        method = config.calibrate(model, batches) if config.needs_calibration else config
        calib_s = time.perf_counter() - t0
        ppl = perplexity(model, ids, method, PerplexityConfig(context_length=context, chunk_size=256),
                         progress=False)
        with lmsqueeze.apply(model, method) as session, torch.inference_mode():
            cache = session.new_cache(batch_size=1, max_length=context)
            model(ids[None, :context].to(model.device), **cache_kw(model, cache), logits_to_keep=1)
            kv_bytes = cache.memory_bytes() / context
        gen = generate(model, ids[None, :128], max_new_tokens=16, method=method, stop_tokens=[])
        rows.append({"method": label, "ppl": ppl.ppl,
                     "kv_bytes_per_token": kv_bytes, "decode_tokens_per_s": gen.decode_tokens_per_s,
                     "calibration_s": calib_s})
    dense = rows[0]["ppl"]
    _print_table(name, device, ppl.tokens, rows, dense)
    fixed = demo_fixed_context(model, tok) if tok is not None else None
    speed = demo_speed(ids, device) if tok is not None else None
    if out is not None:
        Path(out).write_text(json.dumps({"model": name, "device": device, "rows": rows, "fixed_context": fixed,
                                         "speed": speed}, indent=2))
    return rows


FIXED_CONTEXT_METHODS = (("dense", None, {}), ("squeezed 70%", "squeezed", {"sparsity": 0.7}),
                         ("squeezed 90%", "squeezed", {"sparsity": 0.9}),
                         ("quest, squeezed 90%'s budget", "quest", {"same_budget_as": 0.9}),
                         ("a2ats 3% (retrieval in decode)", "a2ats", {"codebook": 256, "kmeans_iters": 8,
                                                                      "offload": False}))


def demo_fixed_context(model, tok, length: int = 2048) -> list[dict]:
    """Squeezed Attention's use: a long context prepared once, several questions answered after it (A2ATS
    too: a calibrated method whose top-K retrieval acts on the decoded answer tokens).

    Two contexts of `length` tokens (held-out code with 4 facts in code and in prose form), 4 questions each;
    every method answers the same questions. Returns one row per method (accuracy, prepare and per-question
    seconds).
    """
    from lmsqueeze.data.calibration import calibration_batches
    from lmsqueeze.data.heldout import load_heldout_text
    from lmsqueeze.data.tasks import fixed_context_sample, haystack_lines
    from lmsqueeze.eval.fixed_context import run_fixed_context
    from lmsqueeze.methods import METHODS

    lines = haystack_lines(load_heldout_text())
    samples = [fixed_context_sample(tok, lines, length, num_facts=4, num_questions=4, index=i, fmt=fmt)
               for i, fmt in enumerate(("code", "prose"))]
    rows = []
    for label, name, opts in FIXED_CONTEXT_METHODS:
        if name is not None and name not in METHODS:
            continue
        if "same_budget_as" in opts:  # centroids counted: the KV fraction squeezed reads at that sparsity
            opts = {"budget": METHODS["squeezed"](sparsity=opts["same_budget_as"]).kv_budget()}
        method = None if name is None else METHODS[name](**opts)
        if method is not None and not hasattr(method, "prepare") and method.needs_calibration:
            method = method.calibrate(model, calibration_batches(tok, 4, 256))
        summary, _ = run_fixed_context(model, tok, samples, method, progress=False)
        rows.append({"method": label, "accuracy": summary["accuracy"],
                     "prepare_s": summary["seconds_context_prefill"],
                     "seconds_per_question": summary["seconds_per_question"]})
    print(f"fixed context (2 contexts of {length} tokens, each prepared once, 8 questions): " + "; ".join(
        f"{r['method']} {r['accuracy']:.2f} (prepare {r['prepare_s']:.1f} s, {r['seconds_per_question']:.2f} s/question)"
        for r in rows))
    return rows


def demo_speed(ids: torch.Tensor, device: str, prompt: int = 64, new_tokens: int = 48) -> dict | None:
    """SPEED on the bundled looped 4x3 decoder: pipelined vs plain greedy decoding (eager), one prompt.

    ids: [T] held-out tokens. Returns the figures printed, or None when the looped model is not bundled.
    """
    from lmsqueeze.models.loading import ZOO_DIR
    from lmsqueeze.models.looped import load_looped

    path = ZOO_DIR / "looped-4x3"
    if not path.exists():
        return None
    model, _ = load_looped(path, device=device)
    x = ids[None, :prompt].to(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 5M-parameter model: one thread is fastest and steadiest on a CPU
    try:
        ref, got, stats, t = _time_speed(model, x, new_tokens)
    finally:
        torch.set_num_threads(threads)
    res = {"model": "looped-4x3", "new_tokens": new_tokens, "identical_to_greedy": bool(torch.equal(ref, got)),
           "greedy_tokens_per_s": new_tokens / t[0], "speed_tokens_per_s": new_tokens / t[1],
           "tokens_per_forward": stats.tokens_per_forward, "flushes": stats.flushes}
    print(f"SPEED, looped 4x3 (eager, {device}): pipelined {res['speed_tokens_per_s']:.1f} tok/s vs greedy "
          f"{res['greedy_tokens_per_s']:.1f} tok/s ({res['speed_tokens_per_s'] / res['greedy_tokens_per_s']:.2f}x), "
          f"{res['tokens_per_forward']:.2f} tokens per full forward, {res['flushes']} flushes, identical to greedy: "
          f"{res['identical_to_greedy']}")
    return res


def _time_speed(model, x: torch.Tensor, new_tokens: int):
    """(greedy ids, pipelined ids, stats, (greedy s, pipelined s)) for prompt x: [1, T]."""
    from lmsqueeze.methods.speed import speed_decode_looped
    from lmsqueeze.models.looped import greedy_decode

    with torch.inference_mode():
        greedy_decode(model, x[:, :8], 2)  # warm-up
        t0 = time.perf_counter()
        ref = greedy_decode(model, x, new_tokens)
        t1 = time.perf_counter()
        got, stats = speed_decode_looped(model, x, new_tokens)
        t2 = time.perf_counter()
    return ref, got, stats, (t1 - t0, t2 - t1)


def _print_table(name: str, device: str, scored: int, rows: list, dense_ppl: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lmsqueeze demo: {name} on {device} ({scored} held-out tokens)")
    for col in ("method", "perplexity", "vs dense", "KV bytes/token", "decode tok/s", "calibration s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / dense_ppl - 1):+.2f}%",
                      f"{r['kv_bytes_per_token']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['calibration_s']:.1f}")
    Console().print(table)
