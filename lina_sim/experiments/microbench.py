"""Collective micro-benchmarks (nccl-tests style) and the contention experiment.

``collective_sweep`` times one collective over a range of sizes, as nccl-tests does:
algbw = size / time, busbw = algbw × (2(n-1)/n for allreduce, (n-1)/n for all-to-all).
``contention`` runs an all-to-all alone, then concurrently with an allreduce on the same
ranks, and reports the all-to-all's slowdown and the links that bounded it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network.alone import AloneTimes, SimCluster
from lina_sim.network.collectives import CollectiveAlgos, CollectiveResult, check_algo
from lina_sim.results.timeline import Event, Timeline


def bus_factor(op: str, n: int) -> float:
    return 2 * (n - 1) / n if op == "allreduce" else (n - 1) / n


def record(timeline: Timeline, res: CollectiveResult, name: str) -> None:
    """One event per rank of the communicator; bytes are what each rank sends."""
    kind = res.op
    timeline.extend(Event(int(r), kind, name, kind, res.start, res.end, bytes=res.bytes_per_rank) for r in res.ranks)


def collective_sweep(
    cluster: ClusterSpec, op: str, algo: str, sizes: list[int], ranks=None, timeline: Timeline | None = None
) -> pd.DataFrame:
    """Time ``op`` at each size, back to back on one simulated cluster."""
    check_algo(op, algo)
    sim = SimCluster(cluster)
    ranks = np.arange(cluster.world_size) if ranks is None else sim.topology.check_ranks(ranks)
    n = len(ranks)
    rows: list[dict] = []

    def driver():
        for size in sizes:
            res = yield sim.start(op, algo, ranks, size)
            t = res.duration
            algbw = size / t if t > 0 else float("inf")
            rows.append(
                {
                    "size": size,
                    "count": size // 4,
                    "type": "float",
                    "time_us": t * 1e6,
                    "algbw_GBps": algbw / 1e9,
                    "busbw_GBps": algbw * bus_factor(op, n) / 1e9,
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
    cluster: ClusterSpec, a2a_bytes: float, ar_bytes: float, a2a_algo: str = "direct", ar_algo: str = "ring", ranks=None
) -> ContentionResult:
    """The all-to-all alone, the allreduce alone, then both launched at t=0 on the same ranks."""
    check_algo("all_to_all", a2a_algo)
    check_algo("allreduce", ar_algo)
    topo = Topology(cluster)
    ranks = np.arange(cluster.world_size) if ranks is None else topo.check_ranks(ranks)
    alone = AloneTimes(cluster, CollectiveAlgos(allreduce=ar_algo, all_to_all=a2a_algo), topo)
    group = tuple(int(r) for r in ranks)
    a2a_alone = alone("all_to_all", a2a_bytes, group)
    ar_alone = alone("allreduce", ar_bytes, group)
    sim = SimCluster(cluster, topo)
    pa = sim.start("all_to_all", a2a_algo, ranks, a2a_bytes)
    pr = sim.start("allreduce", ar_algo, ranks, ar_bytes)
    sim.env.run(until=pa)
    links = sim.net.link_report(makespan=pa.value.duration)
    sim.env.run()
    tl = Timeline()
    record(tl, pa.value, "all_to_all")
    record(tl, pr.value, "allreduce")
    return ContentionResult(a2a_alone, pa.value.duration, ar_alone, pr.value.duration, links, tl)
