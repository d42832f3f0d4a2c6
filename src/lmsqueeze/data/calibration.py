"""Calibration batches: fixed-length token sequences from the offline corpus (train split)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmsqueeze.data.corpus import read_texts, token_stream
from lmsqueeze.errors import LmsqueezeError


def calibration_batches(tokenizer, num_samples: int = 16, seq_len: int = 512,
                        roots: list[Path] | None = None, split: str = "train", seed: int = 0) -> list[torch.Tensor]:
    """`num_samples` tensors [1, seq_len] cut at seeded random offsets of the corpus token stream."""
    if num_samples < 1 or seq_len < 2:
        raise LmsqueezeError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    need = num_samples * seq_len * 2
    ids = token_stream(tokenizer, read_texts(roots, split=split, max_chars=need * 6), max_tokens=need)
    if len(ids) < seq_len + 1:
        raise LmsqueezeError(
            f"the corpus gave only {len(ids)} tokens, fewer than seq_len={seq_len}; pass more text"
        )
    stream = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=g)
    return [stream[o:o + seq_len][None] for o in offsets.tolist()]
