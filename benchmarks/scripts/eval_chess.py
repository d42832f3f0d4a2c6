"""Held-out perplexity of CHESS variants, CATS and TEAL over FFN sparsity 0.3-0.7 on the zoo model, one run.

    python benchmarks/scripts/eval_chess.py --out benchmarks/results/chess_quality_zoo.json \
        --plot benchmarks/plots/chess_quality_zoo.png [--device cuda]

Families per target sparsity s (thresholds calibrated on the corpus train split, one sweep per kind and rule;
perplexity on the held-out text through `lmsqueeze.eval.perplexity`, the harness's code path):
  chess                   the paper's CHESS w/: rule a_g^2 E[a_u^2], every layer at s, + q_proj/o_proj inputs at s
  chess-ffn               the paper's CHESS w/o (FFN only): the like-for-like comparison with CATS
  chess-wdown-ffn         rule a_g^2 E[a_u^2] ||W_down[:, i]||^2 (expected squared change of the MLP output)
  chess-greedy-ffn        paper rule, per-layer sparsities with mean s chosen greedily on the calibration loss
  chess-wdown-greedy-ffn  both changes
  chess-greedy, chess-wdown-greedy   the greedy variants + q_proj/o_proj inputs at s
  cats                    CATS: one threshold per layer on |SiLU(gate)|, FFN only (the paper's baseline)
  cats-greedy             CATS with the same greedy allocation (reference: how much the allocation alone gives)
  teal                    TEAL: thresholds on the inputs of all seven linears of each layer (uniform)
Selection (never on the held-out text): every family's loss on a validation slice of the train split (other
samples than the calibration ones) is recorded, and `selection` names the CHESS FFN-only variant with the lowest
mean validation loss over the sweep; the greedy allocation itself uses the calibration batches.
The achieved sparsity of each site (fraction of zeroed inputs), overall and per layer for the FFN, is measured
on the evaluation tokens themselves. Runs on the CPU with the bundled zoo model unless --device / --model say.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# family -> (threshold kind, rule, allocation, attention)
FAMILY_SPECS = {
    "chess": ("chess", "paper", "uniform", True),
    "chess-ffn": ("chess", "paper", "uniform", False),
    "chess-wdown-ffn": ("chess", "wdown", "uniform", False),
    "chess-greedy-ffn": ("chess", "paper", "greedy", False),
    "chess-wdown-greedy-ffn": ("chess", "wdown", "greedy", False),
    "chess-greedy": ("chess", "paper", "greedy", True),
    "chess-wdown-greedy": ("chess", "wdown", "greedy", True),
    "cats": ("cats", "paper", "uniform", False),
    "cats-greedy": ("cats", "paper", "greedy", False),
    "teal": ("teal", "paper", "uniform", False),
}
FAMILIES = tuple(FAMILY_SPECS)


def make_method(family: str, sparsity: float, step: float = 0.05):
    from lmsqueeze.methods.baselines.cats import CATS
    from lmsqueeze.methods.baselines.teal import TEAL
    from lmsqueeze.methods.chess import CHESS

    kind, rule, alloc, att = FAMILY_SPECS[family]
    if kind == "chess":
        return CHESS(sparsity=sparsity, attention=att, rule=rule, allocation=alloc, allocation_step=step)
    return CATS(sparsity=sparsity) if kind == "cats" else TEAL(sparsity=sparsity)


class SparsityMeter:
    """Counts zeroed inputs of every SparseMLP (FFN channels, overall and per layer as `ffn.L{i}`) and
    SparseLinear (by projection, e.g. `q_proj_in`) while installed. model: the unpatched model (to name each layer's MLP)."""

    def __init__(self, model) -> None:
        self.zero: dict[str, torch.Tensor] = {}
        self.total: dict[str, float] = defaultdict(float)
        self.layer_of = {id(layer.mlp.gate_proj): i for i, layer in enumerate(model.model.layers)}
        self.site_of = {id(getattr(owner, n)): f"{n}_in" for layer in model.model.layers
                        for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))) for n in names}
        self.handle = None

    def hook(self, module, args):
        from lmsqueeze.methods.chess.sparse_linear import SparseLinear, SparseMLP

        x = args[0] if args else None
        if isinstance(module, SparseMLP):
            zeroed = module.act_fn(module.gate_proj(x)).float().abs() <= module.thresholds
            self._add("ffn", zeroed)
            self._add(f"ffn.L{self.layer_of.get(id(module.gate_proj), '?')}", zeroed)
        elif isinstance(module, SparseLinear):
            self._add(self.site_of.get(id(module.linear), f"linear_in_{module.in_features}x{module.out_features}"),
                      x.float().abs() <= module.threshold)

    def _add(self, key: str, zeroed: torch.Tensor) -> None:
        n = zeroed.sum()
        self.zero[key] = n if key not in self.zero else self.zero[key] + n
        self.total[key] += zeroed.numel()

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def fractions(self) -> dict[str, float]:
        return {k: float(self.zero[k]) / self.total[k] for k in sorted(self.total)}


def diagnose(model, ids: list[int], thresholds: dict[str, dict[str, torch.Tensor]], tokens: int) -> dict:
    """Per layer, for each rule's FFN mask (thresholds[rule]['layers.{i}.gate']) on the dense model's
    activations over `tokens` held-out tokens: the relative L2 error of the MLP output that the rule causes
    (what CHESS's importance minimises), and the first-order change of the LM loss it causes, sum_t g_t . d_t / T
    with g_t = dLoss/d(mlp output) (both measured with every other layer dense)."""
    x = torch.tensor([ids[:tokens]], device=model.device)
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


def layerwise(model, data: dict[str, list], thresholds: dict[str, dict[str, torch.Tensor]]) -> dict:
    """End-to-end loss change with one layer's FFN mask applied at a time (every other layer dense), and with
    all layers, for each rule, on each data set (name -> [(ids, mask)]): do the per-layer effects add up, and
    which layers make the difference between the rules?"""
    from lmsqueeze.methods.chess.allocate import calibration_loss

    base = {d: calibration_loss(model, b, {}) for d, b in data.items()}
    out: dict = {"dense_loss": base}
    for rule, t in thresholds.items():
        row = {}
        for layer in [*range(len(model.model.layers)), "all"]:
            sub = {k: v for k, v in t.items() if k.endswith(".gate") and (layer == "all" or k == f"layers.{layer}.gate")}
            row[str(layer)] = {d: calibration_loss(model, b, sub) - base[d] for d, b in data.items()}
        row["sum_of_single_layers"] = {d: sum(row[str(i)][d] for i in range(len(model.model.layers))) for d in data}
        out[rule] = row
    return out


def plot(result: str, png: str) -> None:
    """Perplexity increase over dense vs target FFN sparsity, one line per family (symlog scale)."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(result).read_text())
    m = d["metrics"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam in FAMILIES:
        rows = sorted((v["sparsity"], v["ppl_increase"]) for k, v in m.items() if v.get("family") == fam)
        if not rows:
            continue
        kind, rule, alloc, att = FAMILY_SPECS[fam]
        color = {"chess": "C0" if rule == "paper" else "C2", "cats": "C1", "teal": "C3"}[kind]
        ax.plot(*zip(*rows), ("o" if att else "s") + ("--" if alloc == "greedy" else "-"), color=color,
                alpha=0.55 if att else 1.0, label=fam)
    ax.set_xlabel("target FFN sparsity (mean over layers, calibrated)")
    ax.set_ylabel("held-out perplexity increase over dense")
    ax.set_yscale("symlog", linthresh=0.1)  # log above 0.1, linear through 0 (a variant may even gain)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"zoo:default, held-out text, {m['dense']['tokens']} tokens, dense ppl {m['dense']['ppl']:.3f}, "
                 f"{d.get('device', '')}", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the bundled zoo model)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32 on it)")
    ap.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--greedy-samples", type=int, default=8, help="calibration samples whose loss drives the greedy")
    ap.add_argument("--greedy-step", type=float, default=0.05)
    ap.add_argument("--val-samples", type=int, default=16, help="train-split validation samples for selection")
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
    from lmsqueeze.methods.chess.allocate import (
        allocation_levels,
        calibration_loss,
        combine_levels,
        greedy_allocation,
    )
    from lmsqueeze.methods.chess.calibrate import calibrate_threshold_sweep

    model, tok = lmsqueeze.load_model(args.model, device=args.device)
    model.float()
    text, data_info = eval_text(None)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    cfg = PerplexityConfig(context_length=args.context_length, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    batches = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.calib_len)
    val = calibration_batches(tok, num_samples=args.val_samples, seq_len=args.calib_len, seed=1)
    calib_read_s = time.perf_counter() - t0
    greedy_data = [(torch.cat(batches[: args.greedy_samples]), None)]
    val_data = [(torch.cat(val), None)]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    families = args.families.split(",")
    if args.diagnose is not None:
        th = {"chess": calibrate_threshold_sweep(model, batches, "chess", [args.diagnose])[0],
              "chess-wdown": calibrate_threshold_sweep(model, batches, "chess", [args.diagnose], None, "wdown")[0],
              "cats": calibrate_threshold_sweep(model, batches, "cats", [args.diagnose])[0]}
        diag = diagnose(model, ids, th, min(len(ids), args.context_length))
        n = args.context_length
        held = [(torch.tensor([ids[j:j + n]]), None) for j in range(0, len(ids) - n + 1, n)]
        diag["layerwise_loss_change"] = layerwise(model, {"heldout": held, "calibration": greedy_data,
                                                          "validation": val_data}, th)
        result = make_result("eval.chess_diagnosis", diag, model=model_info(model, args.model or "zoo:default"),
                             data={**data_info, "calibration_samples": args.calib_samples,
                                   "calibration_seq_len": args.calib_len},
                             config={"sparsity": args.diagnose}, device=args.device)
        write_json(args.out, result)
        for r in diag["layers"]:
            print(r["layer"], "  ".join(f"{k}: err {v['mlp_out_rel_l2_err']:.4f} dL1 {v['first_order_loss_change']:+.4f} "
                                        f"fisher {v['fisher_term']:.4f}" for k, v in r.items() if k != "layer"))
        print("sum of first-order loss changes:", diag["sum_first_order_loss_change"])
        lw = diag["layerwise_loss_change"]
        print("end-to-end loss change, one layer at a time (heldout / calibration / validation):")
        for rule in th:
            print(f"  {rule:12s}" + " ".join(f"{k}:" + "/".join(f"{x:+.4f}" for x in v.values())
                                          for k, v in lw[rule].items()))
        print("wrote", args.out)
        return 0

    # One calibration sweep per (kind, rule) over the level grid gives every uniform sparsity (the grid holds
    # them) and the per-layer levels the greedy allocation combines. CHESS's q_proj/o_proj thresholds at s
    # come from a sweep with attention targets; FFN-only families drop them.
    levels = allocation_levels(args.greedy_step)
    level_of = {round(v, 6): j for j, v in enumerate(levels)}
    missing = [s for s in sparsities if round(s, 6) not in level_of]
    if missing:
        raise SystemExit(f"sparsities {missing} are not on the {args.greedy_step} grid")
    fp = model_fingerprint(model)
    tokens = sum(int(b.numel()) for b in batches)
    sweeps: dict[tuple[str, str], list[dict]] = {}
    calib_s: dict[str, float] = {}
    att_sweep: list[dict] | None = None
    for fam in families:
        kind, rule, alloc, att = FAMILY_SPECS[fam]
        if (kind, rule) not in sweeps:
            t0 = time.perf_counter()
            lv = levels if kind != "teal" else sparsities
            sweeps[(kind, rule)] = calibrate_threshold_sweep(model, batches, kind, lv, None, rule)
            calib_s[f"{kind}-{rule}"] = time.perf_counter() - t0
            print(f"calibrated {kind}/{rule} at {len(lv)} levels in {calib_s[f'{kind}-{rule}']:.1f} s", flush=True)
        if att and att_sweep is None:
            t0 = time.perf_counter()
            att_sweep = calibrate_threshold_sweep(model, batches, "chess", sparsities, sparsities)
            calib_s["chess-attention"] = time.perf_counter() - t0
    allocations: dict[str, dict] = {}
    greedy_s: dict[str, float] = {}
    for kind, rule in sweeps:
        if kind == "teal" or not any(FAMILY_SPECS[f][:3] == (kind, rule, "greedy") for f in families):
            continue
        t0 = time.perf_counter()
        allocations[f"{kind}-{rule}"] = greedy_allocation(model, greedy_data, sweeps[(kind, rule)], levels, sparsities)
        greedy_s[f"{kind}-{rule}"] = time.perf_counter() - t0
        print(f"greedy allocation {kind}/{rule} in {greedy_s[f'{kind}-{rule}']:.1f} s: "
              + "; ".join(f"{s:g}: {a['sparsities']}" for s, a in allocations[f'{kind}-{rule}'].items()), flush=True)

    artifacts: dict[str, Artifact] = {}
    for fam in families:
        kind, rule, alloc, att = FAMILY_SPECS[fam]
        for j, s in enumerate(sparsities):
            meta = {"calibration_tokens": tokens, "calibration_batches": len(batches)}
            if kind == "teal":
                tensors = sweeps[(kind, rule)][j]
            elif alloc == "uniform":
                tensors = dict(sweeps[(kind, rule)][level_of[round(s, 6)]])
            else:
                a = allocations[f"{kind}-{rule}"][s]
                tensors = combine_levels(sweeps[(kind, rule)], a["levels"])
                meta["layer_sparsities"] = a["sparsities"]
            if att:
                tensors.update({k: v for k, v in att_sweep[j].items() if k.endswith((".q_in", ".o_in"))})
            artifacts[f"{fam}@{s:g}"] = Artifact(method=make_method(fam, s, args.greedy_step), fingerprint=fp,
                                                 tensors=dict(sorted(tensors.items())), meta=meta)

    def summarize(done: list[float]) -> dict:
        """The result over the sparsities evaluated so far (`done`), with the selection and comparison."""
        # Selection on the train-split validation loss only: the CHESS FFN-only variant, lowest mean increase.
        chess_ffn = [f for f in families if FAMILY_SPECS[f][0] == "chess" and not FAMILY_SPECS[f][3]]
        val_mean = {f: sum(metrics[f"{f}@{s:g}"]["val_loss_increase"] for s in done) / len(done) for f in families}
        selected = min(chess_ffn, key=val_mean.get) if chess_ffn else None
        verdict = {}
        for s in done:
            inc = {f: metrics[f"{f}@{s:g}"]["ppl_increase"] for f in families}
            row = {"increase": inc}
            if "cats" in inc and "teal" in inc:
                for f in families:
                    if FAMILY_SPECS[f][0] == "chess":
                        row[f"{f}_below_cats_and_teal"] = inc[f] < min(inc["cats"], inc["teal"])
            verdict[f"{s:g}"] = row
        result = make_result(
            "eval.chess_quality", metrics, model=model_info(model, args.model or "zoo:default"),
            data={**data_info, "tokens": len(ids),
                  "calibration": {"source": "corpus train split (calibration_batches, seed 0)",
                                  "samples": args.calib_samples, "seq_len": args.calib_len,
                                  "seconds_read": calib_read_s, "seconds_per_kind": calib_s,
                                  "greedy_samples": args.greedy_samples, "greedy_seconds": greedy_s},
                  "validation": {"source": "corpus train split (calibration_batches, seed 1)",
                                 "samples": args.val_samples, "seq_len": args.calib_len}},
            config={"context_length": args.context_length, "stride": cfg.stride, "threads": args.threads,
                    "sparsities": sparsities, "families": families,
                    "family_specs": {f: FAMILY_SPECS[f] for f in families}, "greedy_step": args.greedy_step},
            device=args.device)
        result["complete"] = len(done) == len(sparsities)
        result["allocations"] = allocations
        result["selection"] = {"rule": "lowest mean train-split validation loss increase over the sparsities, "
                                       "CHESS FFN-only variants", "val_loss_increase_mean": val_mean,
                               "selected_chess_ffn": selected}
        result["comparison"] = verdict
        return result

    metrics: dict[str, dict] = {}
    t0 = time.perf_counter()
    dense = perplexity(model, ids, None, cfg, progress=False)
    val_dense = calibration_loss(model, val_data, {})
    metrics["dense"] = {**dense.to_dict(), "family": "dense", "sparsity": 0.0, "val_loss": val_dense,
                        "seconds": time.perf_counter() - t0}
    print(f"dense                  ppl {dense.ppl:.4f}  val loss {val_dense:.4f}", flush=True)
    for s in sparsities:
        for fam in families:
            name = f"{fam}@{s:g}"
            art = artifacts[name]
            t1 = time.perf_counter()
            with SparsityMeter(model) as meter:
                r = perplexity(model, ids, art, cfg, progress=False)
            v = calibration_loss(model, val_data, art.tensors)
            metrics[name] = {**r.to_dict(), "family": fam, "sparsity": s, "config": art.method.to_dict(),
                             "ppl_increase": r.ppl - dense.ppl, "ppl_ratio": r.ppl / dense.ppl,
                             "val_loss": v, "val_loss_increase": v - val_dense,
                             "layer_sparsities_calibrated": art.meta.get("layer_sparsities"),
                             "measured_sparsity": meter.fractions(), "seconds_eval": time.perf_counter() - t1}
            fr = meter.fractions()
            print(f"{name:26s} ppl {r.ppl:.4f}  (+{r.ppl - dense.ppl:.4f})  val +{v - val_dense:.4f}  measured "
                  + " ".join(f"{k}={x:.3f}" for k, x in fr.items() if not k.startswith("ffn.L")), flush=True)
        write_json(args.out, summarize(sparsities[: sparsities.index(s) + 1]))  # partial results survive a kill
    result = summarize(sparsities)
    val_mean, selected = result["selection"]["val_loss_increase_mean"], result["selection"]["selected_chess_ffn"]

    write_json(args.out, result)
    plot(args.out, args.plot)
    print(f"\nppl increase over dense {dense.ppl:.4f} (val: mean train-split validation loss increase)")
    print(f"{'family':<24}" + "".join(f"{s:>9g}" for s in sparsities) + f"{'val':>9}")
    for f in families:
        print(f"{f:<24}" + "".join(f"{metrics[f'{f}@{s:g}']['ppl_increase']:9.4f}" for s in sparsities)
              + f"{val_mean[f]:9.4f}")
    print(f"selected on validation: {selected}; wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
