"""lm-evaluation-harness on a model under `lmsqueeze.apply(...)`: zero-shot multiple-choice tasks, offline.

    from lmsqueeze.eval.lm_eval_adapter import lm_eval_tasks
    res = lm_eval_tasks(model, tok, ["my_task"], method=artifact, include_path="my_tasks/")
    res["results"]["my_task"]["acc,none"]

`lm-eval` is an optional dependency (`pip install lm-eval`). Nothing is downloaded: the datasets must be
local, e.g. a task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: data.jsonl}}`
(or a dataset already in the Hugging Face cache); HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set to 1 while
the harness runs. The adapter scores with the model's own forward inside `lmsqueeze.apply(model, method)`,
so every method (CHESS, KVQuant, ...) is scored through its real code path. Requests follow lm-eval's
conventions: trailing spaces of a context move to the continuation; the continuation's tokens are those of
`context + continuation` after the context's tokens; BOS is prepended when the tokenizer has one.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as e:
        raise LmsqueezeError("lm-evaluation-harness is not installed; run `pip install lm-eval` "
                             f"(import failed: {e})") from e
    return LM


@contextmanager
def _offline():
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the lm-eval way (see the module docstring). Context never empty."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if (add_bos and tokenizer.bos_token_id is not None) or not ctx:
        ctx = [bos, *ctx]
    if not cont:
        raise LmsqueezeError(f"continuation {continuation!r} has no tokens of its own; check the task's target "
                             "delimiter")
    return ctx, cont


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                          batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum log p(continuation | context), all tokens greedy).

    Runs model(input_ids [b, T], attention_mask) with right padding, `batch_size` requests per call, longest
    first; inputs longer than max_length + 1 keep their last max_length + 1 tokens.
    """
    device = next(model.parameters()).device
    seqs = [(ctx + cont)[-(max_length + 1):] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(seqs[i]) - 1 for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            s = seqs[i][:-1]
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(idx):
            n, L = len(pairs[i][1]), len(seqs[i]) - 1
            target = torch.tensor(seqs[i][-n:], device=device)
            lp = logp[r, L - n:L]
            out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


@functools.cache
def _adapter_class():
    LM = _import_lm_eval()

    class LmsqueezeLM(LM):
        """lm-eval's LM interface over a (patched) Hugging Face causal LM; loglikelihood-based tasks and greedy
        generate_until."""

        def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                     add_bos: bool = True) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size = batch_size
            self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 2048))
            self.add_bos = add_bos

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [encode_pair(self.tokenizer, *req.args[:2], add_bos=self.add_bos) for req in requests]
            return continuation_logprobs(self.model, pairs, self.max_length, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
                bos = self.tokenizer.bos_token_id
                bos = self.tokenizer.eos_token_id if bos is None else bos
                pairs, prev = [], [bos]
                for s in range(0, len(ids), self.max_length):  # disjoint windows, each after its predecessor
                    chunk = ids[s:s + self.max_length]
                    pairs.append((prev[-1:] if s == 0 else ids[max(0, s - 1):s], chunk))
                    prev = chunk
                out.append(sum(lp for lp, _ in continuation_logprobs(self.model, pairs, self.max_length, 1)))
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            device = next(self.model.parameters()).device
            outs = []
            for req in requests:
                context, kwargs = req.args[0], dict(req.args[1]) if len(req.args) > 1 else {}
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
                if self.add_bos and self.tokenizer.bos_token_id is not None:
                    ctx = [self.tokenizer.bos_token_id, *ctx]
                ids = torch.tensor([ctx[-self.max_length:]], device=device)
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=int(kwargs.get("max_gen_toks", 256)))
                text = self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                outs.append(text)
            return outs

    return LmsqueezeLM


def make_lm(model, tokenizer, batch_size: int = 8, max_length: int | None = None, add_bos: bool = True):
    """An `lm_eval.api.model.LM` that scores with `model` as it is (patch it with `lmsqueeze.apply` around use)."""
    return _adapter_class()(model, tokenizer, batch_size=batch_size, max_length=max_length, add_bos=add_bos)


def lm_eval_tasks(model, tokenizer, tasks: Sequence[str], method=None, *, include_path=None,
                  num_fewshot: int = 0, limit: float | None = None, batch_size: int = 8,
                  max_length: int | None = None, seed: int = 0) -> dict:
    """Run lm-eval `tasks` on `model` under `lmsqueeze.apply(model, method)` (None = Dense), offline.

    include_path: a directory of task YAMLs (local data); limit: examples per task (int) or a fraction.
    Returns lm-eval's result dict ({"results": {task: {"acc,none": ...}}, "n-samples": ..., ...}).
    """
    import lmsqueeze

    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise LmsqueezeError("name at least one lm-eval task, e.g. tasks=['arc_easy']")
    with _offline(), lmsqueeze.apply(model, method):
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
        res = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    if res is None:
        raise LmsqueezeError("lm-eval returned no results (not rank 0?)")
    log.info("lm-eval %s: %s", list(tasks), {t: {k: v for k, v in r.items() if "stderr" not in k}
                                              for t, r in res.get("results", {}).items()})
    return res
