"""GPU check of the fast generation path: CUDA-graphed lmsqueeze.generate equals transformers' greedy
generate on tiny random models of every family (fp32), batch 1 and left-padded batch 3; captures counted."""

import sys

import torch

from lmsqueeze.bench.results import command_line, write_result
from lmsqueeze.generation import CAPTURES, generate
from lmsqueeze.models.tiny import FAMILIES, tiny_model


def main(out_path: str | None) -> int:
    rows, ok = [], True
    for family in FAMILIES:
        model = tiny_model(family, seed=7, head_dim=64, hidden_size=256, num_attention_heads=4,
                           num_key_value_heads=2).cuda()
        for batch in (1, 3):
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, 256, (batch, 300), generator=g).cuda()
            mask = torch.ones_like(ids)
            if batch == 3:
                mask[1, :17] = 0
                mask[2, :101] = 0
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
            before = CAPTURES["count"]
            out = generate(model, ids, mask, max_new_tokens=64, pad_token_id=0, prefill_chunk=128)
            again = generate(model, ids, mask, max_new_tokens=64, pad_token_id=0, prefill_chunk=128)
            same = torch.equal(out.sequences, ref) and torch.equal(again.sequences, ref)
            agree = (out.sequences == ref).float().mean().item()
            rows.append(dict(method="lmsqueeze-graph-generate", baseline="hf-generate", family=family, batch=batch,
                             equal=same, token_agreement=agree, graph=out.graph,
                             captures=CAPTURES["count"] - before))
            ok &= same and out.graph and CAPTURES["count"] - before == 1
            print(rows[-1], flush=True)
    if out_path:  # device, versions and git commit recorded with the rows
        write_result(out_path, "generate_check", command_line(sys.argv), rows, extra={"pass": bool(ok)},
                     device="cuda")
    print("GENERATE CHECK", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
