"""lm-eval adapter: loglikelihoods match the model's logits, and a tiny local multiple-choice task runs offline
under lmsqueeze.apply (dense and CHESS)."""

import json
import math

import pytest
import torch

from lmsqueeze.eval.lm_eval_adapter import continuation_logprobs, encode_pair


def _direct_logprob(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
    n = len(cont)
    tgt = torch.tensor(cont)
    lp = logp[len(ctx) - 1:len(ctx) - 1 + n]
    return float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = encode_pair(tokenizer, "def f(x): ", "return x")
    whole = tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]
    assert ctx[0] == tokenizer.bos_token_id
    assert ctx[1:] + cont == whole
    assert tokenizer.decode(cont).startswith(" ")


def test_batched_logprobs_equal_direct(model_and_tokenizer):
    model, tok = model_and_tokenizer
    texts = [("import os\n", "print(os.getcwd())"), ("x = 1", " + 2"), ("class A:\n    def ", "__init__(self):"),
             ("", "hello world")]
    pairs = [encode_pair(tok, c, t) for c, t in texts]
    got = continuation_logprobs(model, pairs, max_length=512, batch_size=3)  # right padding in a batch
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ref_lp, ref_greedy = _direct_logprob(model, ctx, cont)
        assert lp == pytest.approx(ref_lp, rel=1e-4, abs=1e-4)
        assert greedy == ref_greedy


def _write_task(tmp_path, n=12):
    rows = []
    for i in range(n):
        a, b = i % 5 + 1, i % 3 + 2
        choices = [str(a + b), str(a * b + 7), str(a + b + 11)]
        rows.append({"question": f"x = {a} + {b}\n# x is", "choices": [f" {c}" for c in choices], "label": i % 3})
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: lmsqueeze_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return rows


def test_tiny_local_task_offline(tmp_path, monkeypatch, model_and_tokenizer):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install lm-eval, or the dev extra)")
    from lmsqueeze.eval.lm_eval_adapter import lm_eval_tasks
    from lmsqueeze.methods.chess import CHESS

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model, tok = model_and_tokenizer
    rows = _write_task(tmp_path)
    res = lm_eval_tasks(model, tok, ["lmsqueeze_tiny_mc"], include_path=tmp_path, batch_size=4)
    acc = res["results"]["lmsqueeze_tiny_mc"]["acc,none"]

    # the same accuracy from the adapter's own loglikelihoods: lm-eval picked argmax over the choices
    correct = 0
    for r in rows:
        pairs = [encode_pair(tok, r["question"], c) for c in r["choices"]]
        lps = [lp for lp, _ in continuation_logprobs(model, pairs, 512)]
        correct += int(max(range(len(lps)), key=lps.__getitem__) == r["label"])
    assert acc == pytest.approx(correct / len(rows))

    # through a method: CHESS at 70% changes the scores (the adapter runs inside lmsqueeze.apply)
    art = CHESS(sparsity=0.7).calibrate(model, [torch.randint(0, len(tok), (2, 64))])
    res2 = lm_eval_tasks(model, tok, ["lmsqueeze_tiny_mc"], method=art, include_path=tmp_path, batch_size=4)
    assert 0.0 <= res2["results"]["lmsqueeze_tiny_mc"]["acc,none"] <= 1.0
    import lmsqueeze

    pairs = [encode_pair(tok, rows[0]["question"], c) for c in rows[0]["choices"]]
    dense = continuation_logprobs(model, pairs, 512)
    with lmsqueeze.apply(model, art):
        sparse = continuation_logprobs(model, pairs, 512)
    assert any(not math.isclose(a[0], b[0], rel_tol=1e-5) for a, b in zip(dense, sparse))
