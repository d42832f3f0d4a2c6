import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.skipif(not (RESULTS / "train_default.json").exists(), reason="no zoo results")
def test_card_renders_the_committed_numbers(tmp_path):
    from lmsqueeze.train.card import write_zoo_md

    text = write_zoo_md(RESULTS, tmp_path / "zoo.md").read_text()
    res = json.loads((RESULTS / "train_default.json").read_text())
    assert f"{res['final']['test_heldout']['ppl'][0]:.3f}" in text
    assert f"{res['parameters']:,}" in text and "looped-4x3" in text
