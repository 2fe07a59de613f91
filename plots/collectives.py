"""Collective figures: a measured table against the simulator's prediction
(``lina-sim collective --compare --out``).

They read only the comparison frame (``lina_sim.experiments.microbench.compare_measured``:
``size_bytes``, ``time_s``, ``predicted_s`` and the table's configuration columns).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from plots.training import save_figure  # noqa: E402


def measured_vs_predicted(t: pd.DataFrame, path: str | Path) -> Path:
    """Log-log time (µs) against size (bytes) of one measured table: the measured points
    and the simulator's line, with the median |error| in the title. Returns the path."""
    t = t.sort_values("size_bytes")
    first = t.iloc[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(t["size_bytes"], t["time_s"] * 1e6, "o", ms=3, label="measured")
    ax.loglog(t["size_bytes"], t["predicted_s"] * 1e6, "-", label=f"predicted ({first['preset']}, {first['algo']})")
    ax.set_xlabel("size per rank (bytes)")
    ax.set_ylabel("time (µs)")
    err = float(t["error_pct"].abs().median())
    ax.set_title(
        f"{first['table']}: {first['collective']}, {first['nodes']}x{first['ranks_per_node']} ranks\n"
        f"median |error| {err:.1f}% (error = predicted / measured - 1)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
