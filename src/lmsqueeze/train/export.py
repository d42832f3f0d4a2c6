"""Export a single-pass `LoopedDecoder` (num_loops == 1) as a Hugging Face `LlamaForCausalLM` directory.

The weight names and the maths are the same (pre-norm blocks, rotate-half RoPE, fp32 RMSNorm, tied
LM head), so the export is a rename; `tests/train/test_export.py` checks the logits match.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.models.looped import LoopedConfig, LoopedDecoder

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "12MB"  # every file < 15 MiB: files back from the GPU machine are limited to 16 MiB


def llama_config(cfg: LoopedConfig):
    """The `LlamaConfig` of a single-pass looped config."""
    from transformers import LlamaConfig

    if cfg.num_loops != 1:
        raise LmsqueezeError(f"only a single-pass model (num_loops=1) is a Llama; this one is {cfg.name}")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_unique_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def to_llama(model: LoopedDecoder, dtype: torch.dtype = torch.float32):
    """A `LlamaForCausalLM` with the weights of a single-pass `model` (eval mode, on CPU)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = model.config
    llama = LlamaForCausalLM(llama_config(cfg)).to(dtype)
    state = {f"model.{k}": v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise LmsqueezeError(f"export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}; this is a bug")
    llama.tie_weights()
    llama.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    return llama.eval()


def save_hf(model: LoopedDecoder, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            dtype: torch.dtype = torch.bfloat16, card: dict | None = None) -> Path:
    """Write a HF directory (config, sharded safetensors, generation config, tokenizer) into `out_dir`.

    card: optional facts written as `zoo_card.json` beside the weights (training mix, tokens, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llama = to_llama(model, dtype)
    llama.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    if tokenizer_dir is not None:
        from lmsqueeze.train.tokenizer import copy_tokenizer

        copy_tokenizer(tokenizer_dir, out)
    if card is not None:
        (out / "zoo_card.json").write_text(json.dumps(card, indent=2) + "\n")
    too_big = [p.name for p in out.iterdir() if p.stat().st_size >= 15 * 2**20]
    if too_big:
        raise LmsqueezeError(f"files {too_big} are >= 15 MiB; lower MAX_SHARD_SIZE")
    return out


def load_single_pass(hf_dir: str | Path, cfg: LoopedConfig) -> LoopedDecoder:
    """The inverse of `save_hf`: a single-pass `LoopedDecoder` (fp32) with the weights of an exported directory.

    Used to continue training a bundled model (a fine-tuning stage). `cfg` must describe the same shape.
    """
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise LmsqueezeError(f"no *.safetensors in {hf_dir}; pass a directory written by `lmsqueeze train model`")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model = LoopedDecoder(cfg)
    ours = {k[len("model."):]: v.float() for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise LmsqueezeError(f"{hf_dir} does not match the {cfg.name} shape (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); pick the preset it was trained with")
    return model
