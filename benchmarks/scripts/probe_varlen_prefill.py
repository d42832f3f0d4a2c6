"""Probe: prefill attention of 1K user tokens over a selected 10% of a 128K fixed context, Llama-3-8B heads,
through torch's varlen flash attention on gathered rows, against dense SDPA in the same run (H100)."""
import json
import os

import torch


def bench(fn, iters=25, graph=True):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); run(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]

out = {"torch": torch.__version__, "rows": []}
dev = "cuda"
Hq, H, D, T, N = 32, 8, 128, 1024, 131072
G = Hq // H
keep = N // 10
torch.manual_seed(0)
K = torch.randn(H, N, D, device=dev, dtype=torch.bfloat16)
V = torch.randn(H, N, D, device=dev, dtype=torch.bfloat16)
q = torch.randn(1, Hq, T, D, device=dev, dtype=torch.bfloat16)
ku = torch.randn(H, T, D, device=dev, dtype=torch.bfloat16)
vu = torch.randn(H, T, D, device=dev, dtype=torch.bfloat16)
# per-head selected rows (sorted, random), counts differ a little per head
counts = [keep - 37 * h for h in range(H)]
rows = [torch.randperm(N, device=dev)[:c].sort().values for c in counts]
idx = torch.cat([r + h * N for h, r in enumerate(rows)])
cu_k = torch.tensor([0] + [sum(counts[:h + 1]) + T * (h + 1) for h in range(H)], device=dev, dtype=torch.int32)
cu_q = torch.arange(0, (H + 1) * T, T, device=dev, dtype=torch.int32)
buf_k = torch.empty(int(cu_k[-1]), 1, D, device=dev, dtype=torch.bfloat16)
buf_v = torch.empty_like(buf_k)
# positions of the selected rows and of the user tokens inside the packed buffer
pos_sel = torch.cat([torch.arange(int(cu_k[h]), int(cu_k[h]) + counts[h], device=dev) for h in range(H)])
pos_usr = torch.cat([torch.arange(int(cu_k[h + 1]) - T, int(cu_k[h + 1]), device=dev) for h in range(H)])
Kf, Vf = K.reshape(H * N, D), V.reshape(H * N, D)
qv = q[0].reshape(H, G, T, D).permute(0, 2, 1, 3).reshape(H * T, G, D).contiguous()

def gather():
    buf_k[pos_sel, 0] = Kf[idx]
    buf_v[pos_sel, 0] = Vf[idx]
    buf_k[pos_usr, 0] = ku.reshape(-1, D)
    buf_v[pos_usr, 0] = vu.reshape(-1, D)

try:
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    out["varlen_signature"] = str(inspect.signature(varlen_attn))
    kw = {}
    sig = inspect.signature(varlen_attn).parameters
    if "window_size" in sig: kw["window_size"] = (-1, 0)
    if "enable_gqa" in sig: kw["enable_gqa"] = True
    def attn():
        return varlen_attn(qv, buf_k, buf_v, cu_q, cu_k, T, int(max(counts)) + T, **kw)
    gather()
    o = attn()
    # correctness vs SDPA per head with the same mask (context rows + causal over the user tokens)
    errs = []
    for h in (0, H - 1):
        kk = buf_k[int(cu_k[h]):int(cu_k[h + 1]), 0].float(); vv = buf_v[int(cu_k[h]):int(cu_k[h + 1]), 0].float()
        qq = qv[h * T:(h + 1) * T].float().permute(1, 0, 2)   # [G, T, D]
        n = kk.shape[0]
        mask = torch.ones(T, n, dtype=torch.bool, device=dev).tril(n - T)
        ref = torch.nn.functional.scaled_dot_product_attention(qq, kk[None].expand(G, -1, -1), vv[None].expand(G, -1, -1), attn_mask=mask)
        got = o[h * T:(h + 1) * T].float().permute(1, 0, 2)
        errs.append(float((got - ref).norm() / ref.norm()))
    out["varlen_rel_err"] = errs
    out["rows"].append({"method": "gather_only", "ms": bench(gather)})
    out["rows"].append({"method": "varlen_attention_only", "ms": bench(attn)})
    out["rows"].append({"method": "gather_plus_varlen", "ms": bench(lambda: (gather(), attn()))})
except Exception as e:
    import traceback; traceback.print_exc()
    out["varlen_error"] = f"{type(e).__name__}: {e}"
qd = q
kd = torch.cat([K, ku], 1)[None]; vd = torch.cat([V, vu], 1)[None]
maskd = torch.ones(T, N + T, dtype=torch.bool, device=dev).tril(N)
def dense():
    return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True, attn_mask=None)
out["rows"].append({"method": "dense_sdpa_no_mask_1k_x_129k", "ms": bench(dense)})
flops = 4 * Hq * T * (keep + T // 2) * D
for r in out["rows"]:
    if "varlen" in r["method"]: r["tflops"] = flops / r["ms"] / 1e9
print(json.dumps(out, indent=1))
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_varlen_prefill.json"), "w"), indent=1)
