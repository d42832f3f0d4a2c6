"""Loss-curve plots of a zoo training results JSON (benchmarks/results/train_*.json)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training(results_json: str | Path, out_png: str | Path) -> Path:
    """Three panels: training loss per pass, validation perplexity per pass, 8K passkey (code / prose),
    all against tokens seen. Periodic validation is 4 windows of 8192 tokens in bf16 (the card's numbers
    are the final fp32 evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(results_json).read_text())
    train = [r for r in res["log"] if "loss" in r]
    evals = [r for r in res["log"] if "eval" in r]
    n_pass = len(train[0]["pass_loss"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in range(n_pass):
        label = "loss" if n_pass == 1 else f"pass {r + 1}"
        axes[0].plot([x["tokens"] / 1e6 for x in train], [x["pass_loss"][r] for x in train], label=label, lw=1)
        axes[1].plot([x["tokens"] / 1e6 for x in evals], [x["eval"]["val_ppl"][r] for x in evals], "o-", label=label)
    axes[0].set_ylim(top=min(6.0, max(x["pass_loss"][-1] for x in train)))
    axes[0].set(title="training loss", xlabel="tokens (M)", ylabel="nats/token")
    axes[1].set(title="validation perplexity (periodic, 32K tokens)", xlabel="tokens (M)", yscale="log")
    for fmt in ("code", "prose"):
        axes[2].plot([x["tokens"] / 1e6 for x in evals], [x["eval"]["passkey"][fmt] for x in evals], "o-", label=fmt)
    axes[2].set(title="passkey at 8192 tokens (periodic, n=8)", xlabel="tokens (M)", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    meta = res["meta"]
    stage = " (second stage, continued from a trained model)" if res.get("init_from") else ""
    fig.suptitle(f"{res['name']}{stage}: {res['parameters']:,} params, {res['train']['tokens'] / 1e6:.0f}M tokens, "
                 f"{res['train']['elapsed_s']:.0f}s on {meta['device']} (commit {meta['git_commit'][:8]})")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
