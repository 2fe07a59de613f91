"""Fit a preset's link parameters to measured collective tables, with the simulator as
the model (``lina-sim collective --calibrate``).

Each measured table (see :mod:`lina_sim.experiments.measured`) exercises one link class
most: a 1-node table the ``nvlink`` class, a multi-node table the ``nic`` class (its
intra-node part rides on NVLink, which is fitted first). Per class the fit moves two
numbers, in log space: the one-way latency (s) and the effective bandwidth, bandwidth x
efficiency (bytes/s), which is all that large messages see. The two factors of that
product are not separately identifiable from times, so the datasheet bandwidth is kept
and only the efficiency moves, unless the fit needs more than the datasheet: then the
bandwidth is raised and the efficiency is 1. PCIe is never fitted: on every simulated
path it lies in series with the NIC, and no table isolates it.

The loss is the mean over tables of the mean squared log-error, log(predicted /
measured)^2, over at most ``max_rows`` sizes per table (spread evenly in log size), so
that Vidur's thousand-row tables do not outweigh nccl-tests' ten-row ones. A class's
latency is fitted only when its tables hold at least :data:`MIN_IDENTIFYING_ROWS` sizes
of at most 1 MiB (the latency-bound range); else it keeps the preset's value and only
the bandwidth moves. The minimiser is Nelder–Mead (numpy only), started at the preset.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lina_sim.errors import ConfigError
from lina_sim.experiments.measured import TableConfig, table_config
from lina_sim.experiments.microbench import MB, compare_measured, comparison_summary, shape_for
from lina_sim.hardware.spec import ClusterSpec, LinkSpec
from lina_sim.network.collectives import TIMED_OPS
from lina_sim.results.files import atomic_write_text
from lina_sim.results.tables import ERROR_COLUMN, ROWS_COLUMN

# The link classes a fit can move, in the order they are fitted (NIC tables ride on NVLink).
FITTED_LINKS = ("nvlink", "nic")
# Sizes <= 1 MiB a class's tables need before its latency counts as identified.
MIN_IDENTIFYING_ROWS = 3
DEFAULT_MAX_ROWS = 24


def link_of(config: TableConfig) -> str:
    """The link class a measured table exercises most: ``nvlink`` on one node, else ``nic``."""
    return "nvlink" if config.nodes == 1 else "nic"


def algo_for(collective: str, algo: str | None) -> str | None:
    """``algo`` where ``collective`` has it, else ``None`` (the collective's default): one
    ``--algo nccl`` can then calibrate on allreduce and all-to-all tables together."""
    return algo if algo is not None and algo in TIMED_OPS.get(collective, ()) else None


def check_calibration_algo(algo: str | None) -> None:
    """``algo`` names an algorithm of some timed collective; else a ConfigError."""
    every = sorted({a for names in TIMED_OPS.values() for a in names})
    if algo is not None and algo not in every:
        raise ConfigError("--algo", f"unknown algorithm {algo!r}", every)


def subsample(table: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most ``max_rows`` rows of ``table``, spread evenly over its sizes in log size
    order (sorted by size, evenly spaced indices; the smallest and largest are kept)."""
    t = table.sort_values("size_bytes", kind="stable").reset_index(drop=True)
    if len(t) <= max_rows:
        return t
    return t.iloc[np.unique(np.round(np.linspace(0, len(t) - 1, max_rows)).astype(int))].reset_index(drop=True)


@dataclass(frozen=True)
class FitTable:
    """One measured table the fit uses: its configuration, all its rows, the rows the loss
    sees, and the algorithm it is simulated with (``None``: the collective's default)."""

    config: TableConfig
    rows: pd.DataFrame
    fit_rows: pd.DataFrame
    algo: str | None

    @property
    def link(self) -> str:
        return link_of(self.config)


def fit_tables(
    tables: Sequence[tuple[str, pd.DataFrame]], cluster: ClusterSpec, algo: str | None, max_rows: int
) -> list[FitTable]:
    """The measured tables as :class:`FitTable`; each is shaped on ``cluster`` once here,
    so a table that does not fit stops the run (naming its file) before any fitting."""
    out = []
    for label, t in tables:
        config = table_config(label, t)
        a = algo_for(config.collective, algo)
        shape_for(cluster, config, algo=a)
        out.append(FitTable(config, t, subsample(t, max_rows), a))
    return out


def with_links(cluster: ClusterSpec, params: Mapping[str, tuple[float, float]]) -> ClusterSpec:
    """``cluster`` with each named link class at (latency s, effective bandwidth bytes/s):
    the datasheet bandwidth is kept and the efficiency set, unless the effective bandwidth
    exceeds the datasheet; then the bandwidth is raised and the efficiency is 1."""
    links = {}
    for name, (latency, effective) in params.items():
        old: LinkSpec = getattr(cluster, name)
        bandwidth = max(old.bandwidth, effective)
        links[name] = LinkSpec(bandwidth=bandwidth, latency=latency, efficiency=min(1.0, effective / bandwidth))
    return dataclasses.replace(cluster, **links)


def compare_all(cluster: ClusterSpec, tables: Sequence[FitTable], fit_rows: bool = False) -> pd.DataFrame:
    """Every table simulated on ``cluster`` (:func:`compare_measured` rows, concatenated);
    only the rows the loss sees with ``fit_rows``."""
    frames = [
        compare_measured(shape_for(cluster, t.config, algo=t.algo), t.fit_rows if fit_rows else t.rows) for t in tables
    ]
    return pd.concat(frames, ignore_index=True)


def log_loss(comparison: pd.DataFrame) -> float:
    """Mean over tables of the mean squared log(predicted / measured) (dimensionless)."""
    sq = np.log(comparison["predicted_s"] / comparison["time_s"]) ** 2
    return float(sq.groupby(comparison["table"], sort=False).mean().mean())


def nelder_mead(
    f: Callable[[np.ndarray], float], x0: np.ndarray, step: np.ndarray, iters: int = 80, xtol: float = 1e-3
) -> tuple[np.ndarray, float, int]:
    """Minimise ``f`` from ``x0`` with Nelder–Mead (standard coefficients: reflection 1,
    expansion 2, contraction and shrink 1/2), the first simplex ``x0`` plus ``step`` along
    each axis. Stops after ``iters`` iterations or when the simplex spans less than
    ``xtol`` on every axis. Returns (best x, f there, evaluations)."""
    n = len(x0)
    simplex = np.vstack([x0, x0 + np.diag(step)])
    values = np.array([f(x) for x in simplex])
    evals = n + 1
    for _ in range(iters):
        order = np.argsort(values)
        simplex, values = simplex[order], values[order]
        if np.max(np.abs(simplex[1:] - simplex[0])) < xtol:
            break
        centroid = simplex[:-1].mean(axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        evals += 1
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = f(expanded)
            evals += 1
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            evals += 1
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex[1:] = simplex[0] + 0.5 * (simplex[1:] - simplex[0])
                values[1:] = [f(x) for x in simplex[1:]]
                evals += n
    best = int(np.argmin(values))
    return simplex[best], float(values[best]), evals


@dataclass(frozen=True)
class LinkFit:
    """One link class's fit: the tables it used, whether latency was identified, the
    fitted latency (s) and effective bandwidth (bytes/s), the loss before and after, and
    the loss evaluations it took."""

    link: str
    tables: tuple[str, ...]
    latency_fitted: bool
    latency: float
    effective_bandwidth: float
    loss_before: float
    loss_after: float
    evaluations: int


@dataclass(frozen=True)
class Calibration:
    """A fit's result: the preset before and after, each class's :class:`LinkFit`, the
    tables used, and the comparison summaries (all rows) before and after."""

    base: ClusterSpec
    cluster: ClusterSpec
    fits: tuple[LinkFit, ...]
    tables: tuple[FitTable, ...]
    algo: str | None
    before: pd.DataFrame
    after: pd.DataFrame


def _fit_link(cluster: ClusterSpec, link: str, tables: Sequence[FitTable]) -> tuple[ClusterSpec, LinkFit]:
    """Fit one link class on its tables, the other classes held at ``cluster``'s values."""
    spec: LinkSpec = getattr(cluster, link)
    small = sum(int((t.fit_rows["size_bytes"] <= MB).sum()) for t in tables)
    fit_latency = small >= MIN_IDENTIFYING_ROWS
    # Log-parameters: log effective bandwidth, then (if identified) log latency. A preset
    # latency of 0 starts the search at 1 µs, a typical one-hop latency.
    x0 = [math.log(spec.effective_bandwidth)] + ([math.log(spec.latency or 1e-6)] if fit_latency else [])

    def params(x: np.ndarray) -> tuple[float, float]:
        return (math.exp(x[1]) if fit_latency else spec.latency, math.exp(x[0]))

    def loss(x: np.ndarray) -> float:
        return log_loss(compare_all(with_links(cluster, {link: params(x)}), tables, fit_rows=True))

    start = np.array(x0)
    before = loss(start)
    # First steps: bandwidth x0.5 (efficiencies are rarely above the datasheet), latency x3.
    x, after, evals = nelder_mead(loss, start, np.array([math.log(0.5), math.log(3.0)][: len(x0)]))
    if after > before:  # never worse than the preset
        x, after = start, before
    # Four significant digits: what the profile records, so that the written profile and
    # the calibrated cluster are the same numbers; the data do not justify more.
    latency, effective = (float(f"{v:.4g}") for v in params(x))
    fit = LinkFit(
        link, tuple(t.config.label for t in tables), fit_latency, latency, effective, before, after, evals + 1
    )
    return with_links(cluster, {link: (latency, effective)}), fit


def calibrate(
    cluster: ClusterSpec,
    tables: Sequence[tuple[str, pd.DataFrame]],
    algo: str | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Calibration:
    """Fit ``cluster``'s link classes to the measured ``tables`` (label, rows), in
    :data:`FITTED_LINKS` order, each on the tables that exercise it; ``algo`` is used for
    every table whose collective has it."""
    check_calibration_algo(algo)
    if max_rows < 2:
        raise ConfigError("max_rows", f"must be >= 2, got {max_rows}", "an integer >= 2")
    fts = fit_tables(tables, cluster, algo, max_rows)
    fitted, fits = cluster, []
    for link in FITTED_LINKS:
        mine = [t for t in fts if t.link == link]
        if mine:
            fitted, fit = _fit_link(fitted, link, mine)
            fits.append(fit)
    before = comparison_summary(compare_all(cluster, fts))
    after = comparison_summary(compare_all(fitted, fts))
    return Calibration(cluster, fitted, tuple(fits), tuple(fts), algo, before, after)


def _residuals(summary: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per table: rows and median |error| (%) per size class (``None`` when empty)."""
    out = {}
    for _, r in summary.iterrows():
        classes = [c[len(ERROR_COLUMN) :] for c in summary.columns if str(c).startswith(ERROR_COLUMN)]
        out[str(r["table"])] = {
            "algo": str(r["algo"]),
            "median_abs_error_pct": {
                c: (round(float(r[ERROR_COLUMN + c]), 2) if int(r[ROWS_COLUMN + c]) else None) for c in classes
            },
            "rows": {c: int(r[ROWS_COLUMN + c]) for c in classes},
        }
    return out


def profile(calibration: Calibration, base: Mapping[str, Any], preset: str) -> dict[str, Any]:
    """The calibrated profile: the preset's raw mapping ``base`` (named ``preset``) with
    the fitted link classes replaced, and a ``calibration:`` block recording the sources
    (files, tables, rows), the algorithm, the fitted values beside the preset's, the
    losses, and the residuals before and after (median |error| % per size class)."""
    c = calibration
    out = copy.deepcopy(dict(base))
    out["name"] = f"{c.base.name}-calibrated"
    for fit in c.fits:
        spec: LinkSpec = getattr(c.cluster, fit.link)
        out[fit.link] = {"bandwidth": spec.bandwidth, "latency": spec.latency, "efficiency": spec.efficiency}
    sources: dict[str, list[dict[str, Any]]] = {}
    for t in c.tables:
        sources.setdefault(t.config.source, []).append(
            {
                "table": t.config.label,
                "collective": t.config.collective,
                "shape": f"{t.config.nodes}x{t.config.ranks_per_node}",
                "link": t.link,
                "rows": len(t.rows),
                "rows_fitted": len(t.fit_rows),
            }
        )
    fitted = {}
    for fit in c.fits:
        old: LinkSpec = getattr(c.base, fit.link)
        fitted[fit.link] = {
            "latency_s": fit.latency,
            "latency_fitted": fit.latency_fitted,
            "effective_bandwidth_Bps": fit.effective_bandwidth,
            "preset_latency_s": old.latency,
            "preset_effective_bandwidth_Bps": old.effective_bandwidth,
            "tables": list(fit.tables),
            "loss_before": fit.loss_before,
            "loss_after": fit.loss_after,
            "evaluations": fit.evaluations,
        }
    out["source"] = f"{base.get('source', '') or preset}; links {', '.join(fitted)} fitted to {', '.join(sources)}"
    out["calibration"] = {
        "preset": preset,
        "algo": c.algo or "default",
        "method": "Nelder-Mead on log(latency), log(bandwidth x efficiency); loss: mean over tables of "
        "mean squared log(predicted / measured)",
        "sources": [{"file": f, "tables": ts} for f, ts in sources.items()],
        "fitted": fitted,
        "residuals_before": _residuals(c.before),
        "residuals_after": _residuals(c.after),
    }
    return out


def _plain(x: Any) -> Any:
    """``x`` with numpy scalars made Python numbers, so YAML writes plain values."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_profile(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write a profile YAML atomically (readers never see half of it)."""
    header = "# Calibrated by `lina-sim collective --calibrate`; see the calibration: block.\n"
    return atomic_write_text(path, header + yaml.safe_dump(_plain(data), sort_keys=False))
