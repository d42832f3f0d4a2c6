"""Token streams of one corpus split, filled by a background thread so training can start early.

Files are listed with `corpus.iter_files` (split by a hash of the relative path), files of the
held-out text are dropped (also vendored copies, by path suffix), the list is shuffled with a seed,
read up to `max_chars`, encoded in parallel by `tokenizers` (no special tokens) and written as
`doc <eos> doc <eos> ...` into a preallocated uint16 buffer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CorpusSpec:
    """Where the training text comes from. roots None: this interpreter's stdlib (+ site-packages)."""

    roots: list[str] | None = None
    include_packages: bool = True
    max_chars: int = 300_000_000
    seed: int = 0
    max_avg_line_chars: int = 200  # skip minified / data-table files
    exclude_paths: list[str] = field(default_factory=list)  # relative paths (and their vendored copies)

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise LmsqueezeError(f"max_chars {self.max_chars} must be >= 1")


def list_files(spec: CorpusSpec, split: str) -> tuple[list[Path], int]:
    """Shuffled files of `split` (without excluded paths); also the number of files excluded by path."""
    from lmsqueeze.data.corpus import iter_files, python_source_roots
    from lmsqueeze.data.heldout import is_heldout_path

    if spec.roots is None:
        roots, suffixes = python_source_roots(spec.include_packages), (".py",)
    else:
        roots, suffixes = [Path(r) for r in spec.roots], (".py", ".txt", ".md")
    files, excluded = [], 0
    for rel, path in iter_files(roots, split, suffixes):
        if spec.exclude_paths and is_heldout_path(rel, spec.exclude_paths):
            excluded += 1
            continue
        files.append(path)
    order = np.random.default_rng(spec.seed).permutation(len(files))
    return [files[i] for i in order], excluded


def _read(path: Path, max_avg_line: int) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if not text.strip() or len(text) / (text.count("\n") + 1) > max_avg_line:
        return None
    return text


def iter_texts(spec: CorpusSpec, split: str):
    """Texts of `split` in the shuffled file order, up to `spec.max_chars` characters (for tokenizer training)."""
    files, _ = list_files(spec, split)
    chars = 0
    for path in files:
        text = _read(path, spec.max_avg_line_chars)
        if text is None:
            continue
        text = text[: spec.max_chars - chars]
        chars += len(text)
        yield text
        if chars >= spec.max_chars:
            return


class TokenStream:
    """A uint16 token buffer that a background thread fills; `view()` is the part ready so far."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.uint16)
        self.n = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.stats: dict = {"files": 0, "chars": 0, "excluded_heldout_files": 0, "skipped_files": 0}
        self._thread: threading.Thread | None = None

    def view(self) -> np.ndarray:
        return self.buf[: self.n]

    def wait_for(self, n_tokens: int, timeout_s: float = 600.0) -> None:
        """Block until `n_tokens` are ready (or the fill finished); raise if the fill failed."""
        t0 = time.perf_counter()
        while self.n < n_tokens and not self.finished.is_set():
            if time.perf_counter() - t0 > timeout_s:
                raise LmsqueezeError(f"corpus stream has {self.n} tokens after {timeout_s:.0f}s; use a larger corpus")
            time.sleep(0.05)
        if self.error is not None:
            raise self.error
        if self.n < n_tokens:
            raise LmsqueezeError(f"corpus has only {self.n} tokens, {n_tokens} needed; pass more text or shorter sequences")

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error


def fill_stream(stream: TokenStream, files: list[Path], encoder, eos_id: int, spec: CorpusSpec,
                batch_files: int = 512) -> None:
    """Read, encode and append `files` into `stream` until `spec.max_chars` or the buffer is full."""
    try:
        chars = 0
        for i in range(0, len(files), batch_files):
            texts = []
            for path in files[i:i + batch_files]:
                text = _read(path, spec.max_avg_line_chars)
                if text is None:
                    stream.stats["skipped_files"] += 1
                    continue
                texts.append(text[: spec.max_chars - chars])
                chars += len(texts[-1])
                if chars >= spec.max_chars:
                    break
            encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
            for text, enc in zip(texts, encode(texts, add_special_tokens=False)):
                ids = enc.ids
                room = len(stream.buf) - stream.n
                if room <= 1:
                    break
                ids = ids[: room - 1]
                stream.buf[stream.n:stream.n + len(ids)] = ids
                stream.buf[stream.n + len(ids)] = eos_id
                stream.n += len(ids) + 1  # publish after the write
                stream.stats["files"] += 1
                stream.stats["chars"] += len(text)
            if chars >= spec.max_chars or len(stream.buf) - stream.n <= 1:
                break
    except BaseException as e:  # surfaced by wait_for / join
        stream.error = e
    finally:
        stream.stats["tokens"] = int(stream.n)
        stream.finished.set()


def start_stream(spec: CorpusSpec, split: str, tokenizer_dir: str | Path, eos_id: int,
                 background: bool = True) -> TokenStream:
    """Start filling a token stream of `split`; returns at once when `background`."""
    from lmsqueeze.train.tokenizer import fast_encoder

    files, excluded = list_files(spec, split)
    if not files:
        raise LmsqueezeError(f"no {split} files found under {spec.roots or 'the Python installation'}")
    stream = TokenStream(capacity=spec.max_chars // 2 + 1024)
    stream.stats["excluded_heldout_files"] = excluded
    stream.stats["listed_files"] = len(files)
    encoder = fast_encoder(tokenizer_dir)
    if background:
        stream._thread = threading.Thread(target=fill_stream, args=(stream, files, encoder, eos_id, spec),
                                          daemon=True, name=f"corpus-{split}")
        stream._thread.start()
    else:
        fill_stream(stream, files, encoder, eos_id, spec)
        if stream.error is not None:
            raise stream.error
    return stream
