"""Choose the exit layer E and draft length k of early-exit self-speculation on held-out text.

For a few held-out prompts, decode a plain greedy continuation, then run the full model once over prompt +
continuation with hidden states. On the greedy trajectory the draft after layer E at position t is exactly
argmax(lm_head(norm(h_E[t]))) (every accepted prefix IS the greedy prefix), so replaying the rounds of
`self_speculative_generate` for each (E, k) gives its exact acceptance on those prompts without decoding.

Score: committed tokens per full-forward equivalent of weight reads. A round reads one full forward
(layers [0, E) for the last draft + [E, L) for the verify + the head) plus k draft steps of E layers + head:
cost = F + k * (E * c_layer + c_head), F = L * c_layer + c_head (parameter counts). Tokens per verify
forward alone would always pick E = L - 1 and the largest k, and ignores what drafting costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.speed.early_exit import _decoder, plain_greedy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CalibrationConfig:
    """Held-out prompts: `num_prompts` windows of `prompt_tokens` tokens, each continued greedily for
    `gen_tokens`; candidates `exit_layers` (None: 1..L-1) x `drafts`."""

    num_prompts: int = 4
    prompt_tokens: int = 64
    gen_tokens: int = 48
    exit_layers: tuple[int, ...] | None = None
    drafts: tuple[int, ...] = (1, 2, 3, 4, 6, 8)

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.prompt_tokens < 1 or self.gen_tokens < 2:
            raise LmsqueezeError("CalibrationConfig needs num_prompts >= 1, prompt_tokens >= 1, gen_tokens >= 2")
        if not self.drafts or min(self.drafts) < 1:
            raise LmsqueezeError(f"CalibrationConfig.drafts must be non-empty and >= 1, got {self.drafts}")


@dataclass(slots=True)
class Calibration:
    """Best (exit_layer, draft), its score and the per-candidate table (dicts with acceptance and both scores).
    `tokens_per_full_forward_equiv` < 1 means no candidate beats plain greedy decoding on this model."""

    exit_layer: int
    draft: int
    tokens_per_full_forward_equiv: float = 0.0
    table: list[dict] = field(default_factory=list)


def replay_rounds(match: list[bool], draft: int) -> tuple[int, int, int, int]:
    """Replay greedy self-speculation over one trajectory. match[t]: the early exit at step t predicts the
    greedy token t. Returns (tokens, rounds, drafted, accepted)."""
    t = tokens = rounds = drafted = accepted = 0
    n_total = len(match)
    while t < n_total:
        k = min(draft, n_total - t - 1)
        n = 0
        while n < k and match[t + n]:
            n += 1
        rounds += 1
        drafted += k
        accepted += n
        tokens += n + 1
        t += n + 1
    return tokens, rounds, drafted, accepted


@torch.no_grad()
def early_exit_matches(model, ids: torch.Tensor, start: int) -> list[list[bool]]:
    """ids: [1, S] a greedy trajectory whose tokens from `start` on are the model's greedy outputs.
    Returns m[E][j] for E in 0..L (E = 0 unused): does the exit after layer E at position start-1+j
    predict ids[start+j]?"""
    inner, head = _decoder(model)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states  # L + 1 entries; the last one is already normalised
    tgt = ids[0, start:]
    res = [[]]
    for e in range(1, len(hs)):
        h = hs[e][:, start - 1:-1]
        logits = head(h if e == len(hs) - 1 else inner.norm(h))
        res.append((logits[0].argmax(-1) == tgt).tolist())
    return res


def _param_count(mod) -> int:
    return sum(p.numel() for p in mod.parameters())


@torch.no_grad()
def calibrate_self_speculation(model, tok, cfg: CalibrationConfig | None = None,
                               text: str | None = None) -> Calibration:
    """Best (E, k) for `self_speculative_generate` on held-out text (default: lmsqueeze's held-out text)."""
    cfg = cfg or CalibrationConfig()
    inner, head = _decoder(model)
    n_layers = len(inner.layers)
    if text is None:
        from lmsqueeze.data.heldout import load_heldout_text

        text = load_heldout_text()
    dev = next(model.parameters()).device
    all_ids = tok.encode(text) if hasattr(tok, "encode") else tok(text)["input_ids"]
    if len(all_ids) < cfg.prompt_tokens * cfg.num_prompts:
        raise LmsqueezeError(f"held-out text has {len(all_ids)} tokens; need {cfg.prompt_tokens * cfg.num_prompts}")
    stride = len(all_ids) // cfg.num_prompts
    exits = cfg.exit_layers or tuple(range(1, n_layers))
    for e in exits:
        if not 1 <= e < n_layers:
            raise LmsqueezeError(f"exit layer {e} out of range 1..{n_layers - 1}")
    matches = {e: [] for e in exits}
    for i in range(cfg.num_prompts):
        prompt = torch.tensor([all_ids[i * stride:i * stride + cfg.prompt_tokens]], device=dev)
        seq = plain_greedy(model, prompt, cfg.gen_tokens)
        m = early_exit_matches(model, seq, prompt.shape[1])
        for e in exits:
            matches[e].append(m[e])
    c_layer = _param_count(inner.layers[0])
    c_head = head.weight.numel()
    full = n_layers * c_layer + c_head
    table = []
    for e in exits:
        flat = [x for traj in matches[e] for x in traj]
        for k in cfg.drafts:
            tokens = rounds = drafted = accepted = 0
            cost = 0.0
            for traj in matches[e]:
                t, r, d, a = replay_rounds(traj, k)
                tokens, rounds, drafted, accepted = tokens + t, rounds + r, drafted + d, accepted + a
                cost += r * full + d * (e * c_layer + c_head)
            table.append({"exit_layer": e, "draft": k, "exit_agreement": sum(flat) / len(flat),
                          "acceptance_rate": accepted / max(drafted, 1),
                          "tokens_per_verify": tokens / rounds,
                          "tokens_per_full_forward_equiv": tokens * full / cost})
    best = max(table, key=lambda r: r["tokens_per_full_forward_equiv"])
    log.info("self-speculation calibration: E=%d k=%d, %.3f tokens per full-forward equivalent",
             best["exit_layer"], best["draft"], best["tokens_per_full_forward_equiv"])
    if best["tokens_per_full_forward_equiv"] < 1.0:
        log.warning("self-speculation: no (E, k) beats plain greedy decoding on this model (best %.3f tokens per "
                    "full-forward equivalent); the early exits agree too rarely", best["tokens_per_full_forward_equiv"])
    return Calibration(exit_layer=best["exit_layer"], draft=best["draft"],
                       tokens_per_full_forward_equiv=best["tokens_per_full_forward_equiv"], table=table)
