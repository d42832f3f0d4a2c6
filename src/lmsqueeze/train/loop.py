"""The training loop: AdamW, bf16 autocast, warm-up + cosine, periodic validation, resumable checkpoints.

Works for any `LoopedDecoder` (a plain Llama is the single-pass case): the loss is the weighted sum over
passes of the next-token cross-entropy of each pass's exit logits (`LoopedConfig.loss_weights`).
Progress is steps / max_steps, or elapsed / time_budget_s when a time budget is given (whichever is
further), so a run can be sized by wall-clock time on the GPU. Logs go to `run_dir/log.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.looped import LoopedDecoder
from lmsqueeze.train.schedule import lr_at, seq_len_at

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG_FILE = "log.jsonl"


@dataclass(slots=True)
class TrainConfig:
    """Optimisation settings. batch_size is in sequences of seq_len tokens; shorter curriculum lengths
    keep the tokens per step (batch grows as the length shrinks)."""

    seq_len: int = 8192
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 1000
    time_budget_s: float | None = None
    curriculum: list[tuple[float, int]] = field(default_factory=list)
    log_every: int = 20
    eval_every: int = 250
    ckpt_every: int = 500
    seed: int = 0
    device: str = "cuda"
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1 or self.max_steps < 1:
            raise LmsqueezeError("seq_len must be >= 2, batch_size and max_steps >= 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LmsqueezeError(f"lr {self.lr} must be > 0 and min_lr_ratio {self.min_lr_ratio} in [0, 1]")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise LmsqueezeError(f"time_budget_s {self.time_budget_s} must be > 0 (or None)")
        for start, n in self.curriculum:
            if not 0 <= start <= 1 or n < 2 or n > self.seq_len:
                raise LmsqueezeError(f"curriculum entry ({start}, {n}) needs start in [0, 1] and 2 <= length <= seq_len")
        self.curriculum = [tuple(c) for c in self.curriculum]

    def to_dict(self) -> dict:
        return asdict(self)


def pass_losses(model: LoopedDecoder, batch: torch.Tensor) -> list[torch.Tensor]:
    """batch: [B, T + 1] -> the mean next-token loss of each pass (fp32 scalars)."""
    inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)
    out = []
    for h in model.hidden_per_pass(inputs):
        logits = model.exit_logits(h)
        out.append(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets))
    return out


def weighted_loss(model: LoopedDecoder, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The early-exit training loss and the stacked per-pass losses."""
    losses = pass_losses(model, batch)
    weights = model.config.loss_weights()
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, torch.stack([loss.detach() for loss in losses])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the blocks' matrices only (not on norms or the tied embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and not name.startswith("embed_tokens") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: Path, model, opt, sampler, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sampler": sampler.state_dict(),
                "state": state}, tmp)
    os.replace(tmp, path)


def train_loop(model: LoopedDecoder, sampler, cfg: TrainConfig, run_dir: str | Path,
               evaluate: Callable[[LoopedDecoder], dict] | None = None, resume: bool = True) -> dict:
    """Train `model` in place on batches from `sampler` (`batch(batch_size, seq_len)`, `state_dict()`).

    evaluate(model) -> dict of validation numbers, called every `eval_every` steps and at the end.
    Resumes from `run_dir/checkpoint.pt` when it exists and `resume`. Returns a summary with the log rows.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmsqueezeError("device cuda requested but no GPU is visible; pass --device cpu")
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=1e-8, fused=device.type == "cuda")
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    ckpt = run_dir / CHECKPOINT
    if resume and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        sampler.load_state_dict(saved["sampler"])
        state = saved["state"]
        log.info("resumed from %s at step %d", ckpt, state["step"])
    loss_fn = weighted_loss
    if cfg.compile:
        loss_fn = torch.compile(weighted_loss)
    amp = cfg.amp and device.type == "cuda"
    log_file = (run_dir / LOG_FILE).open("a")
    def emit(row: dict) -> None:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()

    def progress() -> float:
        p = state["step"] / cfg.max_steps
        if cfg.time_budget_s is not None:
            p = max(p, state["elapsed_s"] / cfg.time_budget_s)
        return p

    t_start = time.perf_counter() - state["elapsed_s"]
    window_t, window_tokens = time.perf_counter(), 0
    loss_acc = None
    n_acc = 0
    while progress() < 1.0:
        seq_len = seq_len_at(progress(), cfg.curriculum, cfg.seq_len)
        batch_size = max(1, cfg.batch_size * cfg.seq_len // seq_len)
        batch = sampler.batch(batch_size, seq_len).to(device, non_blocking=True)
        lr = lr_at(state["step"], progress(), cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, per_pass = loss_fn(model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += batch_size * seq_len
        window_tokens += batch_size * seq_len
        loss_acc = per_pass if loss_acc is None else loss_acc + per_pass
        n_acc += 1
        step = state["step"]
        state["elapsed_s"] = time.perf_counter() - t_start
        last = progress() >= 1.0
        if step % cfg.log_every == 0 or step == 1 or last:
            per = (loss_acc / n_acc).tolist()  # synchronises
            now = time.perf_counter()
            state["elapsed_s"] = now - t_start
            emit({"step": step, "tokens": state["tokens"], "lr": lr, "seq_len": seq_len,
                  "loss": sum(w * x for w, x in zip(model.config.loss_weights(), per)), "pass_loss": per,
                  "grad_norm": float(grad_norm), "tok_per_s": window_tokens / max(now - window_t, 1e-9),
                  "elapsed_s": state["elapsed_s"]})
            window_t, window_tokens, loss_acc, n_acc = now, 0, None, 0
        if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
            model.eval()
            result = evaluate(model)
            model.train()
            emit({"step": step, "tokens": state["tokens"], "elapsed_s": state["elapsed_s"], "eval": result})
        if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or last):
            _save_checkpoint(ckpt, model, opt, sampler, state)
    log_file.close()
    model.eval()
    all_rows = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines() if line.strip()]
    return {"steps": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"], "log": all_rows,
            "train_config": cfg.to_dict()}
