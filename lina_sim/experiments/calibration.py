"""Fit a preset's link parameters and NCCL's latency corrections to measured collective
tables, with the simulator as the model (``lina-sim collective --calibrate``).

The fit runs in stages (:func:`stages`), each on the tables that exercise one part of
the cluster: one-node tables move NVLink's effective bandwidth (bandwidth x efficiency,
all that large messages see) and NCCL's intra-node latency scale; one-node allreduces
that NCCL may run as NVLS move the NVLS efficiency; multi-node tables move the NIC's
effective bandwidth and NCCL's network latency scale (:class:`NcclSpec`), the intra-node
part held at its fitted value. Where one-node p2p *and* one-node allreduce tables exist,
the p2p tables alone move NVLink, and the allreduces then move the collectives' own
NVLink fraction and latency factor (``collective`` stage; NCCL prices the two apart).
Bandwidth and efficiency are not separately identifiable from times, so the datasheet
bandwidth is kept and only the efficiency moves, unless the fit needs more than the
datasheet: then the bandwidth is raised and the efficiency is 1. PCIe is never fitted:
on every simulated path it lies in series with the NIC, and no table isolates it. The
links' own latencies are left at the preset's: only lina-sim's pre-NCCL models
(``flat-ring``, ``flat``, ``hierarchical``) read them. Sender-timed send/recv tables
(Vidur's; :mod:`lina_sim.experiments.sender_timed`) add, in the stage of their link, the
sender's FIFO fill rate, the harness's receiver lag (once) and, for a P2P-read NVLink
pair, the per-channel NVLink p2p rate (``NcclSpec.p2p_channel_scale``).

The loss is the mean over tables of the mean squared log-error, log(predicted /
measured)^2, over at most ``max_rows`` sizes per table (evenly spaced rows in size order:
a table's own size grid decides where they fall; Vidur's is piecewise linear), so
that Vidur's thousand-row tables do not outweigh nccl-tests' ten-row ones. A stage's
latency scale is fitted only when its tables hold at least :data:`MIN_IDENTIFYING_ROWS`
sizes of at most :data:`LATENCY_BOUND_BYTES`; else it keeps the preset's. The minimiser
is Nelder–Mead (numpy only), started at the preset and restarted from its best point
while a restart still lowers the loss.
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
from lina_sim.experiments.sender_timed import pair_reads
from lina_sim.hardware.spec import LINKS, ClusterSpec, LinkSpec, NcclSpec
from lina_sim.network.collectives import TIMED_OPS
from lina_sim.network.nccl import NVLS_EFFICIENCY, CommShape, gpu_arch
from lina_sim.results.files import atomic_write_text
from lina_sim.results.tables import ERROR_COLUMN, ROWS_COLUMN

# Rows of at most LATENCY_BOUND_BYTES a stage's tables need before its latency counts as
# identified: up to 8 MiB a multi-node allreduce's latency is still a large part of its
# time (NCCL's ring/Simple latency on 2 x 8 H100 is ~130 µs, 8 MiB at ~90 GB/s ~90 µs).
MIN_IDENTIFYING_ROWS = 3
LATENCY_BOUND_BYTES = 8 * MB
# Sizes above 1 MiB and up to this identify the Simple protocol's latency (its pipeline
# fill): NCCL runs Simple there, and the fill is still a visible part of the time.
SIMPLE_BOUND_BYTES = 64 * MB
DEFAULT_MAX_ROWS = 24
# Nelder-Mead iterations per knob of a stage, per run; at most RESTARTS more runs follow
# the first, each from the best point so far, while they still lower the loss (_fit_stage).
ITERATIONS_PER_KNOB = 20
RESTARTS = 3
# Where a fit of NcclSpec.receiver_lag starts (s): log space needs a start above 0.
LAG_START = 1e-5
# The collectives NCCL's tuning model prices (tuning.cc); the rest of the timed
# operations (sendrecv, all-to-all) are grouped p2p, which it does not.
COLLECTIVES = ("allreduce",)


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
    """At most ``max_rows`` rows of ``table``: sorted by size, evenly spaced indices (the
    smallest and largest are kept), so they follow the table's own size grid."""
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
class Knob:
    """One number a fit moves, in log space: ``name`` as the profile writes it
    (``nvlink.effective_bandwidth``, ``nccl.intra_latency_scale``), how to ``read`` it off
    a cluster and ``write`` it into one, the first simplex step (log units) and an upper
    bound (an efficiency is at most 1)."""

    name: str
    read: Callable[[ClusterSpec], float]
    write: Callable[[ClusterSpec, float], ClusterSpec]
    step: float
    maximum: float = math.inf


def bandwidth_knob(link: str) -> Knob:
    """A link class's effective bandwidth (bytes/s), kept as :func:`with_links` keeps it."""

    def write(c: ClusterSpec, v: float) -> ClusterSpec:
        return with_links(c, {link: (getattr(c, link).latency, v)})

    # First step x0.5: efficiencies are rarely above the datasheet.
    return Knob(f"{link}.effective_bandwidth", lambda c: getattr(c, link).effective_bandwidth, write, math.log(0.5))


def nccl_knob(
    name: str,
    step: float,
    maximum: float = math.inf,
    *,
    unset: Callable[[ClusterSpec], float] | None = None,
    floor: float = 0.0,
) -> Knob:
    """A field of the cluster's :class:`NcclSpec`. An unset (``None``) field starts at
    ``unset(cluster)``, by default NCCL's NVLS efficiency; a start below ``floor`` starts at
    ``floor`` (log space needs a start above 0)."""

    def read(c: ClusterSpec) -> float:
        v = getattr(c.nccl, name)
        if v is None:
            v = unset(c) if unset is not None else NVLS_EFFICIENCY[gpu_arch(c)]
        return max(v, floor)

    def write(c: ClusterSpec, v: float) -> ClusterSpec:
        return dataclasses.replace(c, nccl=dataclasses.replace(c.nccl, **{name: v}))

    return Knob(f"nccl.{name}", read, write, step, maximum)


def fill_knob(name: str, link: str) -> Knob:
    """A sender's FIFO fill rate (``NcclSpec.p2p_read_fill_bandwidth`` or
    ``net_fill_bandwidth``, bytes/s; :mod:`lina_sim.experiments.sender_timed`); unset, it
    starts at ``link``'s effective bandwidth, where the sender's time is the delivery's."""
    # First step x2: a copy into the sender's own memory is faster than the link, if anything.
    return nccl_knob(name, math.log(2.0), unset=lambda c: getattr(c, link).effective_bandwidth)


def _sender_timed(cluster: ClusterSpec, tables: Sequence[FitTable]) -> list[FitTable]:
    """The sender-timed send/recv tables of ``tables`` whose sender fills a FIFO on its own
    side on ``cluster`` (a network pair, or an NVLink pair NCCL runs in P2P-read mode):
    the ones whose fill rate and receiver lag the data identify."""
    reads = pair_reads(cluster)
    return [t for t in tables if t.config.one_way and (t.config.nodes > 1 or reads)]


@dataclass(frozen=True)
class StageFit:
    """One stage of a fit: its name (``nvlink``, ``nvls``, ``nic``), the tables it used,
    whether their small sizes identified a latency, each knob's value before and after,
    the loss before and after, and the loss evaluations it took."""

    stage: str
    tables: tuple[str, ...]
    latency_fitted: bool
    before: dict[str, float]
    after: dict[str, float]
    loss_before: float
    loss_after: float
    evaluations: int


@dataclass(frozen=True)
class Calibration:
    """A fit's result: the preset before and after, each stage's :class:`StageFit`, the
    tables used, and the comparison summaries (all rows) before and after."""

    base: ClusterSpec
    cluster: ClusterSpec
    fits: tuple[StageFit, ...]
    tables: tuple[FitTable, ...]
    algo: str | None
    before: pd.DataFrame
    after: pd.DataFrame


def _fit_stage(cluster: ClusterSpec, stage: str, knobs: Sequence[Knob], tables: Sequence[FitTable], latency: bool):
    """Fit ``knobs`` on ``tables``, everything else held at ``cluster``'s values; the
    result is never worse than the start."""

    def apply(x: np.ndarray) -> ClusterSpec:
        c = cluster
        for k, v in zip(knobs, x):
            c = k.write(c, min(k.maximum, math.exp(v)))
        return c

    def loss(x: np.ndarray) -> float:
        return log_loss(compare_all(apply(x), tables, fit_rows=True))

    start = np.array([math.log(k.read(cluster)) for k in knobs])
    before = loss(start)
    steps = np.array([k.step for k in knobs])
    x, after, evals = nelder_mead(loss, start, steps, iters=ITERATIONS_PER_KNOB * len(knobs))
    # Restarts from the best point with a fresh simplex, while they still gain: Nelder-Mead's
    # simplex can collapse along a valley (a sender-timed table's lag and link rate trade
    # off) and stop short of the minimum; a restart is the standard remedy.
    for _ in range(RESTARTS):
        x2, after2, evals2 = nelder_mead(loss, x, steps, iters=ITERATIONS_PER_KNOB * len(knobs))
        evals += evals2
        if after2 >= after * (1 - 1e-3):
            break
        x, after = x2, after2
    if after > before:
        x, after = start, before
    # Four significant digits: what the profile records, so that the written profile and
    # the calibrated cluster are the same numbers; the data do not justify more.
    values = [float(f"{min(k.maximum, math.exp(v)):.4g}") for k, v in zip(knobs, x)]
    fitted = cluster
    for k, v in zip(knobs, values):
        fitted = k.write(fitted, v)
    fit = StageFit(
        stage,
        tuple(t.config.label for t in tables),
        latency,
        {k.name: k.read(cluster) for k in knobs},
        {k.name: v for k, v in zip(knobs, values)},
        before,
        after,
        evals + 1,
    )
    return fitted, fit


def _nvls_table(cluster: ClusterSpec, t: FitTable) -> bool:
    """A one-node allreduce that NCCL may run as NVLS (Hopper NVSwitch, NCCL choosing)."""
    c = t.config
    if c.collective != "allreduce" or c.nodes != 1 or t.algo not in (None, "auto", "nvls"):
        return False
    return CommShape.of(cluster, c.ranks, 1).nvls


def _rows_in(tables: Sequence[FitTable], low: float, high: float) -> int:
    """Rows the loss sees with ``low < size <= high`` bytes, over ``tables``."""
    return sum(int(((t.fit_rows["size_bytes"] > low) & (t.fit_rows["size_bytes"] <= high)).sum()) for t in tables)


def _tree_rows(cluster: ClusterSpec, tables: Sequence[FitTable]) -> int:
    """Rows the loss sees, over the multi-node allreduce ``tables``, that NCCL runs as a
    tree on ``cluster`` (its own choice, or a forced tree)."""
    mine = [
        t
        for t in tables
        if t.config.collective == "allreduce" and t.config.nodes > 1 and t.algo in (None, "auto", "tree")
    ]
    if not mine:
        return 0
    return int(compare_all(cluster, mine, fit_rows=True)["ran"].str.startswith("tree").sum())


def stages(cluster: ClusterSpec, tables: Sequence[FitTable]) -> list[tuple[str, list[Knob], list[FitTable], bool]]:
    """The fit's stages, in order, each with its knobs, its tables and whether their
    small sizes identify a latency:

    - ``nvlink``: one-node tables (all-to-all, sendrecv, non-NVLS allreduce) move NVLink's
      effective bandwidth and NCCL's intra-node latency scale;
    - where one-node p2p (sendrecv, all-to-all) *and* one-node allreduce tables exist,
      instead: ``nvlink`` on the p2p tables, then ``collective`` on the allreduces, which
      moves the collectives' own NVLink fraction and intra-node latency factor
      (``NcclSpec.collective_efficiency``, ``collective_latency_scale``) and, if NCCL may
      run NVLS there, the NVLS efficiency: NCCL runs p2p on per-peer channels and
      collectives on its graph channels (``paths.cc`` / ``search.cc``), so the two
      disagree on what NVLink delivers (Vidur's DGX H100: p2p 347 GB/s, ring allreduce
      busbw 273 GB/s at 64 MB);
    - ``nvls``: one-node allreduces NCCL may run as NVLS move its efficiency (the
      ``nvlink`` stage uses them only when no other one-node table exists);
    - ``nic``: multi-node tables move the NIC's effective bandwidth and NCCL's network
      latency scale, NVLink held at its fitted value; where at least
      :data:`MIN_IDENTIFYING_ROWS` of their allreduce sizes run as NCCL's tree, also the
      tree's efficiency (``NcclSpec.tree_efficiency``): the ring's rows then fix the NIC and
      the tree's its fraction of NCCL's estimate (8 x 8 H100: 1-8 MiB run as a tree at
      35.6 GB/s of algorithm bandwidth, 2-3x below the model's).

    The Simple protocol's latency scale moves in the first stage whose tables have at
    least :data:`MIN_IDENTIFYING_ROWS` sizes in (1 MiB, :data:`SIMPLE_BOUND_BYTES`].
    """
    one = [t for t in tables if t.config.nodes == 1]
    p2p = [t for t in one if t.config.collective not in COLLECTIVES]
    collectives = [t for t in one if t.config.collective in COLLECTIVES]
    multi = [t for t in tables if t.config.nodes > 1]
    planned: list[tuple[str, list[Knob], list[FitTable], bool]] = []
    if p2p and collectives:
        # NCCL prices p2p and collectives apart (NcclSpec.collective_efficiency): the p2p
        # tables fix the NVLink link, the collectives their own fraction of it.
        planned.append(("nvlink", [bandwidth_knob("nvlink")], p2p, "intra_latency_scale"))
        knobs = [nccl_knob("collective_efficiency", math.log(0.8), 1.0)]
        if any(_nvls_table(cluster, t) for t in collectives):
            knobs.append(nccl_knob("nvls_efficiency", math.log(0.8), 1.0))
        planned.append(("collective", knobs, collectives, "collective_latency_scale"))
        one = []
    nvls = [t for t in one if _nvls_table(cluster, t)]
    plain = [t for t in one if t not in nvls] or one
    if plain:
        planned.append(("nvlink", [bandwidth_knob("nvlink")], plain, "intra_latency_scale"))
    if nvls and plain is not one:
        planned.append(("nvls", [nccl_knob("nvls_efficiency", math.log(0.8), 1.0)], nvls, ""))
    if multi:
        knobs = [bandwidth_knob("nic")]
        # Rings over several node counts separate NCCL's per-step network overhead from
        # its network hop latency (net_latency_scale moves both).
        node_counts = {t.config.nodes for t in multi if t.config.collective == "allreduce"}
        if len(node_counts) > 1 and _rows_in(multi, 0, LATENCY_BOUND_BYTES) >= MIN_IDENTIFYING_ROWS:
            knobs.append(nccl_knob("net_overhead_scale", math.log(0.5)))
        if _tree_rows(cluster, multi) >= MIN_IDENTIFYING_ROWS:
            knobs += [nccl_knob("tree_efficiency", math.log(0.5), 1.0), nccl_knob("tree_latency_scale", math.log(2.0))]
        planned.append(("nic", knobs, multi, "net_latency_scale"))
    out = []
    simple_fitted = lag_fitted = False
    timed = _sender_timed(cluster, tables)
    for stage, knobs, mine, latency_knob in planned:
        # A sender-timed table's fill rate, in the stage that fits its link; the receiver
        # lag (one harness) once, with the first of them.
        mine_timed = [t for t in timed if any(t is m for m in mine)]
        if stage == "nvlink" and mine_timed:
            # Above its FIFO a P2P-read sender waits for the receiver's pull over the pair's
            # channels: those rows identify the per-channel rate, below it the fill rate.
            knobs = knobs + [
                nccl_knob("p2p_channel_scale", math.log(1.5)),
                fill_knob("p2p_read_fill_bandwidth", "nvlink"),
            ]
        if stage == "nic" and mine_timed:
            knobs = knobs + [fill_knob("net_fill_bandwidth", "nic")]
        if mine_timed and not lag_fitted:
            knobs = knobs + [nccl_knob("receiver_lag", math.log(10.0), floor=LAG_START)]
            lag_fitted = True
        identified = bool(latency_knob) and _rows_in(mine, 0, LATENCY_BOUND_BYTES) >= MIN_IDENTIFYING_ROWS
        # First step x3 on a latency scale: NCCL's constants are lower bounds more often.
        knobs = knobs + ([nccl_knob(latency_knob, math.log(3.0))] if identified else [])
        # Simple's pipeline fill shows at medium sizes: fitted once, by the first stage
        # whose tables have enough of them.
        if not simple_fitted and _rows_in(mine, MB, SIMPLE_BOUND_BYTES) >= MIN_IDENTIFYING_ROWS:
            knobs.append(nccl_knob("simple_latency_scale", math.log(3.0)))
            simple_fitted = True
        out.append((stage, knobs, mine, identified))
    return out


def calibrate(
    cluster: ClusterSpec,
    tables: Sequence[tuple[str, pd.DataFrame]],
    algo: str | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Calibration:
    """Fit ``cluster`` to the measured ``tables`` (label, rows) stage by stage
    (:func:`stages`); ``algo`` is used for every table whose collective has it."""
    check_calibration_algo(algo)
    if max_rows < 2:
        raise ConfigError("max_rows", f"must be >= 2, got {max_rows}", "an integer >= 2")
    fts = fit_tables(tables, cluster, algo, max_rows)
    fitted, fits = cluster, []
    for stage, knobs, mine, identified in stages(cluster, fts):
        fitted, fit = _fit_stage(fitted, stage, knobs, mine, identified)
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
    the fitted link classes and ``nccl:`` corrections replaced, and a ``calibration:``
    block recording the sources (files, tables, rows), the algorithm, each stage's values
    beside the preset's, the losses, and the residuals before and after (median |error| %
    per size class)."""
    c = calibration
    out = copy.deepcopy(dict(base))
    out["name"] = f"{c.base.name}-calibrated"
    knobs = {name for fit in c.fits for name in fit.after}
    for link in LINKS:
        if f"{link}.effective_bandwidth" in knobs:
            spec: LinkSpec = getattr(c.cluster, link)
            out[link] = {"bandwidth": spec.bandwidth, "latency": spec.latency, "efficiency": spec.efficiency}
    nccl = {k: v for k, v in dataclasses.asdict(c.cluster.nccl).items() if v is not None}
    if nccl != dataclasses.asdict(NcclSpec()):
        out["nccl"] = nccl
    sources: dict[str, list[dict[str, Any]]] = {}
    for t in c.tables:
        sources.setdefault(t.config.source, []).append(
            {
                "table": t.config.label,
                "collective": t.config.collective,
                "shape": f"{t.config.nodes}x{t.config.ranks_per_node}",
                "rows": len(t.rows),
                "rows_fitted": len(t.fit_rows),
            }
        )
    fitted = {
        fit.stage: {
            "values": fit.after,
            "preset_values": fit.before,
            "latency_fitted": fit.latency_fitted,
            "tables": list(fit.tables),
            "loss_before": fit.loss_before,
            "loss_after": fit.loss_after,
            "evaluations": fit.evaluations,
        }
        for fit in c.fits
    }
    out["source"] = f"{base.get('source', '') or preset}; {', '.join(fitted)} fitted to {', '.join(sources)}"
    out["calibration"] = {
        "preset": preset,
        "algo": c.algo or "default",
        "method": "Nelder-Mead in log space on each stage's knobs (link bandwidth x efficiency, NCCL latency "
        "scales, NVLS, collective and tree efficiencies); loss: mean over tables of mean squared "
        "log(predicted / measured)",
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
