"""Inference figures: request-latency CDFs, p95 latency per policy, tail all-to-all per layer.

They read the result table (one row per policy and point) and the per-policy serving
runs (request latencies, per-batch layer times) that :func:`lina_sim.serving.run.run_inference`
returns.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lina_sim.serving.run import layer_a2a_tail  # noqa: E402
from plots.training import save_figure  # noqa: E402  (atomic figure writes, shared)

# One colour per placement policy, stable across figures.
POLICY_COLORS = {
    "static": "#4c72b0",
    "fastermoe-shadow": "#8172b3",
    "eplb": "#937860",
    "lina": "#c44e52",
    "lina-no-estimate": "#dd8452",
    "lina-no-finetune": "#da8bc3",
    "oracle": "#55a868",
    "ideal": "#8c8c8c",
}


def _color(name: str) -> str | None:
    return POLICY_COLORS.get(name)


def latency_cdf(runs, path: str | Path, title: str = "") -> Path:
    """Empirical CDF of request latency (ms), one line per policy, with p95 marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for run in runs:
        lat = np.sort(run.latencies()) * 1e3
        y = np.arange(1, lat.size + 1) / lat.size
        ls = "--" if run.entry.name == "ideal" else "-"
        ax.plot(lat, y, ls, color=_color(run.entry.name), label=run.entry.label, lw=1.4)
    ax.axhline(0.95, color="#999999", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], 0.955, " p95", fontsize=7, color="#666666", va="bottom")
    ax.set_xlabel("request latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.set_title(textwrap.fill(title or "request latency", 70), fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def p95_bars(results: pd.DataFrame, path: str | Path) -> Path:
    """p95 request latency per policy (ms), one panel per scenario point and served
    domain (three per row), labelled with the ratio to ``static``; the panel title gives
    the domain's batch skew (busiest expert's tokens / uniform share)."""
    point = results["point"] if "point" in results else pd.Series(0, index=results.index)
    domain = results["domain"] if "domain" in results else pd.Series("mixed", index=results.index)
    points = list(dict.fromkeys(zip(point, domain)))  # one panel per point and served domain
    ncols = min(3, len(points))
    nrows = -(-len(points) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (pt, dom) in zip(axes.ravel(), points):
        d = results[(point == pt) & (domain == dom)]
        x = np.arange(len(d))
        vals = d["latency_p95_s"].to_numpy() * 1e3
        ax.bar(x, vals, color=[_color(n) or "#777777" for n in d["policy_name"]])
        for xi, v, r in zip(x, vals, d["latency_p95_vs_static"]):
            if np.isfinite(r):
                ax.text(xi, v, f"{r:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, d["policy"], rotation=40, ha="right", fontsize=7)
        first = d.iloc[0]
        slots = f", {int(first['expert_slots'])} slots/GPU/layer" if "expert_slots" in d else ""
        skew = f"\n{dom}, skew {first['batch_skew_mean']:.2f}" if "batch_skew_mean" in d else ""
        ax.set_title(f"{int(first['gpus'])} GPUs, {int(first['experts'])} experts{slots}{skew}", fontsize=9)
        ax.set_ylabel("p95 latency (ms)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(points) :]:
        ax.set_visible(False)
    fig.suptitle("p95 request latency (label: ratio to static)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def layer_tail(runs, path: str | Path, title: str = "") -> Path:
    """p95 over batches of each MoE layer's dispatch + combine all-to-all (ms)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for run in runs:
        tail = layer_a2a_tail(run) * 1e3
        ls = "--" if run.entry.name == "ideal" else "-"
        ax.plot(
            np.arange(tail.size),
            tail,
            ls,
            marker="o",
            ms=3,
            color=_color(run.entry.name),
            label=run.entry.label,
            lw=1.2,
        )
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("p95 all-to-all per layer (ms)")
    ax.set_title(textwrap.fill(title or "tail all-to-all per layer", 70), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
