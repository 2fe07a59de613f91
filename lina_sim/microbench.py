"""Collective micro-benchmarks (nccl-tests style) and the contention experiment.

``collective_sweep`` times one collective over a range of sizes, as nccl-tests does:
algbw = size / time, busbw = algbw × (2(n-1)/n for allreduce, (n-1)/n for all-to-all).
``contention`` runs an all-to-all alone, then concurrently with an allreduce on the same
ranks, and reports the all-to-all's slowdown and the links that bounded it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import simpy

from lina_sim.collectives import CollectiveAlgos, CollectiveResult, Collectives, check_algo
from lina_sim.errors import ConfigError
from lina_sim.hardware import ClusterSpec
from lina_sim.network import FluidNetwork
from lina_sim.timeline import Event, Timeline
from lina_sim.topology import Topology

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_size(text: str, field: str = "size") -> int:
    """'64M' → 67108864 bytes (binary units, as nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(field, f"cannot parse size {text!r}", "a non-negative number with an optional unit B, K, M, G, T (e.g. 64M)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def parse_size_range(text: str, field: str = "--sizes") -> list[int]:
    """'1K:1G' → 1K, 2K, 4K, … 1G; 'MIN:MAX:F' multiplies by F; '64M' is one size."""
    parts = str(text).split(":")
    if len(parts) == 1:
        return [parse_size(parts[0], field)]
    if len(parts) not in (2, 3):
        raise ConfigError(field, f"cannot parse {text!r}", "SIZE, MIN:MAX or MIN:MAX:FACTOR")
    lo, hi = parse_size(parts[0], field), parse_size(parts[1], field)
    factor = 2.0
    if len(parts) == 3:
        try:
            factor = float(parts[2])
        except ValueError:
            factor = 0.0
        if factor <= 1:
            raise ConfigError(field, f"factor must be a number > 1, got {parts[2]!r}")
    if lo <= 0 or hi < lo:
        raise ConfigError(field, f"need 0 < MIN <= MAX, got {text!r}")
    sizes, s = [], float(lo)
    while s <= hi * (1 + 1e-12):
        sizes.append(int(s))
        s *= factor
    return sizes


def bus_factor(op: str, n: int) -> float:
    return 2 * (n - 1) / n if op == "allreduce" else (n - 1) / n


class SimCluster:
    """A fresh simulated cluster: simpy clock, topology, network and collectives."""

    def __init__(self, cluster: ClusterSpec, topology: Topology | None = None):
        self.env = simpy.Environment()
        self.topology = topology or Topology(cluster)
        self.net = FluidNetwork(self.env, self.topology)
        self.coll = Collectives(self.net)

    def start(self, op: str, algo: str, ranks, size: float, tag: str | None = None):
        if op == "allreduce":
            return self.coll.allreduce(ranks, size, algo, tag=tag or op)
        return self.coll.all_to_all(ranks, size, algo, tag=tag or op)


class AloneTimes:
    """Collective times with nothing else on the network (s), cached by size and group."""

    def __init__(self, cluster: ClusterSpec, algos: CollectiveAlgos = CollectiveAlgos(),
                 topology: Topology | None = None):
        self.cluster = cluster
        self.algos = algos
        self.topology = topology or Topology(cluster)
        self._cache: dict[tuple, float] = {}

    def __call__(self, op: str, nbytes: float, group: tuple[int, ...]) -> float:
        key = (op, round(nbytes, 3), group)
        if key not in self._cache:
            sim = SimCluster(self.cluster, self.topology)
            algo = self.algos.all_to_all if op == "all_to_all" else self.algos.allreduce
            p = sim.start(op, algo, group, nbytes)
            sim.env.run()
            self._cache[key] = p.value.duration
        return self._cache[key]


def record(timeline: Timeline, res: CollectiveResult, name: str) -> None:
    """One event per rank of the communicator; bytes are what each rank sends."""
    kind = res.op
    timeline.extend(Event(int(r), kind, name, kind, res.start, res.end, bytes=res.bytes_per_rank) for r in res.ranks)


def collective_sweep(cluster: ClusterSpec, op: str, algo: str, sizes: list[int],
                     ranks=None, timeline: Timeline | None = None) -> pd.DataFrame:
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
            rows.append({"size": size, "count": size // 4, "type": "float", "time_us": t * 1e6,
                         "algbw_GBps": algbw / 1e9, "busbw_GBps": algbw * bus_factor(op, n) / 1e9})
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


def contention(cluster: ClusterSpec, a2a_bytes: float, ar_bytes: float, a2a_algo: str = "direct",
               ar_algo: str = "ring", ranks=None) -> ContentionResult:
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
