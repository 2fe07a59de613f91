"""Collective micro-benchmarks (nccl-tests style), the contention experiment, and the
comparison against measured collective times.

``collective_sweep`` times one collective over a range of sizes, as nccl-tests does:
algbw = size / time, busbw = algbw × (2(n-1)/n for allreduce, (n-1)/n for all-to-all, 1
for sendrecv), with per size the algorithm and protocol that ran (for the allreduce's
``auto``: NCCL's choice, as NCCL_DEBUG=INFO reports it). ``contention`` runs an
all-to-all alone, then concurrently with an allreduce on the same ranks, and reports
the all-to-all's slowdown and the links that bounded it. ``shape_for`` and
``compare_measured`` simulate a measured table (see :mod:`lina_sim.experiments.measured`)
on a preset shaped as the measurement, and ``comparison_summary`` condenses the errors
per size class.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lina_sim.errors import ConfigError
from lina_sim.experiments.measured import TableConfig
from lina_sim.experiments.sender_timed import sender_times
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network.alone import AloneTimes, SimCluster
from lina_sim.network.collectives import (
    ALGORITHMS,
    NCCL_ALLREDUCE,
    POINT_TO_POINT,
    PROTOCOLS,
    TIMED_OPS,
    CollectiveAlgos,
    CollectiveResult,
    check_algo,
    check_proto,
)
from lina_sim.results.tables import ERROR_COLUMN, ROWS_COLUMN
from lina_sim.results.timeline import Event, Timeline


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw: 2(n-1)/n for allreduce, 1 for sendrecv (each rank's
    bytes cross one link), (n-1)/n for all-to-all."""
    if op == "sendrecv":
        return 1.0
    return 2 * (n - 1) / n if op == "allreduce" else (n - 1) / n


def check_op(op: str, algo: str, proto: str = "auto") -> None:
    """``op``, ``algo`` and ``proto`` name something the micro-benchmarks time; else a
    ConfigError naming ``op``, ``algo`` or ``proto`` with what is allowed. Only the
    allreduce takes a protocol, and only with NCCL's algorithms."""
    if op in POINT_TO_POINT:
        if algo not in POINT_TO_POINT[op]:
            raise ConfigError("algo", f"unknown {op} algorithm {algo!r}", POINT_TO_POINT[op])
    elif op not in ALGORITHMS:
        raise ConfigError("op", f"unknown collective {op!r}", TIMED_OPS)
    else:
        check_algo(op, algo)
    if op == "allreduce":
        check_proto(algo, proto)
    elif proto != "auto":
        raise ConfigError("proto", f"only the allreduce takes a protocol, not {op}", ["auto"])


def _start(sim: SimCluster, op: str, algo: str, ranks, size: float, proto: str = "auto"):
    """Start ``op`` on ``sim``; sendrecv is not a collective SimCluster knows."""
    if op in POINT_TO_POINT:
        return sim.coll.send_recv(ranks, size, tag=op)
    return sim.start(op, algo, ranks, size, proto=proto)


def ran(sim: SimCluster, op: str, algo: str, ranks, size: float, proto: str = "auto") -> tuple[str, str]:
    """What ``op`` runs at ``size``: for the allreduce NCCL's (algorithm, protocol) (see
    :meth:`Collectives.allreduce_choice`), else ``(algo, "-")``. Checks the call as
    starting it would, so a bad name or missing hardware stops before anything runs."""
    if op == "allreduce":
        return sim.coll.allreduce_choice(ranks, size, algo, proto)
    return (algo, "-")


def record(timeline: Timeline, res: CollectiveResult, name: str) -> None:
    """One event per rank of the communicator; bytes are what each rank sends."""
    kind = res.op
    timeline.extend(Event(int(r), kind, name, kind, res.start, res.end, bytes=res.bytes_per_rank) for r in res.ranks)


def collective_sweep(
    cluster: ClusterSpec,
    op: str,
    algo: str,
    sizes: list[int],
    ranks=None,
    timeline: Timeline | None = None,
    proto: str = "auto",
) -> pd.DataFrame:
    """Time ``op`` at each size, back to back on one simulated cluster; ``proto`` is the
    allreduce's protocol. Columns: size, count, type, time_us, algbw_GBps, busbw_GBps, and
    ``algo`` / ``proto``: what ran at that size (:func:`ran`). Every size is checked before
    anything runs."""
    check_op(op, algo, proto)
    sim = SimCluster(cluster)
    ranks = np.arange(cluster.world_size) if ranks is None else sim.topology.check_ranks(ranks)
    n = len(ranks)
    rows: list[dict] = []
    runs = [ran(sim, op, algo, ranks, size, proto) for size in sizes]

    def driver():
        for size, (run_algo, run_proto) in zip(sizes, runs):
            res = yield _start(sim, op, algo, ranks, size, proto)
            t = res.duration
            algbw = size / t if t > 0 else 0.0  # nothing moved: 0, as nccl-tests prints size 0
            rows.append(
                {
                    "size": size,
                    "count": size // 4,
                    "type": "float",
                    "time_us": t * 1e6,
                    "algbw_GBps": algbw / 1e9,
                    "busbw_GBps": algbw * bus_factor(op, n) / 1e9,
                    "algo": run_algo,
                    "proto": run_proto,
                }
            )
            if timeline is not None:
                record(timeline, res, f"{op}[{size}]")

    sim.env.process(driver())
    sim.env.run()
    return pd.DataFrame(rows)


@dataclass
class ContentionResult:
    """All-to-all time alone and with a concurrent allreduce (s), and the links that
    carried the most load (bytes / capacity) in the concurrent run."""

    a2a_alone_s: float
    a2a_shared_s: float
    allreduce_alone_s: float
    allreduce_shared_s: float
    links: pd.DataFrame
    timeline: Timeline

    @property
    def slowdown(self) -> float:
        return self.a2a_shared_s / self.a2a_alone_s if self.a2a_alone_s > 0 else float("nan")


def contention(
    cluster: ClusterSpec,
    a2a_bytes: float,
    ar_bytes: float,
    a2a_algo: str = "direct",
    ar_algo: str = "auto",
    ranks=None,
    ar_proto: str = "auto",
) -> ContentionResult:
    """The all-to-all alone, the allreduce alone, then both launched at t=0 on the same ranks."""
    check_algo("all_to_all", a2a_algo, "a2a_algo")
    check_algo("allreduce", ar_algo, "ar_algo")
    check_proto(ar_algo, ar_proto, "ar_proto")
    topo = Topology(cluster)
    ranks = np.arange(cluster.world_size) if ranks is None else topo.check_ranks(ranks)
    alone = AloneTimes(cluster, CollectiveAlgos(algo=ar_algo, proto=ar_proto, all_to_all=a2a_algo), topo)
    group = tuple(int(r) for r in ranks)
    a2a_alone = alone("all_to_all", a2a_bytes, group)
    ar_alone = alone("allreduce", ar_bytes, group)
    sim = SimCluster(cluster, topo)
    pa = sim.start("all_to_all", a2a_algo, ranks, a2a_bytes)
    pr = sim.start("allreduce", ar_algo, ranks, ar_bytes, proto=ar_proto)
    sim.env.run(until=pa)
    links = sim.net.link_report(makespan=pa.value.duration)
    sim.env.run()
    tl = Timeline()
    record(tl, pa.value, "all_to_all")
    record(tl, pr.value, "allreduce")
    return ContentionResult(a2a_alone, pa.value.duration, ar_alone, pr.value.duration, links, tl)


# -- simulated against measured ------------------------------------------------------------
MB = 1 << 20  # binary megabyte, as nccl-tests' sizes
# Size classes of the comparison summary: (label, lowest, highest) in bytes, both ends
# inclusive (1 MB counts as small, 64 MB as large): the latency-bound, the middle, and the
# bandwidth-bound range.
SIZE_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("<=1MB", 0, MB),
    ("1-64MB", MB + 1, 64 * MB - 1),
    (">=64MB", 64 * MB, float("inf")),
)


def with_gpus_per_node(cluster: ClusterSpec, gpus_per_node: int, field: str = "--gpus-per-node") -> ClusterSpec:
    """``cluster`` with only the first ``gpus_per_node`` GPUs of each node, each keeping
    its own NIC (``nic_of_gpu`` cut to them); the node keeps all its NICs (the unused ones
    idle) and its uplink. More GPUs than the preset's node has are refused: which NIC they
    would use is not known."""
    have = cluster.gpus_per_node
    if not 1 <= gpus_per_node <= have:
        raise ConfigError(field, f"got {gpus_per_node}; a {cluster.name} node has {have} GPUs", f"1..{have}")
    if gpus_per_node == have:
        return cluster
    shaped = dataclasses.replace(cluster, gpus_per_node=gpus_per_node, nic_of_gpu=cluster.nic_of_gpu[:gpus_per_node])
    return shaped.check(cluster.name)


@dataclass(frozen=True)
class MeasuredShape:
    """How one measured table runs on the simulator: the cluster, the communicator (the
    first ``ranks_per_node`` GPUs of each of the first ``nodes`` nodes), op and algorithm."""

    config: TableConfig
    cluster: ClusterSpec
    ranks: np.ndarray
    algo: str
    proto: str = "auto"


# The allreduce protocol shape_for uses when its caller passes none: set with
# allreduce_protocol() around calibration.calibrate, whose signature has no protocol.
_PROTO: contextvars.ContextVar[str] = contextvars.ContextVar("allreduce_protocol", default="auto")


@contextlib.contextmanager
def allreduce_protocol(proto: str | None) -> Iterator[None]:
    """Within the block, :func:`shape_for` simulates allreduce tables with ``proto``
    (``--calibrate --proto``); ``None`` leaves it ``auto``."""
    token = _PROTO.set(proto or "auto")
    try:
        yield
    finally:
        _PROTO.reset(token)


def _env_choice(value: str, names: list[str]) -> str | None:
    """The one name of ``names`` an NCCL_ALGO / NCCL_PROTO value selects (case as NCCL
    reads it: any), or ``None`` for none, a list or an exclusion (``Ring,Tree``, ``^NVLS``),
    which leave NCCL's choice to the model."""
    match = [n for n in names if n.lower() == value.strip().lower()]
    return match[0] if match else None


def shape_for(
    cluster: ClusterSpec,
    config: TableConfig,
    *,
    fixed_nodes: bool = False,
    algo: str | None = None,
    proto: str | None = None,
) -> MeasuredShape:
    """Shape ``cluster`` as the measurement: as many nodes as it had (unless
    ``fixed_nodes``: then ``cluster.nodes`` stays and must be enough), and a communicator
    of the table's ranks per node on each. Using the first GPUs of a larger node is the
    same as ``with_gpus_per_node``: the idle GPUs' links carry nothing. ``proto`` (default:
    :func:`allreduce_protocol`'s, else ``auto``) applies to allreduce tables only. A table
    that does not fit, whose collective the simulator lacks, or whose allreduce the
    algorithm and protocol cannot run on that shape (``nvls`` across nodes) is one
    ConfigError naming its file or the flag. Channel bounds the run set
    (``NCCL_MIN_CTAS`` / ``NCCL_MAX_CTAS``, :class:`TableConfig`) go into the shaped
    cluster's ``nccl`` block, so the run is simulated with NCCL's channel count as it ran."""
    c = config
    if c.collective not in TIMED_OPS:
        raise ConfigError(c.source, f"table {c.label}: collective {c.collective!r} is not simulated", sorted(TIMED_OPS))
    if c.collective == "allreduce":  # what the run forced with NCCL_ALGO / NCCL_PROTO, unless the caller forces
        algo = algo or _env_choice(c.nccl_algo, [a for a in NCCL_ALLREDUCE if NCCL_ALLREDUCE[a] is not None])
        proto = proto or _env_choice(c.nccl_proto, [p for p in PROTOCOLS if p != "auto"])
    algo = algo or TIMED_OPS[c.collective][0]
    if algo not in TIMED_OPS[c.collective]:
        raise ConfigError(
            c.source, f"table {c.label}: {c.collective} has no algorithm {algo!r}", TIMED_OPS[c.collective]
        )
    proto = (proto or _PROTO.get()) if c.collective == "allreduce" else "auto"
    if proto not in PROTOCOLS:
        raise ConfigError("proto", f"unknown allreduce protocol {proto!r}", PROTOCOLS)
    if c.collective == "allreduce":
        check_proto(algo, proto)
    g, n = cluster.gpus_per_node, cluster.nodes
    if c.ranks_per_node > g or (fixed_nodes and c.nodes > n):
        limit = f"{g} GPUs per node" + (f" and {n} node(s)" if fixed_nodes else "")
        fits = f"at most {g} ranks per node" + (f" on at most {n} node(s)" if fixed_nodes else "")
        raise ConfigError(
            c.source,
            f"table {c.label}: {c.ranks} ranks ({c.nodes} node(s) x {c.ranks_per_node}) do not fit "
            f"{cluster.name} with {limit}",
            f"tables of {fits}; --gpus-per-node and --nodes shape the cluster",
        )
    shaped = cluster if fixed_nodes else cluster.with_nodes(c.nodes)
    if c.min_ctas is not None or c.max_ctas is not None:  # the run's NCCL_MIN_CTAS / NCCL_MAX_CTAS
        nccl = dataclasses.replace(shaped.nccl, min_ctas=c.min_ctas, max_ctas=c.max_ctas)
        shaped = dataclasses.replace(shaped, nccl=nccl)
    ranks = (np.arange(c.nodes)[:, None] * g + np.arange(c.ranks_per_node)[None, :]).ravel()
    if c.collective == "allreduce" and (NCCL_ALLREDUCE.get(algo) is not None or proto != "auto"):
        try:  # a forced NCCL algorithm or protocol: does this shape have it?
            ran(SimCluster(shaped), "allreduce", algo, ranks, 1 << 20, proto)
        except ConfigError as e:
            raise ConfigError(e.field, f"table {c.label} ({c.source}): {e.problem}", e.allowed) from None
    return MeasuredShape(c, shaped, ranks, algo, proto)


def compare_measured(shape: MeasuredShape, table: pd.DataFrame) -> pd.DataFrame:
    """The measured rows with the simulator's time for each: ``preset``, ``sim_nodes``,
    ``sim_gpus_per_node``, ``algo``, ``predicted_s`` (s) and ``error_pct`` = (predicted /
    measured - 1) x 100; each size simulated alone, back to back. A sender-timed send/recv
    table (``timed`` ``sender``: Vidur's) is predicted as its sender's kernel
    (:mod:`lina_sim.experiments.sender_timed`)."""
    op = shape.config.collective
    sizes = [int(s) for s in table["size_bytes"]]
    sim = collective_sweep(shape.cluster, op, shape.algo, sizes, ranks=shape.ranks, proto=shape.proto)
    predicted = sim["time_us"].to_numpy() / 1e6
    if shape.config.one_way:

        def deliver(b: np.ndarray) -> np.ndarray:
            run = collective_sweep(shape.cluster, op, shape.algo, [int(x) for x in b], ranks=shape.ranks)
            return run["time_us"].to_numpy() / 1e6

        predicted = sender_times(shape.cluster, shape.ranks, np.asarray(sizes), predicted, deliver)
    out = table.reset_index(drop=True).copy()
    out["preset"] = shape.cluster.name
    out["sim_nodes"] = shape.cluster.nodes
    out["sim_gpus_per_node"] = shape.cluster.gpus_per_node
    out["algo"] = shape.algo
    out["proto"] = shape.proto
    out["ran"] = (sim["algo"] + " " + sim["proto"]).to_numpy()  # what ran per size, as NCCL_DEBUG=INFO
    out["predicted_s"] = predicted
    out["error_pct"] = (out["predicted_s"] / out["time_s"] - 1) * 100
    out["size_class"] = [size_class(s) for s in out["size_bytes"]]
    return out


def size_class(size: float) -> str:
    """The label of the :data:`SIZE_CLASSES` entry that holds ``size`` bytes."""
    return next(label for label, lo, hi in SIZE_CLASSES if lo <= size <= hi)


def comparison_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per table of a :func:`compare_measured` frame (or several concatenated): its
    configuration, rows, and per size class ``median_abs_error_pct:<class>`` (%, NaN when
    the class is empty) and ``rows:<class>``."""
    rows = []
    for label, t in comparison.groupby("table", sort=False):
        first = t.iloc[0]
        row = {
            "table": label,
            "collective": first["collective"],
            "ranks": int(first["ranks"]),
            "ranks_per_node": int(first["ranks_per_node"]),
            "nodes": int(first["nodes"]),
            "preset": first["preset"],
            "algo": first["algo"],
            "proto": first.get("proto", "auto"),
            "rows": len(t),
        }
        for label, _, _ in SIZE_CLASSES:
            err = t.loc[t["size_class"] == label, "error_pct"].abs()
            row[ERROR_COLUMN + label] = float(err.median()) if len(err) else float("nan")
            row[ROWS_COLUMN + label] = len(err)
        rows.append(row)
    return pd.DataFrame(rows)
