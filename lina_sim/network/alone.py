"""A collective's time with nothing else on the network, and the one-off simulated
cluster that measures it.

The training engine needs these to size pipelining chunks and to report the backward
all-to-all's slowdown against the same all-to-all alone; the micro-benchmarks use the
same cluster to time collectives nccl-tests style. Units: seconds, bytes.
"""

from __future__ import annotations

import simpy

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network.collectives import CollectiveAlgos, Collectives
from lina_sim.network.fluid import FluidNetwork


class SimCluster:
    """A fresh simulated cluster: simpy clock, topology, network and collectives."""

    def __init__(self, cluster: ClusterSpec, topology: Topology | None = None):
        self.env = simpy.Environment()
        self.topology = topology or Topology(cluster)
        self.net = FluidNetwork(self.env, self.topology)
        self.coll = Collectives(self.net)

    def start(self, op: str, algo: str, ranks, size: float, tag: str | None = None, proto: str = "auto"):
        """Start ``op`` with ``algo`` (and, for the allreduce, ``proto``); the simpy process."""
        if op == "allreduce":
            return self.coll.allreduce(ranks, size, algo, tag=tag or op, proto=proto)
        if proto != "auto":
            raise ConfigError("proto", f"only the allreduce takes a protocol, not {op}", ["auto"])
        return self.coll.all_to_all(ranks, size, algo, tag=tag or op)


class AloneTimes:
    """Collective times with nothing else on the network (s), cached by size and group."""

    def __init__(
        self, cluster: ClusterSpec, algos: CollectiveAlgos = CollectiveAlgos(), topology: Topology | None = None
    ):
        self.cluster = cluster
        self.algos = algos
        self.topology = topology or Topology(cluster)
        self._cache: dict[tuple, float] = {}

    def __call__(self, op: str, nbytes: float, group: tuple[int, ...]) -> float:
        """``op`` on ``nbytes`` over one ``group`` (s)."""
        return self.concurrent(op, nbytes, (tuple(group),))

    def concurrent(self, op: str, nbytes: float, groups: tuple[tuple[int, ...], ...]) -> float:
        """The time (s) until every group of a communicator has finished ``op`` on
        ``nbytes`` when all of them run at once, as a step runs them (strided groups,
        such as the replicas of each expert, share NICs); nothing else on the network."""
        key = (op, round(nbytes, 3), groups)
        if key not in self._cache:
            sim = SimCluster(self.cluster, self.topology)
            if op == "all_to_all":
                procs = [sim.start(op, self.algos.all_to_all, g, nbytes) for g in groups]
            else:
                procs = [sim.start(op, self.algos.algo, g, nbytes, proto=self.algos.proto) for g in groups]
            sim.env.run()
            self._cache[key] = max(p.value.duration for p in procs)
        return self._cache[key]
