"""The held-out evaluation text: test-split Python standard-library files, frozen in the package.

The interpreter's standard library differs between Python versions, so perplexity measured on "the test
split of the local stdlib" would not compare across machines. This module ships one fixed copy instead:
`data/heldout/stdlib_test.txt.xz`, the files of the corpus test split (`corpus.split_of`) of the CPython
3.11 standard library, sorted by relative path and joined by a blank line. `manifest.json` lists the files
(relative path, size, sha256), and `README.md` says how it was made. Source license: Python Software
Foundation License (`LICENSE`).

Training code excludes these files twice: by the split hash (their relative paths hash to "test" on
every machine) and by path suffix (`is_heldout_path`), which also catches copies vendored inside packages.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from functools import lru_cache
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

HELDOUT_DIR = Path(__file__).resolve().parent / "heldout"
TEXT_FILE = "stdlib_test.txt.xz"
MANIFEST_FILE = "manifest.json"
SEPARATOR = "\n\n"


def _check_present() -> None:
    if not (HELDOUT_DIR / TEXT_FILE).exists():
        raise LmsqueezeError(f"held-out text {HELDOUT_DIR / TEXT_FILE} is missing; reinstall lmsqueeze")


@lru_cache(maxsize=1)
def _text() -> str:
    _check_present()
    data = lzma.decompress((HELDOUT_DIR / TEXT_FILE).read_bytes()).decode("utf-8")
    want = heldout_manifest()["text_sha256"]
    if hashlib.sha256(data.encode("utf-8")).hexdigest() != want:
        raise LmsqueezeError(f"held-out text in {HELDOUT_DIR} fails its checksum; reinstall lmsqueeze")
    return data


def load_heldout_text() -> str:
    """The held-out evaluation text (identical on every machine, checked against its sha256)."""
    return _text()


def heldout_manifest() -> dict:
    """The manifest: source, python version, text sha256 and the files (path, bytes, sha256)."""
    _check_present()
    return json.loads((HELDOUT_DIR / MANIFEST_FILE).read_text())


def heldout_paths() -> list[str]:
    """Relative paths (under the stdlib root) of the files in the held-out text."""
    return [f["path"] for f in heldout_manifest()["files"]]


def is_heldout_path(relative_path: str, paths: list[str] | tuple[str, ...]) -> bool:
    """True when `relative_path` is one of `paths` or ends with "/" + one of them (a vendored copy)."""
    rel = relative_path.replace("\\", "/")
    return any(rel == p or rel.endswith("/" + p) for p in paths)


def build_heldout(out_dir: str | Path, stdlib_root: str | Path | None = None) -> dict:
    """Rebuild the held-out files from a stdlib root (default: this interpreter's). Returns the manifest.

    Takes every `.py` file of the corpus test split (split_of on the path relative to the root), in
    sorted order, joined by a blank line; writes `stdlib_test.txt.xz` (xz preset 9) and `manifest.json`.
    """
    import platform

    from lmsqueeze.data.corpus import iter_files, python_source_roots

    root = Path(stdlib_root) if stdlib_root is not None else python_source_roots(False)[0]
    files, texts = [], []
    for rel, path in iter_files([root], "test"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        files.append({"path": rel, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
        texts.append(text)
    data = SEPARATOR.join(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TEXT_FILE).write_bytes(lzma.compress(data.encode("utf-8"), preset=9))
    manifest = {
        "source": "CPython standard library (Python Software Foundation License, see LICENSE)",
        "python_version": platform.python_version(),
        "split": "test (lmsqueeze.data.corpus.split_of, default fractions)",
        "joined_with": SEPARATOR,
        "chars": len(data),
        "text_sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(),
        "files": files,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    _text.cache_clear()
    return manifest
