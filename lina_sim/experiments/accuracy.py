"""How well the collective model predicts real NCCL, table by table, uncalibrated and
calibrated on held-out data (``benchmarks/bench_collective_accuracy.py``, the README's
table, ``tests/test_calibration.py``).

The measured tables beside the project (``shared/data/nccl-measured/``) come from six
clusters. Each is simulated on the shipped preset that describes its hardware, then on
a profile calibrated (:mod:`lina_sim.experiments.calibration`) on *some* of that
cluster's tables and scored on the *others*, so a calibrated error is never the fit's
own residual: one- and two-node runs predict ten-node ones, a two-node run predicts an
eight-node one, point-to-point tables predict allreduces. A cluster with a single table
has no held-out split and is reported on its preset only.

Errors are median |predicted / measured - 1| (%) over a table's rows in a size band:
the issue's targets (8 KiB–8 MiB, >= 64 MiB) and the README's classes (<= 1 MiB,
1–64 MiB, >= 64 MiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lina_sim.experiments.calibration import DEFAULT_MAX_ROWS, calibrate, compare_all, fit_tables
from lina_sim.experiments.measured import measured_tables, read_measured
from lina_sim.experiments.microbench import MB
from lina_sim.hardware.spec import ClusterSpec, load_preset

KB = 1 << 10
# (label, lowest size, highest size) in bytes, both inclusive.
BANDS: tuple[tuple[str, float, float], ...] = (
    ("8KB-8MB", 8 * KB, 8 * MB),
    (">=64MB", 64 * MB, float("inf")),
    ("<=1MB", 0, MB),
    ("1-64MB", MB, 64 * MB),
)
# The targets: median |error| at most this (%) per band.
TARGETS = {"8KB-8MB": 25.0, ">=64MB": 10.0}


@dataclass(frozen=True)
class MeasuredCluster:
    """One measured cluster: a name, the preset for its hardware, its table files
    (relative to the measured-data folder), and what a calibration may see: files, or
    single tables of a file as ``file[label]`` (``vidur/x.csv[x[1x8]]``); the rest are
    held out (empty: no calibration)."""

    name: str
    preset: str
    files: tuple[str, ...]
    train: tuple[str, ...] = ()

    def trains_on(self, file: str, label: str) -> bool:
        """Whether the calibration sees table ``label`` of ``file``."""
        return file in self.train or f"{file}[{label}]" in self.train


CLUSTERS: tuple[MeasuredCluster, ...] = (
    MeasuredCluster(
        "H100 8/node, 400G NDR (xxrjun/nccl-tests-cluster)",
        "dgx-h100",
        (
            "nccl-tests/h100-1x8-allreduce-1.txt",
            "nccl-tests/h100-1x8-alltoall-1.txt",
            "nccl-tests/h100-1x8-sendrecv-1.txt",
            "nccl-tests/h100-2x8-alltoall-1.txt",
            "nccl-tests/h100-2x8-sendrecv-1.txt",
            "nccl-tests/h100-10x1-allreduce-1.txt",
        ),
        train=(
            "nccl-tests/h100-1x8-allreduce-1.txt",
            "nccl-tests/h100-1x8-alltoall-1.txt",
            "nccl-tests/h100-1x8-sendrecv-1.txt",
            "nccl-tests/h100-2x8-alltoall-1.txt",
            "nccl-tests/h100-2x8-sendrecv-1.txt",
        ),
    ),
    MeasuredCluster(
        "H100 8/node, IB 400G (NVIDIA/nccl-tests#309)",
        "dgx-h100",
        ("nccl-tests/h100-2x8-allreduce-3.txt", "nccl-tests/h100-8x8-allreduce-1.txt"),
        train=("nccl-tests/h100-2x8-allreduce-3.txt",),
    ),
    # Two ways to hold out: across collectives (send/recv predicts allreduce) and within
    # one (2- and 8-rank allreduces predict the 4-rank one).
    MeasuredCluster(
        "DGX H100 (Vidur): send/recv -> allreduce",
        "dgx-h100",
        ("vidur/h100_dgx_send_recv.csv", "vidur/h100_dgx_all_reduce.csv"),
        train=("vidur/h100_dgx_send_recv.csv",),
    ),
    MeasuredCluster(
        "DGX H100 (Vidur): allreduce 1x2, 1x8 -> 1x4",
        "dgx-h100",
        ("vidur/h100_dgx_all_reduce.csv",),
        train=(
            "vidur/h100_dgx_all_reduce.csv[h100_dgx_all_reduce[1x2]]",
            "vidur/h100_dgx_all_reduce.csv[h100_dgx_all_reduce[1x8]]",
        ),
    ),
    MeasuredCluster(
        "A100 PCIe, NVLink pairs, Azure NC A100 v4 (Vidur): send/recv -> allreduce",
        "a100-pcie-nvlink-pairs",
        ("vidur/a100_pairwise_nvlink_send_recv.csv", "vidur/a100_pairwise_nvlink_all_reduce.csv"),
        train=("vidur/a100_pairwise_nvlink_send_recv.csv",),
    ),
    MeasuredCluster(
        "A100 PCIe, NVLink pairs (Vidur): allreduce 1x2 -> 1x4",
        "a100-pcie-nvlink-pairs",
        ("vidur/a100_pairwise_nvlink_all_reduce.csv",),
        train=("vidur/a100_pairwise_nvlink_all_reduce.csv[a100_pairwise_nvlink_all_reduce[1x2]]",),
    ),
    MeasuredCluster("DGX A100 (Vidur)", "dgx-a100", ("vidur/a100_dgx_send_recv.csv",)),
    MeasuredCluster("A100-SXM4-40GB 8/node (Oracle OCI)", "dgx-a100", ("nccl-tests/a100-1x8-allreduce-1.txt",)),
)


def band_errors(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per table of a :func:`compare_measured` frame: median |error| (%) and rows per
    band of :data:`BANDS` (NaN / 0 where the band is empty)."""
    out = []
    for label, t in comparison.groupby("table", sort=False):
        row: dict = {"table": label, "collective": t["collective"].iloc[0]}
        size = t["size_bytes"]
        for band, lo, hi in BANDS:
            err = t.loc[(size >= lo) & (size <= hi), "error_pct"].abs()
            row[band] = float(err.median()) if len(err) else float("nan")
            row[f"rows {band}"] = len(err)
        out.append(row)
    return pd.DataFrame(out)


def _compare(cluster: ClusterSpec, tables: Sequence[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """Every table simulated on ``cluster`` with its collective's default algorithm (or
    the one its run forced), all rows."""
    return compare_all(cluster, fit_tables(tables, cluster, None, DEFAULT_MAX_ROWS))


def cluster_accuracy(root: Path, mc: MeasuredCluster) -> pd.DataFrame:
    """One cluster's rows: per table, the band errors on the preset (``<band>``); where a
    calibration on the cluster's ``train`` tables held the table out, that profile's
    (``held-out <band>``; ``role`` says train / held out / preset only); and on the
    profile calibrated on every table of the cluster (``profile <band>``: what a user
    who ran all these tables gets from ``--calibrate``, scored on its own data)."""
    preset = load_preset(mc.preset)
    tables = {f: measured_tables([read_measured(root / f)]) for f in mc.files}
    every = [t for f in mc.files for t in tables[f]]
    rows = band_errors(_compare(preset, every))
    role = {label: ("train" if mc.trains_on(f, label) else "held out") for f in mc.files for label, _ in tables[f]}
    rows.insert(0, "cluster", mc.name)
    rows.insert(1, "preset", mc.preset)
    rows.insert(3, "role", [role[t] if mc.train else "preset only" for t in rows["table"]])

    def add(prefix: str, fitted: ClusterSpec, keep) -> None:
        after = band_errors(_compare(fitted, every)).set_index("table")
        for band, _, _ in BANDS:
            rows[f"{prefix} {band}"] = [after.loc[t, band] if keep(t) else float("nan") for t in rows["table"]]

    if mc.train:
        train = [(label, t) for f in mc.files for label, t in tables[f] if mc.trains_on(f, label)]
        add("held-out", calibrate(preset, train).cluster, lambda t: role[t] == "held out")
    add("profile", calibrate(preset, every).cluster, lambda t: True)
    return rows


def accuracy(root: Path, clusters: Sequence[MeasuredCluster] = CLUSTERS) -> pd.DataFrame:
    """:func:`cluster_accuracy` for every cluster whose files are under ``root``."""
    present = [mc for mc in clusters if all((root / f).is_file() for f in mc.files)]
    return pd.concat([cluster_accuracy(root, mc) for mc in present], ignore_index=True)


def meets_targets(row: pd.Series) -> bool:
    """Whether a row is within :data:`TARGETS`, on the preset or on the cluster's
    calibrated profile, in every target band that has rows."""

    def ok(band: str, target: float) -> bool:
        best = np.nanmin([row[band], row[f"profile {band}"]])
        return bool(np.isfinite(best) and best <= target)

    return all(not (row[f"rows {band}"] > 0) or ok(band, t) for band, t in TARGETS.items())
