"""One Squeezed decode step per context (block decode at 32K, listed decode at 128K; bench_squeezed.decode_case
inputs, warmed up) between cudaProfilerStart / Stop, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats python benchmarks/scripts/ncu_squeezed_decode.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_squeezed as bs


def main() -> int:
    from lmsqueeze.methods.squeezed import kernels as K
    from lmsqueeze.methods.squeezed.listed import squeezed_decode_listed_triton

    dev = torch.device("cuda")
    sc = 1 / math.sqrt(bs.D)
    for N in (int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768,131072").split(",")):
        case = bs.decode_case(N, dev)
        idx, q, lk, lv, lengths = case.idx, case.q, case.lk, case.lv, case.lengths
        sel = (64, 4) if N <= 40000 else (256, 8)
        decode = K.squeezed_decode_triton if N <= 40000 else squeezed_decode_listed_triton

        def step(q=q, idx=idx, lk=lk, lv=lv, lengths=lengths, sel=sel, decode=decode):
            s, e = K.centroid_scores_triton(q, idx.centroids, idx.log_sizes, sc, *sel)
            return decode(q, idx.keys, idx.values, idx.offsets, s, e, idx.log_threshold, lk, lv, lengths, sc,
                          count_kept=False)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"N={N} profiled", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
