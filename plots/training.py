"""Training figures: breakdown bars, speedup against experts, a step's timeline.

They read only result tables (one row per policy) and the timeline table.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

COLORS = {
    "compute": "#4c72b0",
    "exposed_a2a": "#dd8452",
    "exposed_allreduce": "#c44e52",
    "idle": "#bbbbbb",
    "all_to_all": "#dd8452",
    "allreduce": "#c44e52",
}
LABELS = {
    "compute": "compute",
    "exposed_a2a": "exposed all-to-all",
    "exposed_allreduce": "exposed allreduce",
    "idle": "idle / waiting",
}


def save_figure(fig, path: str | Path) -> Path:
    """Save and close a figure; written under a temporary name and renamed, so a reader
    never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def breakdown_bars(rows: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """A stacked bar per policy: compute, exposed all-to-all, exposed allreduce, idle (ms)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.6))
    bottom = pd.Series(0.0, index=rows.index)
    for key in ("compute", "exposed_a2a", "exposed_allreduce", "idle"):
        vals = rows[f"{key}_s"] * 1e3
        ax.bar(rows["policy"], vals, bottom=bottom, color=COLORS[key], label=LABELS[key])
        bottom += vals
    for x, (t, s) in enumerate(zip(rows["step_time_s"], rows["speedup"])):
        ax.text(x, t * 1e3, f"{s:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("step time (ms)")
    ax.set_title(title or "where the step time goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def speedup_vs_experts(rows: pd.DataFrame, path: str | Path, baseline: str | None = None) -> Path:
    """Step-time speedup over ``baseline`` (default: each point's first policy) against the
    number of experts, one panel per model, one line per policy."""
    models = list(dict.fromkeys(rows["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.3), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        d = rows[rows["model"] == model]
        for policy, p in d.groupby("policy", sort=False):
            if baseline is not None:
                base = d[d["policy"] == baseline].set_index("experts")["step_time_s"]
                y = base.reindex(p["experts"]).to_numpy() / p["step_time_s"].to_numpy()
            else:
                y = p["speedup"].to_numpy()
            ax.plot(p["experts"], y, marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(d["experts"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(model)
        ax.set_xlabel("experts (= GPUs)")
    axes[0][0].set_ylabel(f"speedup over {baseline or 'first policy'}")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def timeline_figure(df: pd.DataFrame, path: str | Path, title: str = "", max_ranks: int = 8) -> Path:
    """One row per (rank, stream): compute, all-to-all and allreduce ops as bars (ms)."""
    ranks = sorted(df["rank"].unique())[:max_ranks]
    d = df[df["rank"].isin(ranks)]
    streams = [s for s in ("compute", "a2a", "allreduce", "all_to_all") if s in set(d["stream"])]
    rows = [(r, s) for r in ranks for s in streams]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.2))
    for y, (r, s) in enumerate(rows):
        e = d[(d["rank"] == r) & (d["stream"] == s)]
        if len(e):
            colors = [COLORS.get(k, "#4c72b0") for k in e["kind"]]
            ax.barh(y, (e["end"] - e["start"]) * 1e3, left=e["start"] * 1e3, height=0.8, color=colors, lw=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {r} {s}" for r, s in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "one training step")
    return save_figure(fig, path)
