"""A²ATS retrieval quality: recall of attention mass at equal token budgets, and the long-context suite.

    python benchmarks/scripts/eval_a2ats.py --device cuda --out benchmarks/results --plot benchmarks/plots/a2ats_recall.png

Model: the bundled zoo model (or --model DIR), on --device. Calibration: corpus train split plus synthetic
retrieval prompts (seeded apart from the evaluation ones). Settings are chosen on validation sequences of the
train split (--shrinks: the query-aware metric shrunk toward the identity; the best recall at --suite-ratio
becomes "a2ats"); every variant is reported on the held-out sequences as well. Task prompts also record the
attention mass on the needle's value tokens and the part of it each method retrieves (needle_mass_retrieved). Evaluation sequences: windows of the held-out text
and RULER-style retrieval prompts (needles, keys, variable tracking) built on the held-out text, each
`--length` tokens; the queries are the last `--queries` positions of each sequence (decode-like: each attends
causally to its prefix).

For every layer, query head and query position m, with dense attention p over slots 0..m:
  recall(method, r) = sum of p over sinks ∪ window ∪ the k = floor(r (m + 1)) candidates that the method
  scores highest, per query head (equal budgets for every method).
Methods: oracle (exact logits), a2ats (query-aware VQ of pre-RoPE keys, windowed RoPE with distance bands:
each band of distances scored at its own distance), a2ats-1band (the paper's windowed RoPE: one distance for
every far key), plain-vq (K-means of the keys, distance bands), a2ats-no-wrope (query-aware VQ of post-RoPE
keys), quest (page min/max bounds of post-RoPE keys, pages of 16; the page metadata is not charged to the
budget); diagnostics exact-bands / exact-1band: windowed-RoPE scores of the unquantized keys (the ceiling of
each scoring rule, no VQ). Also a2ats as it runs (per KV group: union of the heads' top-k by the
virtual-code histogram threshold), with the fraction of tokens read.
Then the long-context suite (dense, a2ats, a2ats-1band, plain-vq, oracle_topk at 3%) through the patched model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import lmsqueeze
from lmsqueeze.bench.results import command_line, write_result
from lmsqueeze.methods.a2ats import A2ATS, retrieval, with_settings
from lmsqueeze.methods.a2ats.method import layer_codebooks
from lmsqueeze.methods.a2ats.reference import select_codes_reference
from lmsqueeze.methods.a2ats.windowed_rope import band_distances, band_of, distance_tables
from lmsqueeze.methods.cache import SqueezeCache
from lmsqueeze.methods.dense import DenseState
from lmsqueeze.models.compat import cache_kw
from lmsqueeze.models.rope import apply_rope, rope_tables

log = logging.getLogger("eval_a2ats")
RATIOS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
METHODS = ("oracle", "exact-bands", "exact-1band", "a2ats", "a2ats-1band", "plain-vq", "a2ats-no-wrope", "quest")


# data ----------------------------------------------------------------------------------------------------
def calibration_data(tok, args) -> list[torch.Tensor]:
    """Corpus train split windows plus synthetic retrieval prompts built on train-split text (seeded apart
    from the validation and evaluation prompts)."""
    from lmsqueeze.data.calibration import calibration_batches
    from lmsqueeze.data.corpus import read_texts
    from lmsqueeze.data.tasks import TASKS, make_samples

    batches = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.calib_len, seed=11)
    hay = "\n\n".join(read_texts(None, split="train", max_chars=2_000_000))
    per = -(-args.calib_tasks // len(TASKS))
    samples = make_samples(TASKS, tok, hay, [args.calib_len], depths=(0.3, 0.7), samples=max(1, per // 2),
                           seed=1001, formats=tuple(args.suite_formats.split(",")))
    g = torch.Generator().manual_seed(1002)
    for i in torch.randperm(len(samples), generator=g)[:args.calib_tasks].tolist():
        ids = tok(samples[i].prompt, add_special_tokens=True)["input_ids"][:args.calib_len]
        batches.append(torch.tensor([ids]))
    return batches


def needle_mask(tok, prompt: str, answers: list[str]) -> torch.Tensor:
    """Bool [n]: the prompt tokens overlapping any occurrence of an answer string (the needles' values)."""
    enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
    spans = []
    for a in answers:
        i = prompt.find(a)
        while i >= 0:
            spans.append((i, i + len(a)))
            i = prompt.find(a, i + 1)
    mask = [any(s < e1 and s1 < e for s1, e1 in spans) and e > s for s, e in enc["offset_mapping"]]
    return torch.tensor(mask)


def eval_sequences(tok, args, split: str = "heldout") -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(source, ids [1, n], needle mask [n] or None). split "heldout": the evaluation text; "train": the
    validation sequences that choose settings (train-split text, seeds apart from the calibration's)."""
    from lmsqueeze.data.corpus import read_texts
    from lmsqueeze.data.tasks import make_samples
    from lmsqueeze.eval.texts import eval_text

    if split == "heldout":
        text, _info = eval_text(None)
        seed_text, seed_tasks, n_text, n_tasks = 5, 0, args.text_seqs, args.task_seqs
    else:
        text = "\n\n".join(read_texts(None, split="train", max_chars=4_000_000))[2_000_000:]
        seed_text, seed_tasks, n_text, n_tasks = 77, 2024, args.val_text_seqs, args.val_task_seqs
    ids = tok(text[:4_000_000], add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed_text)
    out = []
    for o in torch.randint(0, len(ids) - args.length, (n_text,), generator=g).tolist():
        out.append(("heldout" if split == "heldout" else "text", torch.tensor([ids[o:o + args.length]]), None))
    tasks = ("niah_single", "passkey", "niah_multikey", "kv_retrieval", "vt", "niah_multivalue")
    samples = make_samples(tasks[:n_tasks], tok, text, [args.length], depths=(0.4,), seed=seed_tasks)
    for s in samples:
        ids_s = torch.tensor([tok(s.prompt, add_special_tokens=True)["input_ids"]])
        out.append((f"task:{s.task}", ids_s, needle_mask(tok, s.prompt, s.answers)))
    return out


# recording pre-RoPE q/k ----------------------------------------------------------------------------------
class _Record(DenseState):
    def __init__(self, store: dict, layer: int, last: int) -> None:
        super().__init__()
        self.store, self.layer, self.last = store, layer, last

    def attend(self, q, k, v, step):
        rec = self.store.setdefault(self.layer, {"q": [], "k": []})
        rec["q"].append(q[0].detach().clone())
        rec["k"].append(k[0].detach().clone())
        return super().attend(q, k, v, step)


@torch.no_grad()
def record(model, ids: torch.Tensor, queries: int, chunk: int = 2048) -> dict:
    """Per layer: q [Hq, Q, D] of the last `queries` positions and k [Hkv, n, D], both pre-RoPE."""
    store: dict = {}
    n_layers = len(model.model.layers)
    ids = ids.to(model.device)
    with lmsqueeze.apply(model, None):
        cache = SqueezeCache(lambda i: _Record(store, i, queries), n_layers)
        for a in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, a:a + chunk], **cache_kw(model, cache), use_cache=True)
    return {i: {"q": torch.cat(r["q"], 1)[:, -queries:].float(), "k": torch.cat(r["k"], 1).float()}
            for i, r in store.items()}


# recall --------------------------------------------------------------------------------------------------
def ranks(scores: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of every slot among the candidates; non-candidates get a huge rank. [H, Q, n]."""
    s = scores.masked_fill(~cand[None], float("-inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    r = torch.empty_like(order)
    r.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return torch.where(cand[None], r, torch.full_like(r, 1 << 40))


def layer_scores(rec: dict, books: dict, rotary, n: int, args) -> dict:
    """Method scores [Hq, Q, n] and dense probabilities for one layer of one sequence."""
    q_pre, k_pre = rec["q"], rec["k"]  # [Hq, Q, D], [Hkv, n, D]
    Hq, Q, D = q_pre.shape
    Hkv = k_pre.shape[0]
    G = Hq // Hkv
    dev = q_pre.device
    pos = torch.arange(n, device=dev)
    cos, sin = rope_tables(rotary, pos[None], torch.float32)  # [1, n, D]
    k_rot = apply_rope(k_pre[None], cos, sin)[0]
    q_rot = apply_rope(q_pre[None], cos[:, n - Q:], sin[:, n - Q:])[0]
    kk = k_rot.repeat_interleave(G, 0)
    logits = torch.einsum("hqd,hnd->hqn", q_rot, kk) * D ** -0.5
    m = torch.arange(n - Q, n, device=dev)[:, None]
    causal = pos[None, :] <= m
    p = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), -1)
    out = {"p": p, "oracle": logits}
    dist = (torch.arange(n - Q, n, device=dev)[:, None] - pos[None, :]).clamp_min(0)  # [Q, n]

    def band_tables(bands: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [distance_tables(rotary, d, torch.float32, dev)
                for d in band_distances(args.window, bands, args.distance)]

    def banded(per_band: list[torch.Tensor], bands: tuple[int, ...]) -> torch.Tensor:
        """[Hq, Q, n] scores of every slot from the per-band score tensors, by the slot's distance band."""
        band = band_of(dist, bands)  # [Q, n]
        return torch.stack(per_band, 0).gather(0, band[None, None].expand(1, Hq, Q, n))[0]

    bands = tuple(args.bands)
    for name, bb in (("exact-bands", bands), ("exact-1band", ())):
        kk_pre = k_pre.repeat_interleave(G, 0)
        out[name] = banded([torch.einsum("hqd,hnd->hqn", apply_rope(q_pre[None], *(t.expand(1, Q, D) for t in tb))[0],
                                         kk_pre) for tb in band_tables(bb)], bb)
    for name, (bk, windowed, bb) in books.items():
        keys = k_pre if windowed else k_rot
        codes = retrieval.assign_codes(keys[None], bk.assign, bk.half_norms)[0].long()  # [Hkv, n]
        cg = codes.repeat_interleave(G, 0)[:, None, :].expand(Hq, Q, n)
        score_cb = bk.score.float().repeat_interleave(G, 0)
        if windowed:
            luts = [torch.einsum("hqd,hcd->hqc", apply_rope(q_pre[None], *(t.expand(1, Q, D) for t in tb))[0],
                                 score_cb) for tb in band_tables(bb)]
        else:
            luts = [torch.einsum("hqd,hcd->hqc", q_rot, score_cb)]
        out[name] = banded([lut.gather(-1, cg) for lut in luts], bb if windowed else ())
        out[name + ":codes"] = codes
        out[name + ":lut"] = torch.cat(luts, -1)  # [Hq, Q, NB * C] virtual codes
        out[name + ":bands"] = bb if windowed else ()
    # Quest: upper bound of q·k over the page (16 post-RoPE keys) holding each slot
    ps = args.page_size
    P = -(-n // ps)
    pad = P * ps - n
    kp = torch.cat([k_rot, k_rot[:, -1:].expand(Hkv, pad, D)], 1) if pad else k_rot
    kp = kp.reshape(Hkv, P, ps, D)
    pmin, pmax = kp.amin(2).repeat_interleave(G, 0), kp.amax(2).repeat_interleave(G, 0)  # [Hq, P, D]
    bound = torch.maximum(q_rot[:, :, None] * pmin[:, None], q_rot[:, :, None] * pmax[:, None]).sum(-1)
    out["quest"] = bound.repeat_interleave(ps, -1)[..., :n]
    out["causal"] = causal
    return out


def layer_recall(sc: dict, n: int, Q: int, G: int, args, run_name: str = "a2ats",
                 needle: torch.Tensor | None = None) -> dict:
    """{(method, ratio): recall summed over heads x queries} and the union rows (the variant `run_name` as it
    runs), for one layer. needle: bool [n] slots of the needle's value (task prompts): also the attention
    mass on them and the part of it each method retrieves (keys (method, ratio, "needle"), (None, "needle"))."""
    dev = sc["p"].device
    pos = torch.arange(n, device=dev)
    m = torch.arange(n - Q, n, device=dev)[:, None]
    causal = sc["causal"]
    near = causal & ((pos[None, :] < args.sinks) | (m - pos[None, :] < args.window))
    cand = causal & ~near
    p = sc["p"]
    base = (p * near[None]).sum(-1)  # [Hq, Q]
    kth = (torch.arange(n - Q, n, device=dev) + 1).double()
    res = {}
    if needle is not None:
        res[(None, "needle")] = float((p * needle[None, None]).sum())
    for name in (m for m in sc if m in METHODS or m.startswith("a2ats-s")):
        if name.endswith((":codes", ":lut", ":bands")):
            continue
        r = ranks(sc[name], cand)
        for ratio in RATIOS:
            k = (kth * ratio).floor().long()[None, :, None]  # [1, Q, 1]
            sel = r < k
            res[(name, ratio)] = float((base + (p * sel).sum(-1)).sum())
            if needle is not None:
                res[(name, ratio, "needle")] = float((p * ((sel | near[None]) & needle[None, None])).sum())
    # a2ats as it runs: per KV group, union of the heads' top-k via the code-histogram threshold
    codes, lut, bands = sc[f"{run_name}:codes"], sc[f"{run_name}:lut"], sc[f"{run_name}:bands"]
    Hq, VC = lut.shape[0], lut.shape[-1]
    C = VC // (len(bands) + 1)
    Hkv = Hq // G
    for ratio in RATIOS:
        rec, frac = 0.0, 0.0
        for qi in range(Q):
            c = cand[qi]
            vcode = retrieval.virtual_codes(codes, (n - Q + qi - pos)[None].clamp_min(0), bands, C)  # [Hkv, n]
            counts = torch.zeros(Hkv, VC, dtype=torch.int32, device=dev).scatter_add_(
                1, vcode[:, c], torch.ones(Hkv, int(c.sum()), dtype=torch.int32, device=dev))
            kq = torch.tensor([int(kth[qi] * ratio)], dtype=torch.int32, device=dev)
            sel = select_codes_reference(lut[:, qi].reshape(1, Hkv, G, VC), counts[None], kq)[0]  # [Hkv, VC]
            take = sel.gather(1, vcode) & c[None]  # [Hkv, n]
            take = take.repeat_interleave(G, 0) | near[qi][None]
            rec += float((p[:, qi] * take).sum())
            if needle is not None:
                res[("a2ats-union", ratio, "needle")] = res.get(("a2ats-union", ratio, "needle"), 0.0) + float(
                    (p[:, qi] * (take & needle[None])).sum())
            frac += float(take.float().sum(-1).mean() / (n - Q + qi + 1))
        res[("a2ats-union", ratio)] = rec
        res[("a2ats-union:fraction_read", ratio)] = frac * Hq  # summed like the recalls (heads x queries)
    return res


# suite ---------------------------------------------------------------------------------------------------
def run_suite_rows(model, tok, arts: dict, args, rows: list, save) -> None:
    """The long-context suite for dense, a2ats, oracle top-k and plain VQ at one ratio; appends rows, saves
    after each method, and stops starting methods after --suite-budget-s seconds."""
    from lmsqueeze.eval.suite import SuiteConfig, run_suite
    from lmsqueeze.eval.texts import eval_text
    from lmsqueeze.methods.baselines.oracle_topk import OracleTopK

    text, _ = eval_text(None)
    cfg = SuiteConfig(tasks=tuple(args.suite_tasks.split(",")), lengths=tuple(args.suite_lengths),
                      samples=args.suite_samples, seed=3, depths=tuple(args.suite_depths),
                      formats=tuple(args.suite_formats.split(",")))
    methods = {}
    for name in args.suite_methods.split(","):
        if name == "dense":
            methods["dense"] = None
        elif name == "oracle":
            methods[f"oracle_topk@{args.suite_ratio}"] = OracleTopK(ratio=args.suite_ratio, sinks=args.sinks,
                                                                    window=args.window)
        elif name in arts:
            methods[f"{name}@{args.suite_ratio}"] = with_settings(arts[name], ratio=args.suite_ratio, offload=False)
    t_start = time.perf_counter()
    for name, method in methods.items():
        for task in cfg.tasks:  # one row per task, saved at once (a time limit keeps the finished tasks)
            if time.perf_counter() - t_start > args.suite_budget_s:
                rows.append({"method": f"suite:{name}", "task": task, "skipped": "over --suite-budget-s"})
                continue
            t = time.perf_counter()
            tcfg = SuiteConfig(tasks=(task,), lengths=cfg.lengths, samples=cfg.samples, seed=cfg.seed,
                               depths=cfg.depths, formats=cfg.formats)
            summary, records = run_suite(model, tok, text, method, tcfg, progress=False)
            wrong = [{k: r[k] for k in ("task", "length", "depth", "format", "answers", "prediction")}
                     for r in records if r["string_match_all"] < 1][:8]
            rows.append({"method": f"suite:{name}", "task": task, "summary": summary, "prompts": len(records),
                         "config": tcfg.to_dict(), "seconds": round(time.perf_counter() - t, 1),
                         "some_misses": wrong})
            print(f"suite {name} {task} ({len(records)} prompts, {time.perf_counter() - t:.0f}s): "
                  f"{summary['by_length']}", flush=True)
            save()


# recall over a set of sequences ----------------------------------------------------------------------------
def recall_totals(model, seqs, arts, variants, args, run_name: str) -> tuple[dict, dict, int, dict, list]:
    """Sum the recalls of every method over `seqs`. Returns (totals, per_source, count, count_by_source,
    per_sequence: one {(method, ratio): recall of that sequence} per sequence, for paired comparisons)."""
    cfg = model.config
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    rotary = model.model.rotary_emb
    totals: dict = {}
    per_source: dict = {}
    src_counts: dict = {}
    per_sequence: list[dict] = []
    count = 0
    per_seq = cfg.num_hidden_layers * cfg.num_attention_heads * args.queries
    for src, ids, needle in seqs:
        n = ids.shape[1]
        rec = record(model, ids, args.queries)
        nd = None if needle is None else needle.to(model.device)
        key_src = src.split(":")[0] if needle is None else src
        this: dict = {}
        for layer in range(cfg.num_hidden_layers):
            books = {name: (layer_codebooks(arts[name], layer).to(model.device), variants[name].windowed_rope,
                            variants[name].bands) for name in arts}
            sc = layer_scores(rec[layer], books, rotary, n, args)
            res = layer_recall(sc, n, args.queries, G, args, run_name, nd)
            for key, v in res.items():
                totals[key] = totals.get(key, 0.0) + v
                this[key] = this.get(key, 0.0) + v
                for k_src in {key_src, src.split(":")[0]}:
                    per_source.setdefault(k_src, {}).setdefault(key, 0.0)
                    per_source[k_src][key] += v
        count += per_seq
        per_sequence.append({k: v / per_seq for k, v in this.items() if len(k) == 2 and k[1] != "needle"})
        for k_src in {key_src, src.split(":")[0]}:
            src_counts[k_src] = src_counts.get(k_src, 0) + per_seq
        print(f"  {src} ({n} tokens): {run_name}@3% {totals[(run_name, 0.03)] / count:.4f} "
              f"plain-vq {totals.get(('plain-vq', 0.03), float('nan')) / count:.4f} "
              f"oracle {totals[('oracle', 0.03)] / count:.4f}", flush=True)
    return totals, per_source, count, src_counts, per_sequence


def paired(per_sequence: list[dict], a: str, b: str, resamples: int = 10000) -> dict:
    """Paired comparison of methods a and b over the sequences, per ratio: mean difference of the per-sequence
    recalls, its 95% bootstrap interval (sequences resampled, seed 0), wins / losses / ties, and a two-sided
    sign-flip permutation p-value of the mean difference."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for ratio in RATIOS:
        if not all((a, ratio) in s and (b, ratio) in s for s in per_sequence):
            continue
        d = torch.tensor([s[(a, ratio)] - s[(b, ratio)] for s in per_sequence], dtype=torch.float64)
        n = d.numel()
        boot = d[torch.randint(n, (resamples, n), generator=gen)].mean(1)
        flips = torch.randint(0, 2, (resamples, n), generator=gen).double() * 2 - 1
        perm = (flips * d).mean(1).abs()
        out[str(ratio)] = {"mean_diff": float(d.mean()),
                           "ci95": [float(boot.quantile(0.025)), float(boot.quantile(0.975))],
                           "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
                           "sequences": n, "p_sign_flip": float((perm >= d.mean().abs() - 1e-15).double().mean())}
    return out


def recall_rows(totals, per_source, count, src_counts, split: str) -> list[dict]:
    rows = []
    names = sorted({k[0] for k in totals if len(k) == 2 and k[0] and not str(k[0]).endswith(":fraction_read")
                    and k[1] != "needle"})
    for name in names:
        for ratio in RATIOS:
            if (name, ratio) not in totals:
                continue
            row = {"method": name, "split": split, "ratio": ratio, "recall": totals[(name, ratio)] / count,
                   "recall_by_source": {s: per_source[s][(name, ratio)] / src_counts[s] for s in per_source
                                        if (name, ratio) in per_source[s]},
                   "baseline": "oracle", "oracle_recall": totals[("oracle", ratio)] / count}
            needle = {s: per_source[s][(name, ratio, "needle")] / per_source[s][(None, "needle")]
                      for s in per_source if (name, ratio, "needle") in per_source[s]
                      and per_source[s].get((None, "needle"), 0) > 0}
            if needle:
                row["needle_mass_retrieved"] = needle
            if name == "a2ats-union":
                row["fraction_read"] = totals[("a2ats-union:fraction_read", ratio)] / count
            rows.append(row)
    return rows


# main ----------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled zoo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="a2ats_recall.json")
    p.add_argument("--plot", default=None, help="write the recall-vs-budget PNG here")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--text-seqs", type=int, default=4)
    p.add_argument("--task-seqs", type=int, default=4)
    p.add_argument("--val-text-seqs", type=int, default=2, help="train-split sequences that choose --shrinks")
    p.add_argument("--val-task-seqs", type=int, default=2)
    p.add_argument("--codebook", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=6)
    p.add_argument("--calib-tasks", type=int, default=2)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--kmeans-iters", type=int, default=12)
    p.add_argument("--max-keys", type=int, default=81920)
    p.add_argument("--sinks", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--distance", type=int, default=2048, help="the single distance of a2ats-1band")
    p.add_argument("--bands", type=lambda x: [int(v) for v in x.split(",") if v], default=[256, 1024, 4096],
                   help="inner distance-band edges of a2ats and plain-vq")
    p.add_argument("--shrinks", type=lambda x: [float(v) for v in x.split(",") if v], default=[0.0],
                   help="query-aware variants a2ats-s<shrink> (vq.shrink_metric); the best on the train-split "
                        "validation sequences at --suite-ratio becomes 'a2ats'")
    p.add_argument("--variants", default="plain-vq,a2ats-1band", help="ablations besides the a2ats-s* variants")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--suite-tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--suite-lengths", type=lambda x: [int(v) for v in x.split(",")], default=[4096])
    p.add_argument("--suite-depths", type=lambda x: [float(v) for v in x.split(",")], default=[0.25, 0.75])
    p.add_argument("--suite-samples", type=int, default=1)
    p.add_argument("--suite-ratio", type=float, default=0.03)
    p.add_argument("--suite-formats", default="prose,code")
    p.add_argument("--suite-methods", default="dense,a2ats,oracle,plain-vq",
                   help="methods in the suite: dense, variant names, or 'oracle'")
    p.add_argument("--suite-budget-s", type=float, default=1e9, help="start no suite method after this")
    p.add_argument("--no-suite", action="store_true")
    p.add_argument("--no-recall", action="store_true", help="calibrate, choose, and run the suite only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--replot", default=None, help="only draw --plot from this result JSON (held-out rows)")
    args = p.parse_args()
    if args.replot:
        replot(args.replot, args.plot)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = lmsqueeze.load_model(args.model, dtype=torch.float32, device=args.device)
    model.eval()
    cfg = model.config
    extra = {"model": args.model or "zoo:default", "options": vars(args), "ratios": list(RATIOS)}

    batches = calibration_data(tok, args)
    print(f"[{time.perf_counter() - t0:7.1f}s] calibration data: {len(batches)} sequences", flush=True)
    extra["calibration_tokens"] = int(sum(b.numel() for b in batches))
    common = {"codebook": args.codebook, "sinks": args.sinks, "window": args.window, "distance": args.distance,
              "kmeans_iters": args.kmeans_iters, "offload": False, "max_keys": args.max_keys}
    bands = tuple(args.bands)
    variants = {f"a2ats-s{s:g}": A2ATS(bands=bands, shrink=s, **common) for s in args.shrinks}
    ablations = {"a2ats-1band": A2ATS(bands=(), **common), "plain-vq": A2ATS(query_aware=False, bands=bands, **common),
                 "a2ats-no-wrope": A2ATS(windowed_rope=False, bands=(), **common)}
    variants.update({k: v for k, v in ablations.items() if k in args.variants.split(",")})
    arts, calib_s = {}, {}
    for name, method in variants.items():
        t = time.perf_counter()
        arts[name] = method.calibrate(model, batches)
        calib_s[name] = round(time.perf_counter() - t, 1)
        print(f"[{time.perf_counter() - t0:7.1f}s] calibrated {name} in {calib_s[name]}s", flush=True)
    extra["calibration_seconds"] = calib_s
    extra["relative_quantization_error"] = {k: a.meta["relative_quantization_error"] for k, a in arts.items()}
    rows: list[dict] = []

    def save():
        extra["elapsed_s"] = round(time.perf_counter() - t0, 1)
        return write_result(Path(args.out) / args.name, "a2ats_recall", command_line(), rows, extra, args.device)

    # choose the shrink on train-split validation sequences (never on the held-out ones)
    qa = [n for n in arts if n.startswith("a2ats-s")]
    if len(qa) > 1:
        val = eval_sequences(tok, args, split="train")
        print(f"[{time.perf_counter() - t0:7.1f}s] validation (train split): {len(val)} sequences", flush=True)
        vt, vps, vc, vsc, _ = recall_totals(model, val, arts, variants, args, qa[0])
        rows += recall_rows(vt, vps, vc, vsc, "validation")
        chosen = max(qa, key=lambda n: vt[(n, args.suite_ratio)])
        extra["validation"] = {n: vt[(n, args.suite_ratio)] / vc for n in arts}
    else:
        chosen = qa[0]
    extra["chosen"] = chosen
    arts["a2ats"], variants["a2ats"] = arts[chosen], variants[chosen]
    print(f"[{time.perf_counter() - t0:7.1f}s] a2ats = {chosen} (chosen on validation data)", flush=True)

    totals: dict = {}
    count = 0
    if not args.no_recall:
        seqs = eval_sequences(tok, args)
        extra["sequences"] = [{"source": s, "tokens": int(ids.shape[1])} for s, ids, _ in seqs]
        eval_arts = {k: v for k, v in arts.items() if k != "a2ats"}
        totals, per_source, count, src_counts, per_sequence = recall_totals(model, seqs, eval_arts, variants, args,
                                                                           chosen)
        extra["paired"] = {f"a2ats - {b}": paired(per_sequence, chosen, b) for b in ("plain-vq", "quest")}
        for key in [k for k in totals if k[0] == chosen]:  # the chosen variant is reported as 'a2ats' too
            totals[("a2ats", *key[1:])] = totals[key]
            for src in per_source.values():
                if key in src:
                    src[("a2ats", *key[1:])] = src[key]
        rows += recall_rows(totals, per_source, count, src_counts, "heldout")
        extra["queries_per_method_ratio"] = count
        save()
    if not args.no_suite:
        run_suite_rows(model, tok, arts, args, rows, save)
    path = save()
    if not totals:
        print(f"wrote {path}")
        return
    names = [m for m in (*METHODS, *qa, "a2ats-union") if (m, RATIOS[0]) in totals]
    print(f"\nrecall of attention mass, held-out (model {extra['model']}, {count // (cfg.num_hidden_layers * cfg.num_attention_heads * args.queries)} "
          f"sequences x {args.length} tokens, last {args.queries} positions); a2ats = {chosen}")
    print("method            " + "".join(f"{r:>8.2f}" for r in RATIOS))
    for name in names:
        print(f"{name:18s}" + "".join(f"{totals[(name, r)] / count:8.4f}" for r in RATIOS))
    print("a2ats-union read  " + "".join(f"{totals[('a2ats-union:fraction_read', r)] / count:8.4f}" for r in RATIOS))
    for name, by_ratio in extra.get("paired", {}).items():
        r = by_ratio.get(str(args.suite_ratio))
        if r:
            print(f"paired {name} @{args.suite_ratio}: mean {r['mean_diff']:+.4f} CI95 [{r['ci95'][0]:+.4f}, "
                  f"{r['ci95'][1]:+.4f}] wins {r['wins']}/{r['sequences']} p {r['p_sign_flip']:.4f}")
    print(f"wrote {path}")
    if args.plot:
        plot(totals, count, args.plot, extra)


def replot(result: str, path: str) -> None:
    """The recall-vs-budget plot from a written result (its held-out rows)."""
    import json

    data = json.loads(Path(result).read_text())
    totals = {(r["method"], r["ratio"]): r["recall"] for r in data["rows"]
              if r.get("split", "heldout") == "heldout" and "recall" in r}
    extra = dict(data["extra"])
    extra.setdefault("chosen", "a2ats")
    extra["model"] = f"{extra['model']} ({data['device'].get('name')})"
    plot(totals, 1, path, extra)


def plot(totals: dict, count: int, path: str, extra: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in (m for m in (*METHODS, "a2ats-union") if (m, RATIOS[0]) in totals):
        ax.plot([100 * r for r in RATIOS], [totals[(name, r)] / count for r in RATIOS], marker="o",
                label=name if name != "a2ats-union" else "a2ats (group union, as run)")
    ax.set_xscale("log")
    ax.set_xlabel("budget: top-k tokens per head, % of the context (plus 8 sinks + 64 window)")
    ax.set_ylabel("recall of attention mass")
    ax.set_title(f"{extra['model']}, {extra['options']['length']} tokens, held-out; a2ats = {extra['chosen']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
