"""Many questions about one document with Squeezed Attention: prepare the document once, then answer each
question reading ~10% of the document's keys per step (CPU is fine: the bundled 8.4M-parameter model).

    python examples/squeezed_many_questions.py [--length 4096] [--sparsity 0.9]

The same from the shell:
    lmsqueeze squeezed prepare doc.txt --out runs/doc --sparsity 0.9
    lmsqueeze squeezed ask runs/doc --questions questions.txt
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import lmsqueeze
from lmsqueeze.data.tasks import fixed_context_sample, haystack_lines
from lmsqueeze.eval.decoding import greedy_decode, prefill, stop_token_ids
from lmsqueeze.eval.texts import eval_text
from lmsqueeze.methods.squeezed import SqueezedAttention
from lmsqueeze.methods.squeezed.answer import answer_many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096, help="document tokens")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, tok = lmsqueeze.load_model()                       # the bundled zoo model, CPU, fp32
    text, _ = eval_text(None, max_chars=8 * args.length + 200_000)
    doc = fixed_context_sample(tok, haystack_lines(text), args.length, num_facts=4, num_questions=4, seed=1,
                               fmt="prose")                  # held-out text with 4 hidden facts
    ids = tok(doc.context)["input_ids"]

    t0 = time.perf_counter()
    art = SqueezedAttention(sparsity=args.sparsity, sinks=4).prepare(model, ids)   # once per document
    with tempfile.TemporaryDirectory() as d:                   # an artifact is a directory: save, reuse later
        art.save(d)
        art = lmsqueeze.load_artifact(d)
    print(f"prepared {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    answers = answer_many(model, tok, art, doc.questions, max_new_tokens=10)
    t_sq = time.perf_counter() - t0

    # dense reference: the document prefilled once, each question answered from it
    t0 = time.perf_counter()
    dense = []
    with lmsqueeze.apply(model, None) as session, torch.inference_mode():
        cache = session.new_cache(batch_size=1, max_length=len(ids) + 64)
        prefill(model, torch.tensor(ids), cache, 4096)
        for q in doc.questions:
            logits = prefill(model, torch.tensor(tok(q, add_special_tokens=False)["input_ids"]), cache, 4096)
            dense.append(tok.decode(greedy_decode(model, cache, logits, 10, stop_token_ids(tok))))
            cache.crop(len(ids))
    t_dense = time.perf_counter() - t0

    for q, want, a, b in zip(doc.questions, doc.answers, answers, dense):
        print(f"Q: {q.split('?')[0]}?\n   squeezed: {a.strip()!r}  dense: {b.strip()!r}  expected: {want[0]}")
    print(f"answers: squeezed {t_sq:.1f} s, dense (incl. one prefill of the document) {t_dense:.1f} s")


if __name__ == "__main__":
    main()
