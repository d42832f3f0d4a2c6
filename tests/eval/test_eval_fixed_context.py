import pytest
import torch

import lmsqueeze
from lmsqueeze.data.tasks import fixed_context_sample
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.decoding import greedy_decode, prefill
from lmsqueeze.eval.fixed_context import FixedContextConfig, answer_questions, run_fixed_context
from lmsqueeze.models.tiny import tiny_model


def fresh_answers(model, ctx, questions, budget):
    """Reference: every question answered after its own fresh prefill of context + question."""
    out = []
    with lmsqueeze.apply(model, None) as session:
        for q in questions:
            cache = session.new_cache()
            logits = prefill(model, torch.tensor(ctx + q), cache, chunk_size=64)
            out.append(greedy_decode(model, cache, logits, budget))
    return out


@pytest.mark.parametrize("rollback", ["crop", "copy"])
def test_each_question_sees_exactly_the_prepared_context(tokenizer, haystack, rollback):
    tok = tokenizer
    model = tiny_model("llama", seed=5, vocab_size=len(tok), initializer_range=0.3)  # answers depend on input
    s = fixed_context_sample(tok, haystack, 500, num_facts=6, num_questions=4, seed=2, kind="needles", fmt="code")
    ctx = tok(s.context)["input_ids"]
    qs = [tok(q, add_special_tokens=False)["input_ids"] for q in s.questions]
    want = fresh_answers(model, ctx, qs, 5)
    with lmsqueeze.apply(model, None) as session:
        got, timings = answer_questions(model, tok, session, ctx, qs, [5] * len(qs),
                                        FixedContextConfig(chunk_size=64, rollback=rollback))
    assert timings["rollback"] == rollback
    assert got == want
    assert len({tuple(g) for g in got}) > 1  # the questions differ, so must (some) answers


def test_crop_restores_the_context_length(model_and_tokenizer, haystack, monkeypatch):
    """Answering must not grow the cache: spy on the lengths each question starts from."""
    import lmsqueeze.eval.fixed_context as fc

    model, tok = model_and_tokenizer
    starts = []
    real_prefill = fc.prefill

    def spy(model, ids, cache, chunk_size, **kw):
        starts.append(cache.get_seq_length())
        return real_prefill(model, ids, cache, chunk_size, **kw)

    monkeypatch.setattr(fc, "prefill", spy)
    s = fixed_context_sample(tok, haystack, 700, num_facts=5, num_questions=5, seed=1, kind="kv", fmt="prose",
                             key_style="hex")
    summary, records = run_fixed_context(model, tok, [s], None, FixedContextConfig(chunk_size=50), progress=False)
    n_ctx = len(tok(s.context)["input_ids"])
    assert starts == [0] + [n_ctx] * 5
    assert summary["questions"] == len(records) == 5 and summary["contexts"] == 1
    assert all(r["rollback"] == "crop" for r in records)
    assert 0.0 <= summary["accuracy"] <= 1.0


def test_bad_rollback_is_a_user_error():
    with pytest.raises(LmsqueezeError):
        FixedContextConfig(rollback="undo")


def test_a_calibrated_method_rolls_back_the_same_way_as_it_copies(tokenizer, haystack):
    """KVQuant's cache, filled under inference mode, is cropped back; crop and copy give the same answers."""
    kvquant = pytest.importorskip("lmsqueeze.methods.kvquant.method")
    tok = tokenizer
    model = tiny_model("llama", seed=6, vocab_size=len(tok), hidden_size=128, num_attention_heads=2,
                       num_key_value_heads=1, initializer_range=0.3)
    batches = [torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    artifact = kvquant.KVQuant(bits=3, fisher=False).calibrate(model, batches)
    s = fixed_context_sample(tok, haystack, 300, num_facts=3, num_questions=3, seed=3, kind="needles", fmt="code")
    preds = {}
    for rollback in ("crop", "copy"):
        summary, records = run_fixed_context(model, tok, [s], artifact,
                                             FixedContextConfig(chunk_size=64, max_new_tokens=3, rollback=rollback),
                                             progress=False)
        preds[rollback] = [r["prediction"] for r in records]
        assert summary["questions"] == 3
    assert preds["crop"] == preds["copy"]
