"""Early-exit self-speculative decoding for Llama-family HF models (greedy, lossless), with shared KV.

What SPEED becomes on a model without shared layers: draft k tokens one at a time with the first E decoder
layers + the final norm + the LM head, then verify all of them with the remaining layers in ONE forward.

KV reuse (LayerSkip-style): the draft writes the first-E-layer KV of every drafted position into the same
cache the verifier uses, and stashes each draft's exit hidden state h_E. The verifier runs layers [0, E)
only on the last draft (to get its h_E), then layers [E, L) once over all k + 1 stacked exit states. So
the shallow layers are never recomputed for drafted tokens. Rejected positions are removed with
`cache.crop(-n)` once every layer holds the same positions.

Round invariant: the last committed token x at position P has no KV yet; every layer holds [0, P).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.compat import cache_kw

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SelfSpecStats:
    """Counters of one self-speculative decode: `rounds` = verify forwards (layers [E, L) over k + 1
    tokens); `drafted` / `accepted` draft tokens; `accepted_per_round[i]` = tokens accepted in round i."""

    exit_layer: int = 0
    draft: int = 0
    num_layers: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    shallow_steps: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per verify forward (each verify round ends with one full-depth output)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def layer_passes_per_token(self) -> float:
        """Decoder-layer applications (single-token shallow steps + one deep pass per round) per token;
        plain greedy: L."""
        used = self.shallow_steps * self.exit_layer + self.rounds * (self.num_layers - self.exit_layer)
        return used / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict:
        return {"exit_layer": self.exit_layer, "draft": self.draft, "num_layers": self.num_layers,
                "new_tokens": self.new_tokens, "rounds": self.rounds, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "tokens_per_forward": self.tokens_per_forward,
                "layer_passes_per_token": self.layer_passes_per_token}


def _decoder(model):
    """(inner model with .layers/.norm/.rotary_emb/.embed_tokens, lm_head) of a *ForCausalLM."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise LmsqueezeError(f"{type(model).__name__} is not a Llama-family *ForCausalLM (needs .model.layers and .lm_head)")
    return inner, model.lm_head


def _float_mask(q: int, past: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive causal mask [1, 1, q, past + q] for q queries at positions past..past+q-1 (None if q == 1)."""
    if q == 1:
        return None
    kv = torch.arange(past + q, device=device)
    allowed = kv[None, :] <= (past + torch.arange(q, device=device))[:, None]
    mask = torch.zeros(q, past + q, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def run_layers(model, h: torch.Tensor, start: int, end: int, past: int, cache) -> torch.Tensor:
    """Decoder layers [start, end) over h: [1, q, d] at positions past..past+q-1, appending their KV to
    `cache` (whose layers start..end-1 must hold exactly `past` positions). Returns h: [1, q, d]."""
    inner, _ = _decoder(model)
    q = h.shape[1]
    pos = torch.arange(past, past + q, device=h.device)[None]
    pos_emb = inner.rotary_emb(h, pos)
    mask = _float_mask(q, past, h.dtype, h.device)
    for layer in inner.layers[start:end]:
        out = layer(h, attention_mask=mask, position_ids=pos, **cache_kw(layer, cache), use_cache=True,
                    position_embeddings=pos_emb)
        h = out[0] if isinstance(out, tuple) else out
    return h


def exit_head(model, h: torch.Tensor) -> torch.Tensor:
    """final norm + LM head: h: [1, q, d] -> logits [1, q, V]."""
    inner, head = _decoder(model)
    return head(inner.norm(h))


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def plain_greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Reference: token-by-token greedy decoding with a DynamicCache, ignoring EOS. [1, T] -> [1, T + n]."""
    cache = new_cache(model)
    out = input_ids
    logits = model(input_ids=input_ids, **cache_kw(model, cache), use_cache=True).logits
    for i in range(max_new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        out = torch.cat([out, nxt], dim=1)
        if i + 1 < max_new_tokens:
            logits = model(input_ids=nxt, **cache_kw(model, cache), use_cache=True).logits
    return out


@torch.no_grad()
def self_speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, exit_layer: int,
                              draft: int, cache=None) -> tuple[torch.Tensor, SelfSpecStats]:
    """Greedy early-exit self-speculative decoding, batch 1, EOS ignored (exactly max_new_tokens).

    input_ids: [1, T] -> ([1, T + max_new_tokens], stats). `exit_layer` E in 1..L-1: the draft runs
    layers [0, E) + norm + LM head; `draft` k >= 1 tokens per round. `cache`: an empty HF cache supporting
    update() and crop(-n) (DynamicCache, or lmsqueeze's SqueezeCache); default a new DynamicCache.
    Output equals `plain_greedy` token for token (bit-exact in float64; fp32/bf16 may flip near-ties).
    """
    inner, _ = _decoder(model)
    n_layers = len(inner.layers)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LmsqueezeError(f"self_speculative_generate decodes batch 1; got input_ids {tuple(input_ids.shape)}")
    if not 1 <= exit_layer < n_layers:
        raise LmsqueezeError(f"exit_layer must be in 1..{n_layers - 1} for a {n_layers}-layer model, got {exit_layer}")
    if draft < 1:
        raise LmsqueezeError(f"draft must be >= 1, got {draft}")
    cache = new_cache(model) if cache is None else cache
    stats = SelfSpecStats(exit_layer=exit_layer, draft=draft, num_layers=n_layers)
    embed = inner.embed_tokens
    t0 = input_ids.shape[1]
    if t0 > 1:  # prefill all layers on the prompt minus its last token
        run_layers(model, embed(input_ids[:, :-1]), 0, n_layers, 0, cache)
    seq = input_ids[0].tolist()
    target = t0 + max_new_tokens
    while len(seq) < target:
        p = len(seq) - 1  # position of x, the last committed token (no KV yet)
        k = min(draft, target - len(seq) - 1)  # no point drafting past the end
        tok = seq[-1]
        exits, drafts = [], []
        for i in range(k + 1):  # k draft steps, then the last draft's shallow pass for the verifier
            h_e = run_layers(model, embed(torch.tensor([[tok]], device=input_ids.device)), 0, exit_layer, p + i, cache)
            stats.shallow_steps += 1
            exits.append(h_e)
            if i < k:
                tok = int(exit_head(model, h_e)[0, -1].argmax())
                drafts.append(tok)
        h = run_layers(model, torch.cat(exits, dim=1), exit_layer, n_layers, p, cache)  # [1, k+1, d]
        greedy = exit_head(model, h)[0].argmax(-1).tolist()  # greedy[i]: token at position p+i+1
        stats.rounds += 1
        n = 0
        while n < k and drafts[n] == greedy[n]:
            n += 1
        stats.drafted += k
        stats.accepted += n
        stats.accepted_per_round.append(n)
        seq.extend(drafts[:n] + [greedy[n]])
        if k - n:
            cache.crop(-(k - n))  # every layer now holds [0, p + k + 1): keep [0, p + n + 1)
    stats.new_tokens = len(seq) - t0
    return torch.tensor([seq], device=input_ids.device, dtype=input_ids.dtype), stats
