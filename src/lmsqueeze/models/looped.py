"""A looped (parameter-shared) Llama-style decoder: n unique blocks cycled R times.

Pass r (0-based) runs the n unique blocks in order on the residual stream; after every pass the shared
final RMSNorm + tied LM head turns the stream into logits (an early exit). The residual stream itself
goes on to the next pass un-normalised. With R == 1 this is exactly a `LlamaForCausalLM` (same weight
names, RoPE convention and norms), which is how the zoo's default model is trained and then exported.

Each (pass, layer) has its own KV entries, since the same block sees different inputs on each pass:
`LoopedCache` keys them by (pass, layer), so incremental decoding reproduces the full forward.

Saved as `config.json` (model_type "lmsqueeze_looped") + `model.safetensors` (+ tokenizer files); no
remote code: `load_looped(dir)` rebuilds this class.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

MODEL_TYPE = "lmsqueeze_looped"
WEIGHTS_FILE = "model.safetensors"
MAX_FILE_BYTES = 15 * 2**20


@dataclass(slots=True)
class LoopedConfig:
    """Shape of a looped decoder: `num_unique_layers` blocks cycled `num_loops` times."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_unique_layers: int = 4
    num_loops: int = 3
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = 2
    exit_loss_weights: list[float] = field(default_factory=list)  # per pass; empty: proportional to (r+1)^2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "head_dim", "num_unique_layers", "num_loops", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise LmsqueezeError(f"LoopedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise LmsqueezeError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise LmsqueezeError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.exit_loss_weights and len(self.exit_loss_weights) != self.num_loops:
            raise LmsqueezeError(
                f"exit_loss_weights has {len(self.exit_loss_weights)} entries; give one per pass "
                f"({self.num_loops}) or none")

    @property
    def name(self) -> str:
        return f"{self.num_unique_layers}x{self.num_loops}"

    def loss_weights(self) -> list[float]:
        """Weights of the per-pass losses, summing to 1 (later passes weigh more: (r+1)^2 by default,
        1:4:9 for three passes, so the last pass keeps improving on the ones before)."""
        w = self.exit_loss_weights or [float((r + 1) ** 2) for r in range(self.num_loops)]
        total = sum(w)
        return [x / total for x in w]

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "architectures": ["LoopedDecoder"], **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> LoopedConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, cast back, scale (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin: [..., T, head_dim] for integer `positions` [..., T] (Llama's rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64)
                                .float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [B, T, D] or [T, D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class LoopedCache:
    """KV cache keyed by (pass, layer): k, v: [B, Hkv, S, D], keys stored after RoPE."""

    def __init__(self) -> None:
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def seq_length(self, pass_idx: int = 0, layer: int = 0) -> int:
        entry = self.kv.get((pass_idx, layer))
        return 0 if entry is None else entry[0].shape[2]

    def update(self, key: tuple[int, int], k: torch.Tensor, v: torch.Tensor):
        """Append k, v: [B, Hkv, T, D] to entry `key`; returns the full k, v of that entry."""
        if key in self.kv:
            k = torch.cat([self.kv[key][0], k], dim=2)
            v = torch.cat([self.kv[key][1], v], dim=2)
        self.kv[key] = (k, v)
        return k, v

    def crop(self, length: int) -> None:
        """Keep the first `length` positions of every entry (roll back speculative tokens)."""
        self.kv = {key: (k[:, :, :length], v[:, :, :length]) for key, (k, v) in self.kv.items()}


class Attention(nn.Module):
    """GQA self-attention with Llama's weight names (q/k/v/o_proj, no biases)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LoopedCache | None = None, key: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d]. With a cache, these T tokens follow the cached ones."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.seq_length(*key)
            k, v = cache.update(key, k, v)
        groups = cfg.num_heads // cfg.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        elif t == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # queries at positions past..past+t-1 see keys 0..their own position
            s = k.shape[2]
            mask = torch.arange(s, device=x.device)[None, :] <= (past + torch.arange(t, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward with Llama's weight names."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm Llama decoder block."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, cache=None, key=(0, 0)):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, key)
        return h + self.mlp(self.post_attention_layernorm(h))


class LoopedDecoder(nn.Module):
    """Embeddings, `num_unique_layers` blocks cycled `num_loops` times, a shared norm + tied LM head."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_unique_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Normal(0, std) weights; residual output projections scaled by 1/sqrt(2 * depth)."""
        gen = torch.Generator().manual_seed(seed)
        depth = self.config.num_unique_layers * self.config.num_loops
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
                continue
            s = std / math.sqrt(2 * depth) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * s)

    def positions_for(self, input_ids: torch.Tensor, cache: LoopedCache | None) -> torch.Tensor:
        start = 0 if cache is None else cache.seq_length(0, 0)
        return torch.arange(start, start + input_ids.shape[1], device=input_ids.device)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin for `positions` [T] or [B, T]."""
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def run_pass(self, h: torch.Tensor, pass_idx: int, cos, sin, cache: LoopedCache | None = None):
        """One pass of the unique blocks over the residual stream h: [B, T, d]."""
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, (pass_idx, i))
        return h

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit head: h: [B, T, d] -> logits [B, T, V]."""
        return F.linear(self.norm(h), self.embed_tokens.weight)

    def hidden_per_pass(self, input_ids: torch.Tensor, cache: LoopedCache | None = None,
                        positions: torch.Tensor | None = None, num_passes: int | None = None):
        """The residual stream after each pass: list of [B, T, d] (not yet normalised)."""
        if positions is None:
            positions = self.positions_for(input_ids, cache)
        h = self.embed_tokens(input_ids)
        dtype = torch.get_autocast_dtype("cuda") if (h.is_cuda and torch.is_autocast_enabled()) else h.dtype
        cos, sin = self.rope(positions, dtype)
        outs = []
        for r in range(num_passes or self.config.num_loops):
            h = self.run_pass(h, r, cos, sin, cache)
            outs.append(h)
        return outs

    def forward(self, input_ids: torch.Tensor, cache: LoopedCache | None = None,
                positions: torch.Tensor | None = None, num_passes: int | None = None) -> list[torch.Tensor]:
        """input_ids: [B, T] -> per-pass logits, a list of `num_loops` tensors [B, T, V]."""
        return [self.exit_logits(h) for h in self.hidden_per_pass(input_ids, cache, positions, num_passes)]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def greedy_decode(model: LoopedDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding from the final pass with a (pass, layer) KV cache. input_ids: [B, T] -> [B, T+n]."""
    cache = LoopedCache()
    logits = model(input_ids, cache=cache)[-1]
    out = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache)[-1]
    return out


def save_looped(model: LoopedDecoder, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json + model.safetensors (in `dtype`) (+ the tokenizer files) into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > MAX_FILE_BYTES:
        raise LmsqueezeError(f"looped model is {size / 2**20:.1f} MiB; keep it under 15 MiB (fewer layers or a smaller width)")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        from lmsqueeze.train.tokenizer import copy_tokenizer

        copy_tokenizer(tokenizer_dir, out)
    return out


def load_looped(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a directory written by `save_looped`; returns (model in eval mode, tokenizer or None)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists() or not (path / WEIGHTS_FILE).exists():
        raise LmsqueezeError(f"{path} is not a looped model directory (needs config.json and {WEIGHTS_FILE})")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise LmsqueezeError(f"{path} holds a {raw.get('model_type')!r} model, not {MODEL_TYPE!r}; use load_model()")
    model = LoopedDecoder(LoopedConfig.from_dict(raw))
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LmsqueezeError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device=device, dtype=dtype).eval()
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from lmsqueeze.train.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    return model, tokenizer
