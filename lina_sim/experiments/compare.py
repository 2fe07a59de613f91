"""``lina-sim compare``: result tables side by side.

Sweeps (Parquet), ``lina-sim run`` and real ``lina-run`` measurements (CSV) share their
columns, so they align on their common key columns (model, experts, GPUs, policy and any
swept field present in all of them). One metric is compared: a column per table, and the
ratio of each to the first table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lina_sim.errors import ConfigError
from lina_sim.results.tables import format_side_by_side

METRICS = ("step_time_s", "latency_p95_s", "latency_p50_s")
KEY_CANDIDATES = ("model", "experts", "gpus", "nodes", "cluster", "policy")


@dataclass
class Table:
    """One input table and the label its column gets."""

    label: str
    path: Path
    frame: pd.DataFrame


def read_table(spec: str) -> Table:
    """``PATH`` or ``LABEL=PATH`` of a .csv or .parquet result table; only ok rows."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    p = Path(path)
    if not p.exists():
        raise ConfigError("RESULTS", f"file not found: {p}")
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
    elif p.suffix == ".csv":
        df = pd.read_csv(p)
    else:
        raise ConfigError("RESULTS", f"{p}: unknown table format {p.suffix!r}", [".csv", ".parquet"])
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    if "policy" not in df.columns:
        raise ConfigError("RESULTS", f"{p}: not a result table (no policy column)")
    return Table(label or (p.stem if p.stem not in ("results", "sweep") else p.parent.name), p, df)


def _unique_labels(tables: list[Table]) -> None:
    seen: dict[str, int] = {}
    for t in tables:
        n = seen.get(t.label, 0)
        seen[t.label] = n + 1
        if n:
            t.label = f"{t.label}#{n + 1}"


def choose_metric(tables: Sequence[Table], metric: str | None) -> str:
    if metric:
        missing = [t.label for t in tables if metric not in t.frame.columns]
        if missing:
            raise ConfigError(
                "--metric",
                f"column {metric!r} missing from {', '.join(missing)}",
                sorted(set.intersection(*(set(t.frame.columns) for t in tables))),
            )
        return metric
    for m in METRICS:
        if all(m in t.frame.columns for t in tables):
            return m
    raise ConfigError("--metric", "no common metric column; name one", METRICS)


def choose_key(tables: Sequence[Table], key: str | None) -> list[str]:
    common = set.intersection(*(set(t.frame.columns) for t in tables))
    if key:
        cols = [c.strip() for c in key.split(",") if c.strip()]
        missing = [c for c in cols if c not in common]
        if missing:
            raise ConfigError("--key", f"not in every table: {missing}", sorted(common))
        return cols
    swept = sorted(c for c in common if "." in c or "[" in c)  # swept fields keep their path as name
    cols = [c for c in (*KEY_CANDIDATES, *swept) if c in common]
    rows = pd.concat([t.frame[cols] for t in tables]).map(str)  # str(None) = "None", kept as a value
    kept: list[str] = []
    for c in cols:
        if c != "policy" and rows[c].nunique() <= 1:
            continue  # the same everywhere: says nothing
        if any(_same_partition(rows, c, k) for k in kept):
            continue  # e.g. model.preset beside model, cluster.nodes beside nodes
        kept.append(c)
    return kept


def _same_partition(rows: pd.DataFrame, a: str, b: str) -> bool:
    """True if columns ``a`` and ``b`` determine each other (a one-to-one relabelling)."""
    return bool(rows.groupby(a)[b].nunique().max() == 1 and rows.groupby(b)[a].nunique().max() == 1)


def side_by_side(tables: Sequence[Table], metric: str, key: list[str]) -> pd.DataFrame:
    """One row per key, one ``metric`` column per table, and ratios to the first table.
    Rows of one table sharing a key are averaged."""
    merged = None
    for t in tables:
        col = t.frame.groupby(key, sort=False, dropna=False)[metric].mean().rename(t.label).reset_index()
        merged = col if merged is None else merged.merge(col, on=key, how="outer", sort=False)
    first = tables[0].label
    for t in tables[1:]:
        merged[f"{t.label}/{first}"] = merged[t.label] / merged[first]
    return merged


def plot(table: pd.DataFrame, key: list[str], labels: list[str], metric: str, path: Path, max_bars: int = 40) -> Path:
    """Grouped bars (one group per key, one bar per table) when they fit; otherwise a
    parity plot of every table against the first, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from plots.training import save_figure

    scale, unit = (1e3, " (ms)") if metric.endswith("_s") else (1.0, "")
    name = metric.removesuffix("_s") + unit
    if len(table) * len(labels) <= max_bars or len(labels) == 1:
        names = [" / ".join(str(v) for v in row) for row in table[key].itertuples(index=False)]
        x = np.arange(len(table))
        w = 0.8 / len(labels)
        fig, ax = plt.subplots(figsize=(min(16, max(6, 0.3 * len(table) * len(labels) + 2)), 3.8))
        for i, label in enumerate(labels):
            ax.bar(x + (i - (len(labels) - 1) / 2) * w, table[label] * scale, w, label=label)
        ax.set_xticks(x, names, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(name)
        ax.set_title(f"{metric} by {' / '.join(key)}")
    else:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ref = table[labels[0]] * scale
        for label in labels[1:]:
            ax.scatter(ref, table[label] * scale, s=14, label=label)
        lo, hi = np.nanmin(ref), np.nanmax(ref)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"{labels[0]}: {name}")
        ax.set_ylabel(name)
        ax.set_title(f"{metric}: {len(table)} rows matched on {' / '.join(key)}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def compare_files(
    specs: Sequence[str], metric: str | None = None, key: str | None = None, out: str | None = None
) -> int:
    from lina_sim.results.files import atomic_write_text

    tables = [read_table(s) for s in specs]
    _unique_labels(tables)
    metric = choose_metric(tables, metric)
    cols = choose_key(tables, key)
    table = side_by_side(tables, metric, cols)
    print(format_side_by_side(table, metric, [(t.label, t.path) for t in tables]))
    if out:
        stem = Path(out)
        csv = atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
        png = plot(table, cols, [t.label for t in tables], metric, stem.with_suffix(".png"))
        print(f"# wrote {csv} and {png}")
    return 0
