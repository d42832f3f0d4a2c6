"""Retrieval accuracy on the evaluation harness's own prompts (`lmsqueeze.data.tasks`), scored fast.

The prompts are exactly those `lmsqueeze eval` builds (haystack: the held-out text). Scoring is
teacher-forced: the prompt plus the expected continuation (`" " + value` after prose questions, `value`
after an opening quote) runs through the model once, and a sample counts when the argmax at every answer
token equals it, which is what greedy decoding would produce. This is stricter than the harness's
string match (which also accepts e.g. a missing space), so it can only under-state the harness's score.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

TASKS = ("passkey", "niah_multikey", "kv_retrieval")
FORMATS = ("prose", "code")


def build_samples(tokenizer, haystack: str, lengths: Sequence[int], n: int = 10, seed: int = 0,
                  tasks: Sequence[str] = TASKS, formats: Sequence[str] = FORMATS) -> list[dict]:
    """[{task, format, length, depth, ids (prompt + answer), answer_len}], n evenly spaced depths per cell."""
    from lmsqueeze.data.tasks import make_samples

    depths = [(i + 0.5) / n for i in range(n)]
    out = []
    for s in make_samples(tasks, tokenizer, haystack, lengths, depths, samples=1, seed=seed, formats=formats):
        answer = s.answers[0] if s.prompt.endswith('"') else " " + s.answers[0]
        prompt_ids = tokenizer(s.prompt)["input_ids"]
        both = tokenizer(s.prompt + answer)["input_ids"]
        if both[: len(prompt_ids)] != prompt_ids:
            both = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append({"task": s.task, "format": s.format, "length": s.length, "depth": s.depth,
                    "ids": both, "answer_len": len(both) - len(prompt_ids)})
    return out


def start_building(tokenizer, haystack: str, lengths: Sequence[int], n: int = 10, seed: int = 0) -> dict:
    """Build the samples in a background thread; the result dict gets 'samples' (or 'error') when done."""
    box: dict = {}

    def work() -> None:
        try:
            box["samples"] = build_samples(tokenizer, haystack, lengths, n, seed)
        except Exception as e:  # reported by score_harness
            box["error"] = f"{type(e).__name__}: {e}"

    box["thread"] = threading.Thread(target=work, daemon=True, name="harness-samples")
    box["thread"].start()
    return box


@torch.no_grad()
def score_harness(logits_fn, samples: list[dict], device) -> dict:
    """{task: {format: {length: {"acc": [per pass], "n": n}}}} from per-sample teacher-forced exact match."""
    table: dict = {}
    for s in samples:
        ids = torch.tensor([s["ids"]], device=device)
        a = s["answer_len"]
        per_pass = logits_fn(ids, a + 1)
        target = ids[0, -a:]
        cell = table.setdefault(s["task"], {}).setdefault(s["format"], {}).setdefault(str(s["length"]), {"hits": None, "n": 0})
        hits = [int(torch.equal(lg[0, :a].argmax(-1), target)) for lg in per_pass]
        cell["hits"] = hits if cell["hits"] is None else [x + y for x, y in zip(cell["hits"], hits)]
        cell["n"] += 1
    for by_fmt in table.values():
        for by_len in by_fmt.values():
            for cell in by_len.values():
                cell["acc"] = [h / cell["n"] for h in cell.pop("hits")]
    return table
