"""Figures of trace statistics: per-layer skew bars and transition heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lina_sim.routing.stats import RoutingStats  # noqa: E402


def heatmap_pairs(num_pairs: int, want: int = 4) -> list[int]:
    """Up to ``want`` layer-pair indices spread from the first to the last."""
    if num_pairs <= want:
        return list(range(num_pairs))
    return sorted({int(round(i * (num_pairs - 1) / (want - 1))) for i in range(want)})


def plot_trace_stats(stats: RoutingStats, path: str | Path, pairs: Sequence[int] | None = None) -> Path:
    """Skew per layer (busiest/uniform and CV, bars) above P(l+1 | l) heatmaps; writes PNG."""
    path = Path(path)
    pairs = list(pairs) if pairs is not None else heatmap_pairs(stats.transitions.shape[0])
    ncols = max(1, len(pairs))
    fig = plt.figure(figsize=(3.2 * ncols, 6.4), constrained_layout=True)
    grid = fig.add_gridspec(2, ncols)
    ax = fig.add_subplot(grid[0, :])
    layers = np.array(stats.skew.layers)
    w = 0.38
    ax.bar(layers - w / 2, stats.skew.max_over_uniform, w, label="busiest / uniform share")
    ax.bar(layers + w / 2, stats.skew.cv, w, label="coefficient of variation")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("MoE layer")
    ax.set_xticks(layers)
    m = stats.summary
    ax.set_title(f"{m['model']} on {m['dataset']}: load skew per layer (top-{m['top_k']} of {m['experts']})")
    top = max(max(stats.skew.max_over_uniform), max(stats.skew.cv), 1.0)
    ax.set_ylim(0, top * 1.25)  # headroom so the legend never covers a bar
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    image = None
    for i, p in enumerate(pairs):
        hax = fig.add_subplot(grid[1, i])
        image = hax.imshow(stats.transitions[p], vmin=0, vmax=1, cmap="viridis", aspect="equal")
        hax.set_title(f"P(expert at {p + 1} | expert at {p})", fontsize=9)
        hax.set_xlabel(f"expert at layer {p + 1}")
        hax.set_ylabel(f"expert at layer {p}")
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.8, label="probability")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
