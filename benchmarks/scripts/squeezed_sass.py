"""Offline SASS statistics of the Squeezed prefill kernels (no GPU: Triton compiles for sm_90 and disassembles).

    python benchmarks/scripts/squeezed_sass.py --out benchmarks/results/squeezed_sass_sm90.json \
        [--kernel-source FILE --label NAME ...]

For each kernel source (default: the package's `_triton_kernels.py`; others, e.g. an older commit's file from
`git show`, by path) it compiles, at the Llama-3-8B prefill shape (G = 4, D = 128, bf16, strides marked multiples
of 16 as the JIT marks them):
  - the centroid scoring kernel (`_prefill_scores_kernel`, base 2, 128 queries x 64 centroids, 4 warps, 3 stages),
    with the second pass transposed (PASS2_T, where the source has it) and not;
  - the gather attention kernel (`_indexed_attention_kernel`, whole tiles unmasked, 128 rows, 8 warps, 2 stages,
    128 keys),
and counts the SASS instructions of each loop (largest first) per opcode. An issue-cost proxy only; speed comes
from the GPU benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvquant_sass import disassemble, loops, signature

OPS = ("MUFU", "FADD", "FFMA", "FMUL", "FMNMX", "SHFL", "STS", "LDS", "HGMMA", "BAR", "LDGSTS", "F2FP")


def _load(path: str):
    spec = importlib.util.spec_from_file_location(f"sq_sass_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scores_loops(mod, pass2_t: bool) -> list:
    fn = mod._prefill_scores_kernel
    cons = {"HQ": 32, "G": 4, "D": 128, "BLOCK_M": 128, "BLOCK_C": 64, "BLOCK_D": 128, "IEEE_DOT": False,
            "EXP2": True, "PASS2_T": pass2_t}
    sig, cons, attrs = signature(fn, cons, {"Q": "*bf16", "Cent": "*bf16", "LSz": "*fp32", "Psum": "*fp32"}, ("scale",))
    return loops(disassemble(fn, sig, cons, {"num_warps": 4, "num_stages": 3}, attrs))


def attention_loops(mod) -> list:
    fn = mod._indexed_attention_kernel
    cons = {"HKV": 8, "G": 4, "D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 128, "HAS_STARTS": False,
            "WRITE_LSE": False, "IEEE_DOT": False, "TOKEN_MASK": False, "STEADY": True}
    ptrs = {n: "*bf16" for n in ("Q", "K", "V", "LK", "LV", "Out")}
    ptrs.update({n: "*i32" for n in ("Idx", "Counts", "Lengths", "Starts", "Keep", "RowCluster")}, Lse="*fp32")
    sig, cons, attrs = signature(fn, cons, ptrs, ("scale_log2",))
    return loops(disassemble(fn, sig, cons, {"num_warps": 8, "num_stages": 2}, attrs))


def row(label: str, kernel: str, found: list) -> dict:
    out = {"source": label, "kernel": kernel, "loops": []}
    for ops in found[:3]:
        out["loops"].append({"instructions": sum(ops.values()), "opcodes": {o: ops[o] for o in OPS},
                             "all_opcodes": dict(ops.most_common())})
    print(f"{label:10s} {kernel:34s} loops " + ", ".join(str(x["instructions"]) for x in out["loops"]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel-source", action="append", default=[])
    ap.add_argument("--label", action="append", default=[])
    args = ap.parse_args()
    import triton

    from lmsqueeze.bench.results import command_line, environment

    sources = [(str(ROOT / "src/lmsqueeze/methods/squeezed/_triton_kernels.py"), "HEAD")]
    sources += list(zip(args.kernel_source, args.label or args.kernel_source, strict=False))
    rows = []
    for path, label in sources:
        mod = _load(path)
        has_t = "PASS2_T" in mod._prefill_scores_kernel.arg_names
        for t in ((True, False) if has_t else (None,)):
            name = "prefill_scores" + ("" if t is None else ("_pass2_transposed" if t else "_pass2_rows"))
            rows.append(row(label, name, scores_loops(mod, bool(t))))
        rows.append(row(label, "indexed_attention_steady", attention_loops(mod)))
    env = environment("cpu")
    env["device"] = {**env["device"], "note": "offline: Triton compiles for sm_90 (GPUTarget cuda 90) on this CPU"}
    Path(args.out).write_text(json.dumps({"kind": "squeezed.sass_sm90", "command": command_line(), **env,
                                          "triton": triton.__version__, "sources": {lb: p for p, lb in sources},
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
