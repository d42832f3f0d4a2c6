"""Offline text corpora: the interpreter's own Python sources, or local text files.

Files are split into train / validation / test by a hash of their path relative to the root they were
found under, so the split is the same on every machine that has the same files.
"""

from __future__ import annotations

import functools
import hashlib
import site
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True, slots=True)
class SplitFractions:
    """Fractions of files in validation and test; the rest is train."""

    validation: float = 0.02
    test: float = 0.02

    def __post_init__(self) -> None:
        if not (0 <= self.validation < 1 and 0 <= self.test < 1 and self.validation + self.test < 1):
            raise LmsqueezeError(
                f"split fractions validation={self.validation}, test={self.test} must be in [0, 1) "
                "and sum to less than 1"
            )


def split_of(relative_path: str, fractions: SplitFractions = SplitFractions()) -> str:
    """The split ('train', 'validation' or 'test') of a file, from a hash of its relative path."""
    digest = hashlib.sha256(relative_path.replace("\\", "/").encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions.test:
        return "test"
    if u < fractions.test + fractions.validation:
        return "validation"
    return "train"


def python_source_roots(include_packages: bool = False) -> list[Path]:
    """Roots of the running interpreter's standard library (and, optionally, installed packages)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [stdlib]
    if include_packages:
        for p in [*site.getsitepackages(), site.getusersitepackages()]:
            path = Path(p)
            if path.is_dir() and path not in roots:
                roots.append(path)
    return roots


@functools.lru_cache(maxsize=32)
def _listing(root: Path, suffixes: tuple[str, ...]) -> tuple[Path, ...]:
    """Sorted files under a directory with one of `suffixes` (cached: the stdlib walk takes seconds)."""
    return tuple(sorted(p for p in root.rglob("*") if p.suffix in suffixes))


def iter_files(
    roots: list[Path], split: str, suffixes: tuple[str, ...] = (".py",),
    fractions: SplitFractions = SplitFractions(), max_bytes: int = 1_000_000,
) -> Iterator[tuple[str, Path]]:
    """Yield (relative path, path) of the files of one split under `roots`, in a stable order.

    Files under a stdlib root's `site-packages` are skipped (they are packages, not the stdlib).
    """
    if split not in SPLITS:
        raise LmsqueezeError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    for root in roots:
        root = Path(root).resolve()
        if not root.exists():
            raise LmsqueezeError(f"corpus path {root} does not exist; pass an existing file or directory")
        files = [root] if root.is_file() else _listing(root, suffixes)
        for path in files:
            rel = path.name if root.is_file() else path.relative_to(root).as_posix()
            if "site-packages/" in rel and root.name != "site-packages" and "site-packages" not in root.parts:
                continue
            if "__pycache__" in rel or not path.is_file() or path.stat().st_size > max_bytes:
                continue
            if root.is_file() or split_of(rel, fractions) == split:
                yield rel, path


def read_texts(
    roots: list[Path] | None = None, split: str = "train", max_chars: int | None = None,
    suffixes: tuple[str, ...] = (".py",), include_packages: bool = False,
    fractions: SplitFractions = SplitFractions(),
) -> Iterator[str]:
    """Texts of one split, in a stable order, up to `max_chars` characters in total.

    roots: directories or files; None means the Python standard library (plus installed packages when
    `include_packages`). A single text file given as a root belongs to every split.
    """
    if roots is None:
        roots = python_source_roots(include_packages)
        suffixes = (".py",)
    elif any(Path(r).is_dir() for r in roots) and suffixes == (".py",):
        suffixes = (".py", ".txt", ".md")
    total = 0
    for _, path in iter_files([Path(r) for r in roots], split, suffixes, fractions):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        total += len(text)
        yield text
        if max_chars is not None and total >= max_chars:
            return


def token_stream(tokenizer, texts, max_tokens: int | None = None, separator: str = "\n\n") -> list[int]:
    """Concatenate tokenized texts (joined by `separator`) into one list of token ids."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + separator, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids
