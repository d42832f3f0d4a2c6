"""Where evaluation text comes from: a user's files, the held-out text, or the corpus test split."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from lmsqueeze.data.corpus import read_texts
from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)


def eval_text(data: str | Path | None = None, max_chars: int | None = None) -> tuple[str, dict]:
    """(text, description). data: a text file or a directory (its 'test' split); None: the project's
    held-out text when installed, else the test split of the Python standard library corpus."""
    if data is not None:
        path = Path(data)
        texts = list(read_texts([path], split="test", max_chars=max_chars))
        if path.is_dir() and not texts:  # a small directory may have no file hashed into 'test'
            texts = list(read_texts([path], split="train", max_chars=max_chars))
        source = str(path)
    else:
        texts, source = _heldout(max_chars)
    text = "\n\n".join(texts)
    if not text.strip():
        raise LmsqueezeError(f"no evaluation text found in {source}; pass --data with a text file or directory")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text, {"source": source, "chars": len(text), "sha256": digest}


def _heldout(max_chars: int | None) -> tuple[list[str], str]:
    try:
        from lmsqueeze.data.heldout import load_heldout_text
    except ImportError:
        load_heldout_text = None
    if load_heldout_text is not None:
        text = load_heldout_text()
        if max_chars is not None:
            text = text[:max_chars]
        return [text], "heldout"
    log.info("no held-out text installed; using the test split of the standard library corpus")
    return list(read_texts(None, split="test", max_chars=max_chars)), "corpus:stdlib:test"
