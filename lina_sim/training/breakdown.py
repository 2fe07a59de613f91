"""Where a step's time went, read from the timeline alone.

Per rank, over [0, step end): ``compute`` is time the compute stream is busy; ``exposed
all-to-all`` is time an all-to-all runs while no compute does; ``exposed allreduce`` is
time an allreduce runs while neither compute nor an all-to-all does; ``idle`` is the
rest (waiting for a rendezvous, latency gaps). The four add up to the step time.
``total_a2a`` and ``total_allreduce`` are the time any all-to-all (any allreduce) runs,
hidden or not, so a reader can set the simulator beside a measured breakdown of either
kind. Units: seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORIES = ("compute", "exposed_a2a", "exposed_allreduce", "idle")
TOTALS = ("total_a2a", "total_allreduce")


def _union_length(group: np.ndarray, start: np.ndarray, end: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group id in ``[0, n_groups)``: the length of the union of its [start, end)
    intervals. A sweep over the sorted interval ends: the running count of open intervals
    is a plain cumulative sum because every group's +1s and -1s cancel, so one sort serves
    every group (no Python loop over ranks)."""
    if len(group) == 0:
        return np.zeros(n_groups)
    t = np.concatenate([start, end])
    g = np.concatenate([group, group])
    delta = np.concatenate([np.ones(len(start), np.int64), -np.ones(len(end), np.int64)])
    order = np.lexsort((-delta, t, g))  # at a tie, open before close: touching intervals merge
    t, g, open_ = t[order], g[order], np.cumsum(delta[order])
    covered = (g[1:] == g[:-1]) & (open_[:-1] > 0)
    return np.bincount(g[:-1][covered], weights=np.diff(t)[covered], minlength=n_groups)


def rank_breakdown(df: pd.DataFrame, step_time: float | None = None) -> pd.DataFrame:
    """One row per rank: seconds of compute, exposed all-to-all, exposed allreduce, idle,
    and the total time of all-to-alls and of allreduces."""
    end = float(df["end"].max()) if step_time is None else step_time
    ranks, idx = np.unique(df["rank"].to_numpy(), return_inverse=True)
    kind = df["kind"].to_numpy()
    start, stop = df["start"].to_numpy(float), df["end"].to_numpy(float)

    def covered(*kinds: str) -> np.ndarray:
        m = np.isin(kind, kinds)
        return _union_length(idx[m], start[m], stop[m], len(ranks))

    comp = covered("compute")
    comp_a2a = covered("compute", "all_to_all")
    busy = covered("compute", "all_to_all", "allreduce")
    return pd.DataFrame(
        {
            "rank": ranks.astype(int),
            "compute": comp,
            "exposed_a2a": comp_a2a - comp,
            "exposed_allreduce": busy - comp_a2a,
            "idle": np.maximum(end - busy, 0.0),
            "total_a2a": covered("all_to_all"),
            "total_allreduce": covered("allreduce"),
        }
    )


def mean_breakdown(df: pd.DataFrame, step_time: float | None = None) -> dict[str, float]:
    """The per-rank breakdown averaged over ranks (seconds): :data:`CATEGORIES`, which add
    up to the step, then :data:`TOTALS`."""
    b = rank_breakdown(df, step_time)
    return {k: float(b[k].mean()) for k in CATEGORIES + TOTALS}
