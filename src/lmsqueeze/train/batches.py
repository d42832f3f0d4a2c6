"""Training batches: random windows of the corpus stream mixed with synthetic retrieval sequences."""

from __future__ import annotations

import numpy as np
import torch

from lmsqueeze.train.corpus_stream import TokenStream
from lmsqueeze.train.synthetic import RetrievalSynth


class MixedSampler:
    """Rows are `<bos>` + seq_len tokens: a corpus window, or (with probability `synth.mix.fraction`)
    a retrieval sequence. Resumable: `state_dict()` holds the random generator's state."""

    def __init__(self, stream: TokenStream, bos_id: int, synth: RetrievalSynth | None = None, seed: int = 0):
        self.stream = stream
        self.bos_id = bos_id
        self.synth = synth
        self.rng = np.random.default_rng(seed)
        self.rows = 0
        self.synthetic_rows = 0

    def row(self, seq_len: int) -> np.ndarray:
        data = self.stream.view()
        if self.synth is not None and self.rng.random() < self.synth.mix.fraction:
            body = self.synth.sequence(self.rng, seq_len, data)
            self.synthetic_rows += 1
        else:
            start = int(self.rng.integers(0, len(data) - seq_len))
            body = data[start:start + seq_len].astype(np.int64)
        self.rows += 1
        return np.concatenate([[self.bos_id], body])

    def batch(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 (inputs are [:, :-1], targets [:, 1:]), pinned when CUDA is there."""
        out = torch.from_numpy(np.stack([self.row(seq_len) for _ in range(batch_size)]))
        return out.pin_memory() if torch.cuda.is_available() else out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "rows": self.rows, "synthetic_rows": self.synthetic_rows}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.rows = state["rows"]
        self.synthetic_rows = state["synthetic_rows"]
