"""Ranks → nodes, the directed links of a cluster, and the path of links between ranks.

Every link is directed and has a capacity in bytes/s (the preset's effective bandwidth)
and a latency in seconds. Paths are computed vectorised for arrays of (src, dst) pairs,
because a 1024-GPU all-to-all has a million of them.

Link layout (``n`` = world size, ``N`` = nodes):

- ``nvswitch`` fabric: ``nvl_tx[r]``, ``nvl_rx[r]``: GPU r's port into / out of the switch;
  ``full-mesh`` fabric: ``nvl[a→b]`` for every ordered pair of GPUs of one node;
  ``nvlink-pairs`` fabric: ``nvl[r→r^1]``: GPU r's NVLink bridge to its partner (local
  GPUs 2k and 2k+1; ``r ^ 1`` is the partner because a node holds an even number of GPUs);
- ``pcie_up[r]`` / ``pcie_down[r]``: GPU r ↔ its NIC (GPUDirect RDMA goes over PCIe) and
  host memory. On ``nvlink-pairs`` a flow between two GPUs of a node that share no
  bridge crosses ``pcie_up[src]`` then ``pcie_down[dst]`` (GPU → PCIe → host → PCIe →
  GPU, NCCL's P2P-over-PCIe or SHM transport). No link stands for the host itself: a
  node's PCIe links together (4 x 32 GB/s on a 4-GPU node) stay below its CPU's memory
  bandwidth (8 channels of DDR4-3200, about 200 GB/s per socket), so the GPUs' own links
  are the bottleneck; inter-socket links are not modelled either;
- ``nic_tx[node, k]`` / ``nic_rx[node, k]``: NIC k of a node, out of / into the node;
- only when oversubscribed: ``uplink[node]`` / ``downlink[node]`` into the fabric core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec

MAX_HOPS = 7  # longest path: pcie, nic_tx, uplink, downlink, nic_rx, pcie (+1 spare)


@dataclass(frozen=True)
class LinkTable:
    """All directed links: ``kind[i]`` (a short label), ``capacity[i]`` in bytes/s,
    ``latency[i]`` in s, and a human name for reports."""

    kind: np.ndarray
    capacity: np.ndarray
    latency: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.capacity)


class Topology:
    """The links of a cluster and the routes between its ranks (GPUs)."""

    def __init__(self, cluster: ClusterSpec):
        self.cluster = cluster.check()
        c = self.cluster
        self.world_size = c.world_size
        self.gpus_per_node = c.gpus_per_node
        self.nodes = c.nodes
        kinds: list[str] = []
        caps: list[float] = []
        lats: list[float] = []
        names: list[str] = []

        def block(kind: str, count: int, cap: float, lat: float, namefmt) -> int:
            first = len(caps)
            kinds.extend([kind] * count)
            caps.extend([cap] * count)
            lats.extend([lat] * count)
            names.extend(namefmt(i) for i in range(count))
            return first

        n, g = self.world_size, self.gpus_per_node
        nvl = c.nvlink
        if c.intra_node == "nvswitch":
            self._nvl_tx = block("nvlink", n, nvl.effective_bandwidth, nvl.latency / 2, lambda i: f"nvl_tx[{i}]")
            self._nvl_rx = block("nvlink", n, nvl.effective_bandwidth, nvl.latency / 2, lambda i: f"nvl_rx[{i}]")
        elif c.intra_node == "nvlink-pairs":
            # One bridge link per GPU towards its partner: rank r's is _nvl_bridge + r.
            self._nvl_bridge = block("nvlink", n, nvl.effective_bandwidth, nvl.latency, lambda i: f"nvl[{i}->{i ^ 1}]")
        else:
            # One link per ordered pair (a, b) of local GPUs, a != b, indexed a*g + b.
            self._nvl_pair = block(
                "nvlink",
                c.nodes * g * g,
                nvl.effective_bandwidth,
                nvl.latency,
                lambda i: f"nvl[{(i // (g * g)) * g + (i % (g * g)) // g}->{(i // (g * g)) * g + i % g}]",
            )
        p = c.pcie
        self._pcie_up = block("pcie", n, p.effective_bandwidth, p.latency, lambda i: f"pcie_up[{i}]")
        self._pcie_down = block("pcie", n, p.effective_bandwidth, p.latency, lambda i: f"pcie_down[{i}]")
        k = c.nics_per_node
        nic = c.nic
        self._nic_tx = block(
            "nic", c.nodes * k, nic.effective_bandwidth, nic.latency, lambda i: f"nic_tx[node{i // k}.{i % k}]"
        )
        self._nic_rx = block(
            "nic",
            c.nodes * k,
            nic.effective_bandwidth,
            nic.latency + c.switch_latency,
            lambda i: f"nic_rx[node{i // k}.{i % k}]",
        )
        self.oversubscribed = c.oversubscription > 1.0
        if self.oversubscribed:
            up = k * nic.effective_bandwidth / c.oversubscription
            self._uplink = block("uplink", c.nodes, up, 0.0, lambda i: f"uplink[node{i}]")
            self._downlink = block("uplink", c.nodes, up, 0.0, lambda i: f"downlink[node{i}]")
        self.links = LinkTable(
            kind=np.array(kinds),
            capacity=np.array(caps, dtype=np.float64),
            latency=np.array(lats, dtype=np.float64),
            names=names,
        )
        self._nic_of_gpu = np.asarray(c.nic_of_gpu, dtype=np.int64)

    # -- ranks -------------------------------------------------------------------------
    def node_of(self, ranks) -> np.ndarray:
        return np.asarray(ranks, dtype=np.int64) // self.gpus_per_node

    def local_of(self, ranks) -> np.ndarray:
        return np.asarray(ranks, dtype=np.int64) % self.gpus_per_node

    def nic_index(self, ranks) -> np.ndarray:
        """Global NIC index (node * nics_per_node + local NIC) that each rank uses."""
        r = np.asarray(ranks, dtype=np.int64)
        return self.node_of(r) * self.cluster.nics_per_node + self._nic_of_gpu[self.local_of(r)]

    def check_ranks(self, ranks, field: str = "ranks") -> np.ndarray:
        r = np.asarray(ranks, dtype=np.int64).ravel()
        if r.size == 0:
            raise ConfigError(field, "empty communicator")
        if r.min() < 0 or r.max() >= self.world_size:
            raise ConfigError(field, "rank out of range", f"0..{self.world_size - 1}")
        if len(np.unique(r)) != r.size:
            raise ConfigError(field, "duplicate ranks in communicator")
        return r

    # -- paths -------------------------------------------------------------------------
    def paths(self, src, dst) -> np.ndarray:
        """Links crossed by each flow src[i] → dst[i], as an int64 matrix
        [flows, MAX_HOPS] padded with -1. A flow from a rank to itself crosses nothing."""
        src = np.asarray(src, dtype=np.int64).ravel()
        dst = np.asarray(dst, dtype=np.int64).ravel()
        out = np.full((src.size, MAX_HOPS), -1, dtype=np.int64)
        g = self.gpus_per_node
        same_node = (src // g) == (dst // g)
        intra = same_node & (src != dst)
        inter = ~same_node
        if intra.any():
            s, d = src[intra], dst[intra]
            fabric = self.cluster.intra_node
            if fabric == "nvswitch":
                out[intra, 0] = self._nvl_tx + s
                out[intra, 1] = self._nvl_rx + d
            elif fabric == "nvlink-pairs":
                bridged = (s ^ 1) == d
                out[intra, 0] = np.where(bridged, self._nvl_bridge + s, self._pcie_up + s)
                out[intra, 1] = np.where(bridged, -1, self._pcie_down + d)
            else:
                out[intra, 0] = self._nvl_pair + (s // g) * g * g + (s % g) * g + (d % g)
        if inter.any():
            s, d = src[inter], dst[inter]
            out[inter, 0] = self._pcie_up + s
            out[inter, 1] = self._nic_tx + self.nic_index(s)
            out[inter, 2] = self._nic_rx + self.nic_index(d)
            out[inter, 3] = self._pcie_down + d
            if self.oversubscribed:
                out[inter, 4] = self._uplink + s // g
                out[inter, 5] = self._downlink + d // g
        return out

    # -- link classes ------------------------------------------------------------------
    @property
    def intra_all_nvlink(self) -> bool:
        """Whether every pair of GPUs of one node talks over NVLink (``nvswitch``,
        ``full-mesh``); ``False`` on ``nvlink-pairs``, where unbridged pairs cross PCIe."""
        return self.cluster.intra_node != "nvlink-pairs"

    def intra_link_kind(self, src, dst) -> np.ndarray:
        """The link class each flow ``src[i] → dst[i]`` travels on, as NCCL classes a
        path: ``"nvlink"`` (a node's NVSwitch, mesh or bridge), ``"pcie"`` (two GPUs of
        one node through PCIe and the host), ``"nic"`` (the ranks are on different
        nodes) or ``""`` (a rank to itself). Arrays of any shape broadcast together."""
        s, d = np.broadcast_arrays(np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
        g = self.gpus_per_node
        same_node = (s // g) == (d // g)
        over_pcie = ((s ^ 1) != d) if not self.intra_all_nvlink else np.zeros(s.shape, dtype=bool)
        kind = np.where(same_node, np.where(over_pcie, "pcie", "nvlink"), "nic")
        return np.where(s == d, "", kind)

    def path(self, src: int, dst: int) -> list[int]:
        """Links of one flow, for inspection and tests."""
        row = self.paths([src], [dst])[0]
        return [int(x) for x in row if x >= 0]

    def path_latency(self, src, dst) -> np.ndarray:
        """One-way latency (s) of each src[i] → dst[i] path: the sum of its links'."""
        return self.latency_of_paths(self.paths(src, dst))

    def latency_of_paths(self, paths: np.ndarray) -> np.ndarray:
        lat = self.links.latency[np.maximum(paths, 0)]
        lat[paths < 0] = 0.0
        return lat.sum(axis=1)

    def link_name(self, link: int) -> str:
        return self.links.names[link]
