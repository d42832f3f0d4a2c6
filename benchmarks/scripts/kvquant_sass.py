"""Offline SASS statistics of the KVQuant v1 decode kernel (no GPU: Triton compiles for sm_90 and disassembles).

    python benchmarks/scripts/kvquant_sass.py --out benchmarks/results/kvquant_sass_sm90.json \
        [--kernel-source FILE --label NAME ...]

For each kernel source (default: the package's `_triton_kernels.py`; others, e.g. an older commit's file from
`git show`, by path) and each bit width, the split kernel is compiled at the Llama-3-8B decode shape (G = 4 query
heads per KV head, D = 128, BLOCK_N = 64, 4 warps, one outlier word, value outliers folded) and the script
counts the SASS instructions of its main loop (the largest backward branch), per opcode, plus spill loads and
stores. A proxy for issue cost only; speed comes from the GPU benchmarks.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

PTRS = {"Q": "*fp16", "O_part": "*fp32", "L_part": "*fp32", "KC": "*i32", "VC": "*i32", "KO": "*i32", "VO": "*i32",
        "VS": "*fp16", "VZ": "*fp16", "POS": "*i32", "KIND": "*i8", "SK": "*fp16", "SV": "*fp16", "SSLOT": "*i32",
        "KS16": "*fp16", "KZ16": "*fp16", "EYE": "*fp16", "KLUT": "*fp32", "VLUT": "*fp32", "INV_FREQ": "*fp32",
        "ROPE_TAB": "*i32", "LENGTHS": "*i32", "STARTS": "*i32", "VSMAX": "*fp32", "TSC": "*u8"}


def load_kernels(path: str):
    spec = importlib.util.spec_from_file_location(f"kvq_sass_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_sass(fn, bits: int, maxnreg: int | None, D: int = 128, G: int = 4, block_n: int = 64) -> str:
    W = {4: D // 8, 3: D * 3 // 32, 2: D // 16}[bits]
    cons = {"D": D, "BITS": bits, "W": W, "G": G, "BLOCK_G": G, "BLOCK_N": block_n, "NOUT": 1, "IMASK": D - 1,
            "NSIDE": 1, "NSIDE_P2": 16, "HAS_STARTS": False, "USE_ASM": True, "QROWS": False, "KROT": False,
            "VFOLD": True, "HAS_TSCALE": False}
    sig, cons, _ = signature(fn, cons, PTRS, ("qk_scale", "rope_scale"))
    opts = {"num_warps": 4, "num_stages": 1, **({"maxnreg": maxnreg} if maxnreg else {})}
    return disassemble(fn, sig, cons, opts)


def signature(fn, cons: dict, ptrs: dict, floats: tuple) -> tuple[dict, dict, dict]:
    """(argument types, constexpr values, divisibility attributes) of a Triton kernel for `disassemble`: the
    names in `cons` are constexprs with those values, `ptrs` maps pointer names to types, `floats` are fp32, other
    constexpr parameters take their defaults, the rest are i32; the attributes mark pointers and stride_* ints
    multiples of 16 (as the JIT does for such values)."""
    names = fn.arg_names
    cons = {k: v for k, v in cons.items() if k in names}
    sig = {}
    for n in names:
        if n in cons:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = ptrs[n]
        elif n in floats:
            sig[n] = "fp32"
        elif fn.params[names.index(n)].is_constexpr:  # a constexpr flag the caller does not name: its default
            sig[n] = "constexpr"
            cons[n] = fn.params[names.index(n)].default
        else:
            sig[n] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (n.startswith("stride") and sig[n] == "i32")}
    return sig, cons, attrs


def disassemble(fn, sig: dict, constexprs: dict, options: dict, attrs: dict | None = None) -> str:
    """Compile the Triton kernel `fn` for sm_90 on this machine (no GPU) and return nvdisasm's SASS.
    sig: argument name -> Triton type ("constexpr", "*fp16", "i32", ...); constexprs: name -> value; attrs:
    argument index tuple -> attributes (e.g. [["tt.divisibility", 16]], as the JIT gives multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in constexprs.items()}, attrs or {})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop (a label and a backward branch to it), largest first."""
    code, labels = [], {}
    for line in sass.splitlines():
        s = line.strip()
        m = re.match(r"^(\.L\w+):", s)
        if m:
            labels[m.group(1)] = len(code)
            continue
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*)", s)
        if m:
            code.append(m.group(2))
    found = []
    for i, t in enumerate(code):
        m = re.search(r"BRA\s+`?\(?(\.L\w+)", t)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            ops = collections.Counter()
            for u in code[labels[m.group(1)]:i + 1]:
                mm = re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", u)
                if mm:
                    ops[mm.group(2)] += 1
            found.append(ops)
    return sorted(found, key=lambda o: -sum(o.values()))


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the largest loop (a label and the furthest backward branch to it)."""
    found = loops(sass)
    return found[0] if found else collections.Counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel-source", action="append", default=[])
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--maxnreg", default="0,168", help="register caps (0: none)")
    args = ap.parse_args()
    import triton

    sources = [(str(ROOT / "src/lmsqueeze/methods/kvquant/_triton_kernels.py"), "HEAD")]
    sources += list(zip(args.kernel_source, args.label or args.kernel_source, strict=False))
    rows = []
    for path, label in sources:
        fn = load_kernels(path)._split_kernel
        for bits in map(int, args.bits.split(",")):
            for cap in map(int, args.maxnreg.split(",")):
                ops = main_loop(compile_sass(fn, bits, cap or None))
                n = sum(ops.values())
                rows.append({"source": label, "bits": bits, "maxnreg": cap or None, "loop_instructions": n,
                             "per_token_and_kv_head": n * 4 / 64, "spill_loads": ops["LDL"],
                             "spill_stores": ops["STL"], "opcodes": dict(ops.most_common())})
                print(f"{label:10s} bits {bits} maxnreg {cap or '-':>4}  loop {n:5d}  per token-head {n * 4 / 64:6.1f}"
                      f"  LDL {ops['LDL']:3d}  STL {ops['STL']:3d}", flush=True)
    from lmsqueeze.bench.results import command_line, environment

    env = environment("cpu")
    env["device"] = {**env["device"], "note": "offline: Triton compiles for sm_90 (GPUTarget cuda 90) on this CPU"}
    Path(args.out).write_text(json.dumps({"kind": "kvquant.sass_sm90", "command": command_line(), **env,
                                          "triton": triton.__version__,
                                          "shape": "G=4, D=128, BLOCK_N=64, 4 warps, NOUT=1, VFOLD",
                                          "sources": {label: path for path, label in sources}, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
