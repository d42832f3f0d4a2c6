"""`bench e2e`: lmsqueeze's static decode step gives the same logits as transformers over the same random KV."""

import json

from lmsqueeze.cli import main


def test_e2e_rows_match_transformers_logits(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--lengths", "40",
                 "--batch", "1,2", "--variants", "lmsqueeze-graph,hf-dynamic-eager,hf-static-eager",
                 "--iters", "20", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"lmsqueeze-graph", "hf-dynamic-eager", "hf-static-eager"}
    for r in rows:
        assert r["x_floor"] > 0 and r["floor_ms"] > 0
        if r["method"] != "hf-dynamic-eager":
            assert r["logits_rel_err"] < 1e-5
