"""`bench e2e` with the lmsqueeze-chess variant: dense vs CHESS decode tokens/s, and the model left as it was."""

import json

import torch

from lmsqueeze.cli import main


def test_e2e_chess_variant_rows_and_restores_the_model(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--lengths", "24",
                 "--batch", "2", "--variants", "lmsqueeze-graph,lmsqueeze-chess,hf-static-eager",
                 "--baseline", "lmsqueeze-graph", "--chess-sparsity", "0.5", "--iters", "20", "--warmup", "1",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["lmsqueeze-graph", "lmsqueeze-chess", "hf-static-eager"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0
        if r["method"] == "lmsqueeze-chess":  # sparse: other logits, but finite and close to dense
            assert 1e-4 < r["logits_rel_err"] < 0.5
        elif r["method"] == "hf-static-eager":  # after CHESS: the dense model again (CHESS was removed)
            assert r["logits_rel_err"] < 1e-5


def test_e2e_chess_sparsity_zero_is_dense(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--lengths", "16",
                 "--batch", "1", "--variants", "lmsqueeze-graph,lmsqueeze-chess", "--baseline", "lmsqueeze-graph",
                 "--chess-sparsity", "0", "--iters", "20", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["method"] == "lmsqueeze-chess" and rows[1]["logits_rel_err"] < 1e-5
    assert torch.isfinite(torch.tensor(rows[1]["ms"]))
