"""Held-out perplexity of CHESS, CATS and TEAL over FFN sparsity 0.3-0.7 on the zoo model, every method in one run.

    python benchmarks/scripts/eval_chess.py --out benchmarks/results/chess_quality_zoo.json \
        --plot benchmarks/plots/chess_quality_zoo.png

Methods per sparsity s (thresholds calibrated on the corpus train split, one pass per kind for all s, perplexity on the held-out text through
`lmsqueeze.eval.perplexity`, the harness's code path):
  chess      CHESS(s): channel-wise FFN thresholds + q_proj/o_proj inputs at s (the method's default)
  chess-ffn  CHESS(s, attention=False): FFN only, the like-for-like comparison with CATS
  cats       CATS(s): one threshold per layer on |SiLU(gate)|, FFN only
  teal       TEAL(s): thresholds on the inputs of all seven linears of each layer
The achieved sparsity of each site (fraction of zeroed inputs) is measured on the evaluation tokens themselves.
Runs on the CPU with the bundled zoo model unless --model is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

FAMILIES = ("chess", "chess-ffn", "cats", "teal")


def make_method(family: str, sparsity: float):
    from lmsqueeze.methods.baselines.cats import CATS
    from lmsqueeze.methods.baselines.teal import TEAL
    from lmsqueeze.methods.chess import CHESS

    return {"chess": lambda: CHESS(sparsity=sparsity), "chess-ffn": lambda: CHESS(sparsity=sparsity, attention=False),
            "cats": lambda: CATS(sparsity=sparsity), "teal": lambda: TEAL(sparsity=sparsity)}[family]()


class SparsityMeter:
    """Counts zeroed inputs of every SparseMLP (FFN channels) and SparseLinear (by site) while installed."""

    def __init__(self) -> None:
        self.zero: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self.handle = None

    def hook(self, module, args):
        from lmsqueeze.methods.chess.sparse_linear import SparseLinear, SparseMLP

        x = args[0] if args else None
        if isinstance(module, SparseMLP):
            a = module.act_fn(module.gate_proj(x)).float()
            self._add("ffn", a.abs() <= module.thresholds)
        elif isinstance(module, SparseLinear):
            self._add(f"linear_in_{module.in_features}x{module.out_features}", x.float().abs() <= module.threshold)

    def _add(self, key: str, zeroed: torch.Tensor) -> None:
        self.zero[key] += float(zeroed.sum())
        self.total[key] += zeroed.numel()

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def fractions(self) -> dict[str, float]:
        return {k: self.zero[k] / self.total[k] for k in sorted(self.total)}


def diagnose(model, ids: list[int], thresholds: dict[str, dict[str, torch.Tensor]], tokens: int) -> dict:
    """Per layer, for each rule's FFN mask (thresholds[rule]['layers.{i}.gate']) on the dense model's
    activations over `tokens` held-out tokens: the relative L2 error of the MLP output that the rule causes
    (what CHESS's importance minimises), and the first-order change of the LM loss it causes, sum_t g_t . d_t / T
    with g_t = dLoss/d(mlp output) (both measured with every other layer dense)."""
    x = torch.tensor([ids[:tokens]])
    outs: dict[int, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(m, a, o, i=i):
            o.retain_grad()
            outs[i], ins[i] = o, a[0].detach()
        handles.append(layer.mlp.register_forward_hook(hook))
    model.zero_grad()
    with torch.enable_grad():
        model.requires_grad_(True)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        model.requires_grad_(False)
    for h in handles:
        h.remove()
    rows = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            m = layer.mlp
            g = outs[i].grad[0] * x.numel()  # per-token loss gradients
            a = m.act_fn(m.gate_proj(ins[i][0]))
            h = a * m.up_proj(ins[i][0])
            y = m.down_proj(h)
            row = {"layer": i}
            for rule, t in thresholds.items():
                keep = a.abs() > t[f"layers.{i}.gate"]
                d = -m.down_proj(h * ~keep)
                row[rule] = {"mlp_out_rel_l2_err": float(d.square().sum() / y.square().sum()),
                             "first_order_loss_change": float((g * d).sum(-1).mean()),
                             "fisher_term": float((g * d).sum(-1).square().mean()),
                             "kept": float(keep.float().mean())}
            rows.append(row)
    total = {rule: sum(r[rule]["first_order_loss_change"] for r in rows) for rule in thresholds}
    return {"tokens": int(x.numel()), "layers": rows, "sum_first_order_loss_change": total}


def plot(result: str, png: str) -> None:
    """Perplexity vs FFN sparsity, one line per method, dense as a horizontal line."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(result).read_text())
    m = d["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(m["dense"]["ppl"], color="k", ls="--", lw=1, label=f"dense {m['dense']['ppl']:.3f}")
    style = {"chess": "o-", "chess-ffn": "s-", "cats": "^-", "teal": "v-"}
    for fam in FAMILIES:
        rows = sorted((v["sparsity"], v["ppl"]) for k, v in m.items() if v.get("family") == fam)
        if rows:
            ax.plot(*zip(*rows), style[fam], label=fam)
    ax.set_xlabel("target FFN sparsity (calibrated)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(f"zoo:default, held-out text, {m['dense']['tokens']} tokens, context "
                 f"{d['config']['context_length']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the bundled zoo model)")
    ap.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/chess_quality_zoo.json")
    ap.add_argument("--plot", default="benchmarks/plots/chess_quality_zoo.png")
    ap.add_argument("--plot-from", default=None, help="only plot this result JSON to --plot")
    ap.add_argument("--diagnose", type=float, default=None,
                    help="instead: per-layer error analysis of CHESS vs CATS masks at this sparsity (JSON to --out)")
    args = ap.parse_args()
    if args.plot_from:
        plot(args.plot_from, args.plot)
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import lmsqueeze
    from lmsqueeze.data.calibration import calibration_batches
    from lmsqueeze.eval.perplexity import PerplexityConfig, perplexity
    from lmsqueeze.eval.results import make_result, model_info, write_json
    from lmsqueeze.eval.texts import eval_text
    from lmsqueeze.methods.base import Artifact, model_fingerprint
    from lmsqueeze.methods.chess.calibrate import calibrate_threshold_sweep

    model, tok = lmsqueeze.load_model(args.model)
    text, data_info = eval_text(None)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    cfg = PerplexityConfig(context_length=args.context_length, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    batches = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.calib_len)
    calib_read_s = time.perf_counter() - t0
    sparsities = [float(s) for s in args.sparsities.split(",")]
    families = args.families.split(",")
    if args.diagnose is not None:
        th = {kind: calibrate_threshold_sweep(model, batches, kind, [args.diagnose])[0] for kind in ("chess", "cats")}
        diag = diagnose(model, ids, th, min(len(ids), args.context_length))
        result = make_result("eval.chess_diagnosis", diag, model=model_info(model, args.model or "zoo:default"),
                             data={**data_info, "calibration_samples": args.calib_samples,
                                   "calibration_seq_len": args.calib_len},
                             config={"sparsity": args.diagnose}, device="cpu")
        write_json(args.out, result)
        for r in diag["layers"]:
            print(r["layer"], "  ".join(f"{k}: err {v['mlp_out_rel_l2_err']:.4f} dL1 {v['first_order_loss_change']:+.4f} "
                                        f"fisher {v['fisher_term']:.4f}" for k, v in r.items() if k != "layer"))
        print("sum of first-order loss changes:", diag["sum_first_order_loss_change"], "\nwrote", args.out)
        return 0

    # One calibration pass per threshold kind gives every sparsity (CHESS: two passes; chess-ffn is CHESS's
    # artifact without its q_proj/o_proj thresholds, i.e. exactly what CHESS(s, attention=False) calibrates).
    artifacts: dict[str, object] = {}
    calib_s: dict[str, float] = {}
    fp = model_fingerprint(model)
    tokens = sum(int(b.numel()) for b in batches)
    for kind in dict.fromkeys("chess" if f == "chess-ffn" else f for f in families):
        t0 = time.perf_counter()
        att = sparsities if kind == "chess" else None
        sweep = calibrate_threshold_sweep(model, batches, kind, sparsities, att)
        calib_s[kind] = time.perf_counter() - t0
        for s, tensors in zip(sparsities, sweep):
            for fam in families:
                if fam == kind or (kind == "chess" and fam == "chess-ffn"):
                    keep = {k: v for k, v in tensors.items()
                            if fam != "chess-ffn" or not k.endswith((".q_in", ".o_in"))}
                    artifacts[f"{fam}@{s:g}"] = Artifact(method=make_method(fam, s), fingerprint=fp, tensors=keep,
                                                         meta={"calibration_tokens": tokens,
                                                               "calibration_batches": len(batches)})
        print(f"calibrated {kind} at {len(sparsities)} sparsities in {calib_s[kind]:.1f} s", flush=True)

    metrics: dict[str, dict] = {}
    t0 = time.perf_counter()
    dense = perplexity(model, ids, None, cfg, progress=False)
    metrics["dense"] = {**dense.to_dict(), "family": "dense", "sparsity": 0.0, "seconds": time.perf_counter() - t0}
    print(f"dense          ppl {dense.ppl:.4f}", flush=True)
    for s in sparsities:
        for fam in families:
            name = f"{fam}@{s:g}"
            art = artifacts[name]
            t1 = time.perf_counter()
            with SparsityMeter() as meter:
                r = perplexity(model, ids, art, cfg, progress=False)
            metrics[name] = {**r.to_dict(), "family": fam, "sparsity": s, "config": art.method.to_dict(),
                             "ppl_increase": r.ppl - dense.ppl, "ppl_ratio": r.ppl / dense.ppl,
                             "measured_sparsity": meter.fractions(), "seconds_eval": time.perf_counter() - t1}
            print(f"{name:14s} ppl {r.ppl:.4f}  (+{r.ppl - dense.ppl:.4f})  measured "
                  + " ".join(f"{k}={v:.3f}" for k, v in meter.fractions().items()), flush=True)
    verdict = {}
    for s in sparsities:
        inc = {f: metrics[f"{f}@{s:g}"]["ppl_increase"] for f in families}
        if {"chess", "cats", "teal"} <= inc.keys():
            verdict[f"{s:g}"] = {"chess_below_cats_and_teal": inc["chess"] < min(inc["cats"], inc["teal"]),
                                 **({"chess_ffn_below_cats": inc["chess-ffn"] < inc["cats"]}
                                    if "chess-ffn" in inc else {}), "increase": inc}
    result = make_result(
        "eval.chess_quality", metrics, model=model_info(model, args.model or "zoo:default"),
        data={**data_info, "tokens": len(ids),
              "calibration": {"source": "corpus train split (calibration_batches)", "samples": args.calib_samples,
                              "seq_len": args.calib_len, "seconds_read": calib_read_s,
                              "seconds_per_kind": calib_s}},
        config={"context_length": args.context_length, "stride": cfg.stride, "threads": args.threads,
                "sparsities": sparsities, "families": families},
        device="cpu")
    result["comparison"] = verdict
    write_json(args.out, result)
    plot(args.out, args.plot)
    print("\nsparsity  " + "  ".join(f"{f:>10s}" for f in families) + "   (ppl increase over dense "
          f"{dense.ppl:.4f})")
    for s in sparsities:
        print(f"{s:8g}  " + "  ".join(f"{metrics[f'{f}@{s:g}']['ppl_increase']:10.4f}" for f in families))
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
