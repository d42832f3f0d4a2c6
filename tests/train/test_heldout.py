import hashlib

from lmsqueeze.data.corpus import split_of
from lmsqueeze.data.heldout import heldout_manifest, heldout_paths, is_heldout_path, load_heldout_text


def test_same_text_twice_and_checksum():
    a, b = load_heldout_text(), load_heldout_text()
    assert a == b and len(a) > 100_000
    m = heldout_manifest()
    assert hashlib.sha256(a.encode()).hexdigest() == m["text_sha256"]
    assert "Python Software Foundation" in m["source"]


def test_files_are_test_split_and_excluded_by_suffix():
    paths = heldout_paths()
    assert paths and all(split_of(p) == "test" for p in paths)
    p = paths[0]
    assert is_heldout_path(p, paths) and is_heldout_path("vendor/pkg/" + p, paths)
    assert not is_heldout_path("x" + p, paths)
