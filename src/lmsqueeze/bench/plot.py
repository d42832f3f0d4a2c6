"""PNG plots made from result JSON files (never from numbers typed in)."""

from __future__ import annotations

from pathlib import Path

from lmsqueeze.bench.results import read_result
from lmsqueeze.errors import LmsqueezeError


def plot_attention(result: str | Path, png: str | Path) -> Path:
    """Bar chart of achieved TB/s per method for each (batch, length) of a decode_attention result,
    with the peak bandwidth the rows were compared with drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = read_result(result)
    if doc["kind"] != "decode_attention":
        raise LmsqueezeError(f"{result} is a {doc['kind']!r} result; plot_attention needs decode_attention")
    rows = doc["rows"]
    cases = list(dict.fromkeys((r["batch"], r["length"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tbps = {(r["batch"], r["length"], r["method"]): r["tb_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(cases) * len(methods) / 2, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [tbps.get((b, n, m), 0.0) for b, n in cases], width, label=m)
    peak = doc.get("extra", {}).get("peak_tb_per_s")
    if peak:
        ax.axhline(peak, color="k", ls="--", lw=1, label=f"{peak:g} TB/s")
    ax.set_xticks(range(len(cases)), [f"B={b}\nN={n // 1024}K" if n >= 1024 else f"B={b}\nN={n}" for b, n in cases])
    ax.set_ylabel("achieved TB/s (bytes moved / time)")
    preset = rows[0].get("preset", "") if rows else ""
    ax.set_title(f"decode attention, {preset}, {doc['device']['name']}\n{doc['commit'][:10]} {doc['date']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
