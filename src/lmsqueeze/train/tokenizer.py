"""Byte-level BPE tokenizer for the zoo, trained offline with the `tokenizers` library.

Digits are split one per token (as in Llama), so a number is copied digit by digit and tokenizes the
same way wherever it appears: that keeps passkey-style retrieval clean. `tokenizer(text)` prepends
`<|bos|>`; documents in training are separated by `<|eos|>`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(slots=True)
class TokenizerConfig:
    """BPE training settings."""

    vocab_size: int = 8192
    min_frequency: int = 2
    model_max_length: int = 8192

    def __post_init__(self) -> None:
        if not 512 <= self.vocab_size <= 65535:
            raise LmsqueezeError(f"vocab_size {self.vocab_size} must be in [512, 65535] (token ids are stored as uint16)")
        if self.min_frequency < 1:
            raise LmsqueezeError(f"min_frequency {self.min_frequency} must be >= 1")


def _empty_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tok


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig = TokenizerConfig()):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast` with bos/eos/pad set."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size, min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise LmsqueezeError("special tokens did not get ids 0, 1, 2; this is a bug in train_tokenizer")
    log.info("trained BPE tokenizer with %d tokens", tok.get_vocab_size())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=config.model_max_length, clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json (loadable with AutoTokenizer) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (out / extra).unlink(missing_ok=True)
    return out


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory written by `save_tokenizer` (offline; AutoTokenizer loads it too)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise LmsqueezeError(f"{path} has no tokenizer.json; run `lmsqueeze train tokenizer --out {path}` first")
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def fast_encoder(path: str | Path):
    """The raw `tokenizers.Tokenizer` of a tokenizer directory, for bulk encoding without special tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files of directory `src` into `dst`."""
    import shutil

    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
