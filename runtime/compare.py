"""Predicted against measured: the joins, errors and rankings of a validation, and where
a step's time goes.

Pure pandas on results frames (one row per point and policy) and timeline frames; the
tables that print them are :mod:`lina_sim.results.tables`' (``format_validation_table``
and friends). Step 5 of a validation (:mod:`runtime.validate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

KEYS = ["point", "policy"]
# Columns of a training results table compared side by side (suffixes _pred, _meas).
TRAINING_COLUMNS = [
    "step_time_s",
    "compute_s",
    "exposed_a2a_s",
    "exposed_allreduce_s",
    "idle_s",
    "experts_per_device",
    "pipeline_degree",
]
# What only the measurement has: the spread of its steps and the scheduler's cost.
MEASURED_EXTRAS = [
    "step_time_min_s",
    "step_time_max_s",
    "step_time_std_s",
    "steps",
    "sched_busy_frac",
    "handoff_median_s",
    "handoff_total_s",
]


def ranking(values: Sequence[float]) -> list[int]:
    """Indices of ``values``, fastest first."""
    return sorted(range(len(values)), key=lambda i: values[i])


def resolved_pairs(
    pred: Sequence[float], meas: Sequence[float], std: Sequence[float], n: Sequence[int]
) -> tuple[int, int]:
    """(pairs ordered alike, pairs the measurement resolves) over every pair of policies.
    A measured pair is resolved when its difference exceeds twice the standard error of
    the difference (``std / sqrt(n)`` per policy); closer pairs are ties the testbed's
    noise cannot order, so no prediction can be right or wrong about them."""
    agree = resolved = 0
    for a in range(len(pred)):
        for b in range(a + 1, len(pred)):
            se = ((std[a] ** 2 / max(n[a], 1)) + (std[b] ** 2 / max(n[b], 1))) ** 0.5
            if abs(meas[a] - meas[b]) > 2 * se:
                resolved += 1
                agree += (pred[a] - pred[b]) * (meas[a] - meas[b]) > 0
    return agree, resolved


def mark_rankings(j: pd.DataFrame, pred_col: str, meas_col: str, std_col: str, n_col: str) -> None:
    """Add ``ranking_match`` (the strict order of every policy is the same) and
    ``pairs_agree`` / ``pairs_resolved`` (see :func:`resolved_pairs`) per point, in place."""
    strict, agree, resolved = {}, {}, {}
    for p, g in j.groupby("point"):
        strict[p] = ranking(list(g[pred_col])) == ranking(list(g[meas_col]))
        agree[p], resolved[p] = resolved_pairs(list(g[pred_col]), list(g[meas_col]), list(g[std_col]), list(g[n_col]))
    j["ranking_match"] = j["point"].map(strict)
    j["pairs_agree"] = j["point"].map(agree)
    j["pairs_resolved"] = j["point"].map(resolved)


def _join(pred: pd.DataFrame, meas: pd.DataFrame, time_col: str, std_col: str, n_col: str) -> pd.DataFrame:
    """``pred`` and ``meas`` joined by (point, policy) (shared columns suffixed ``_pred``
    and ``_meas``), ``error_pct`` = (pred - meas) / meas of ``time_col``, and the rankings."""
    j = pred.merge(meas, on=KEYS, suffixes=("_pred", "_meas"))
    p, m = f"{time_col}_pred", f"{time_col}_meas"
    j["error_pct"] = (j[p] - j[m]) / j[m] * 100
    mark_rankings(j, p, m, std_col, n_col)
    return j


def compare(pred: pd.DataFrame, meas: pd.DataFrame) -> pd.DataFrame:
    """Training: predicted and measured results joined by (point, policy); error of the
    step time = (pred - meas) / meas."""
    return _join(
        pred[KEYS + TRAINING_COLUMNS],
        meas[KEYS + TRAINING_COLUMNS + MEASURED_EXTRAS],
        "step_time_s",
        "step_time_std_s",
        "steps",
    )


def compare_inference(pred: pd.DataFrame, meas: pd.DataFrame) -> pd.DataFrame:
    """Inference: predicted (point, policy, ``batch_time_mean_s``, ``batches``) and measured
    results joined by (point, policy); error of the mean batch time."""
    return _join(pred, meas, "batch_time_mean_s", "batch_time_std_s", "batches_meas")


def op_classes(tl: pd.DataFrame, ep_size: int) -> dict[str, float]:
    """Mean seconds per rank spent in each class of op of one step's timeline: forward
    and backward compute, forward and backward all-to-all, allreduce (busy time, overlap
    included), and the step time; plus per all-to-all the mean arrival skew and
    transfer time (the keys of ``lina_sim.results.tables.COMPONENTS``)."""
    d = tl.assign(
        dur=tl["end"] - tl["start"], phase=tl["op"].str.contains(".bwd.") | tl["op"].str.startswith("head.bwd")
    )
    ranks = max(1, d["rank"].nunique())
    pick = {
        "compute fwd": (d["kind"] == "compute") & ~d["phase"] & (d["op"] != "optimizer"),
        "compute bwd+opt": (d["kind"] == "compute") & (d["phase"] | (d["op"] == "optimizer")),
        "a2a fwd": (d["kind"] == "all_to_all") & ~d["phase"],
        "a2a bwd": (d["kind"] == "all_to_all") & d["phase"],
        "allreduce": d["kind"] == "allreduce",
    }
    out = {k: float(d.loc[m, "dur"].sum()) / ranks for k, m in pick.items()}
    out["step"] = float(d["end"].max())
    # Per all-to-all: how long its first rank waited for its last one (arrival skew) and
    # how long it then took (transfer); groups of ep_size consecutive ranks.
    a = d[d["kind"] == "all_to_all"].assign(group=lambda x: x["rank"] // ep_size)
    g = a.groupby(["op", "group"]).agg(first=("start", "min"), last=("start", "max"), end=("end", "max"))
    out["a2a skew"] = float((g["last"] - g["first"]).mean()) if len(g) else 0.0
    out["a2a xfer"] = float((g["end"] - g["last"]).mean()) if len(g) else 0.0
    return out
