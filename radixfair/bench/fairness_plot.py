"""The `bench fairness` figure: each client's service rate over time, one panel per policy."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any


def plot_service_rates(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Draw from the JSON rows alone (their `timeline`), so a saved JSON can be re-plotted."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.6 * nrows), sharey=True, squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        edges = row["timeline"]["edges"]
        mids = [(a + b) / 2 for a, b in pairwise(edges)]
        widths = [b - a for a, b in pairwise(edges)]
        for client, service in row["timeline"]["service"].items():
            rates = [s / w for s, w in zip(service, widths, strict=True)]
            heavy = client == row["heavy_client"]
            docs = row.get("heavy_doc_factor", 1.0)
            tag = f"×{row['heavy_factor']:g}" if docs == 1.0 else f"×{row['heavy_factor']:g} rate, ×{docs:g} docs"
            ax.plot(mids, rates, marker="o", markersize=3, linewidth=2.2 if heavy else 1.1,
                    linestyle="--" if heavy else "-", label=f"{client} ({tag})" if heavy else client)
        jain = row["jain"]
        name = f"{row['policy']} ({row['workload']})" if len({r.get("workload") for r in rows}) > 1 else row["policy"]
        ax.set_title(f"{name}: {row['throughput']:.0f} tok/s, hit {row['hit_rate']:.2f}, "
                     f"Jain {'n/a' if jain is None else f'{jain:.2f}'}", fontsize=10)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("charged service (tokens/s)")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)
