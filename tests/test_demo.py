"""The demo's pieces on the bundled models (the full `lmsqueeze demo` is too slow for the suite)."""

import torch

from lmsqueeze.demo import demo_methods, demo_speed, demo_tokens
from lmsqueeze.models.loading import ZOO_DIR


def test_demo_speed_is_lossless_on_the_bundled_looped_model():
    import lmsqueeze

    _, tok = lmsqueeze.load_model()
    ids = demo_tokens(tok, 128, 8192)
    res = demo_speed(ids, "cpu", prompt=32, new_tokens=12)
    assert (ZOO_DIR / "looped-4x3").exists() and res is not None
    assert res["identical_to_greedy"] and res["tokens_per_forward"] > 1.0
    assert torch.get_num_threads() >= 1


def test_demo_methods_are_registered():
    labels = [label for label, _ in demo_methods()]
    assert labels[0] == "dense" and "kvquant nuq3-1%" in labels and "chess 50%" in labels


def test_demo_fixed_context_rows():
    import lmsqueeze
    from lmsqueeze.demo import FIXED_CONTEXT_METHODS, demo_fixed_context

    model, tok = lmsqueeze.load_model()
    rows = demo_fixed_context(model, tok, length=512)
    assert [r["method"] for r in rows] == [m[0] for m in FIXED_CONTEXT_METHODS]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["prepare_s"] > 0 for r in rows)
