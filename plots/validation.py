"""The figures of a training validation (``lina-sim validate``): predicted against
measured step time, and per policy the predicted and measured timelines of one step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# (point, policy) -> one step's timeline frame, as runtime modes return them
Timelines = dict[tuple[int, str], pd.DataFrame]


def plot(j: pd.DataFrame, pred_tls: Timelines, meas_tls: Timelines, out: Path, title: str) -> list[Path]:
    """``out/validation.png``: bars of predicted vs measured step time (ms; the measured
    min..max as error bars) with each error; and per (point, policy)
    ``out/timelines-p<point>-<policy>.png``: the predicted and measured timelines of one
    step, one row per rank and stream. Returns the paths written."""
    paths = []
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(j), 3.6))
    x = np.arange(len(j))
    ax.bar(x - 0.2, j["step_time_s_pred"] * 1e3, 0.4, label="predicted (simulator)")
    ax.bar(
        x + 0.2,
        j["step_time_s_meas"] * 1e3,
        0.4,
        label="measured (testbed, median)",
        yerr=[
            (j["step_time_s_meas"] - j["step_time_min_s"]) * 1e3,
            (j["step_time_max_s"] - j["step_time_s_meas"]) * 1e3,
        ],
    )
    for i, e in enumerate(j["error_pct"]):
        ax.text(
            i,
            max(j["step_time_s_pred"].iloc[i], j["step_time_max_s"].iloc[i]) * 1e3 * 1.02,
            f"{e:+.0f}%",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(x, [f"{p}\n{pol}" if j["point"].nunique() > 1 else pol for p, pol in zip(j["point"], j["policy"])])
    ax.set_ylabel("step time (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "validation.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    colors = {"compute": "tab:blue", "all_to_all": "tab:orange", "allreduce": "tab:green"}
    for key in meas_tls:
        fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
        for ax, name, tl in ((axes[0], "predicted", pred_tls.get(key)), (axes[1], "measured", meas_tls[key])):
            if tl is None:
                continue
            rows = [(r, s) for r in sorted(tl["rank"].unique()) for s in ("compute", "a2a", "allreduce")]
            for yi, (rank, stream) in enumerate(rows):
                d = tl[(tl["rank"] == rank) & (tl["stream"] == stream)]
                ax.broken_barh(
                    list(zip(d["start"] * 1e3, (d["end"] - d["start"]) * 1e3)),
                    (yi - 0.4, 0.8),
                    color=[colors.get(k, "gray") for k in d["kind"]],
                )
            ax.set_yticks(range(len(rows)), [f"r{r} {s}" for r, s in rows], fontsize=6)
            ax.set_title(f"{name}: {key[1]} (point {key[0]})", fontsize=9)
        axes[1].set_xlabel("time in step (ms)")
        fig.tight_layout()
        paths.append(out / f"timelines-p{key[0]}-{key[1]}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
