"""Where a step's time went, read from the timeline alone.

Per rank, over [0, step end): ``compute`` is time the compute stream is busy; ``exposed
all-to-all`` is time an all-to-all runs while no compute does; ``exposed allreduce`` is
time an allreduce runs while neither compute nor an all-to-all does; ``idle`` is the
rest (waiting for a rendezvous, latency gaps). The four add up to the step time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORIES = ("compute", "exposed_a2a", "exposed_allreduce", "idle")


def _union(intervals: np.ndarray) -> np.ndarray:
    """Sorted disjoint union of [start, end) rows."""
    if len(intervals) == 0:
        return np.empty((0, 2))
    iv = intervals[np.argsort(intervals[:, 0], kind="stable")]
    out = [iv[0].copy()]
    for s, e in iv[1:]:
        if s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append(np.array([s, e]))
    return np.array(out)


def _length(u: np.ndarray) -> float:
    return float((u[:, 1] - u[:, 0]).sum()) if len(u) else 0.0


def _minus(a: np.ndarray, b: np.ndarray) -> float:
    """Length of union(a) minus union(b); both already unions."""
    if len(a) == 0:
        return 0.0
    if len(b) == 0:
        return _length(a)
    return _length(a) - _length(_intersect(a, b))


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        if s < e:
            out.append((s, e))
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return np.array(out) if out else np.empty((0, 2))


def rank_breakdown(df: pd.DataFrame, step_time: float | None = None) -> pd.DataFrame:
    """One row per rank: seconds of compute, exposed all-to-all, exposed allreduce, idle."""
    end = float(df["end"].max()) if step_time is None else step_time
    rows = []
    for rank, d in df.groupby("rank", sort=True):
        iv = {
            k: _union(d.loc[d["kind"] == k, ["start", "end"]].to_numpy(float))
            for k in ("compute", "all_to_all", "allreduce")
        }
        comp = iv["compute"]
        a2a = _minus(iv["all_to_all"], comp)
        busy = _union(np.vstack([comp, iv["all_to_all"]])) if len(comp) or len(iv["all_to_all"]) else np.empty((0, 2))
        ar = _minus(iv["allreduce"], busy)
        c = _length(comp)
        rows.append(
            {
                "rank": int(rank),
                "compute": c,
                "exposed_a2a": a2a,
                "exposed_allreduce": ar,
                "idle": max(end - c - a2a - ar, 0.0),
            }
        )
    return pd.DataFrame(rows)


def mean_breakdown(df: pd.DataFrame, step_time: float | None = None) -> dict[str, float]:
    """The per-rank breakdown averaged over ranks (seconds)."""
    b = rank_breakdown(df, step_time)
    return {k: float(b[k].mean()) for k in CATEGORIES}
