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
- only when oversubscribed: ``uplink[node]`` / ``downlink[node]`` into the fabric core;
- only with a leaf/spine fabric (``nodes_per_leaf`` > 0): ``leaf_up[unit.rail]`` /
  ``leaf_down[unit.rail]``: the leaf switch of NIC rail ``rail`` in scalable unit
  ``unit`` (``nodes_per_leaf`` consecutive nodes), to and from the spines. A flow
  between two NICs of one leaf crosses neither; any other inter-node flow crosses its
  source leaf's uplink and its destination leaf's downlink, each one more switch hop.
  The tiers above the spines are taken as non-blocking and without extra latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec

MAX_HOPS = 7  # longest path: pcie, nic_tx, uplink, downlink, nic_rx, pcie (+1 spare)
LEAF_HOPS = 2  # a leaf/spine fabric adds leaf_up, leaf_down to a path across leaves


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


@dataclass(frozen=True)
class PairClass:
    """The flows of one path class among every ordered pair of ranks inside each block of
    a partition (:meth:`Topology.block_pairs`), counted without listing the pairs.

    ``hops``: links each flow crosses; ``kind``: the class as NCCL names it (``nvlink``,
    ``pcie``, ``nic``); ``links`` (sorted) and ``mult``: the distinct links crossed and
    how many of the class's flows cross each; ``per_src[i]``: flows the i-th given rank
    sends in this class; ``latency``: one flow's path latency (s); ``n_flows``: all of
    them."""

    hops: int
    kind: str
    links: np.ndarray
    mult: np.ndarray
    per_src: np.ndarray
    latency: float

    @property
    def n_flows(self) -> int:
        return int(self.per_src.sum())


def _cell_sizes(label: np.ndarray) -> np.ndarray:
    """For each entry, how many entries share its label."""
    _, inv, count = np.unique(label, return_inverse=True, return_counts=True)
    return count[inv.ravel()]


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
        self.leaves = c.nodes_per_leaf > 0
        if self.leaves:
            units = -(-c.nodes // c.nodes_per_leaf)
            up = c.nodes_per_leaf * nic.effective_bandwidth / c.leaf_oversubscription
            name = lambda i: f"[unit{i // k}.rail{i % k}]"  # noqa: E731
            lat = c.switch_latency
            self._leaf_up = block("leaf", units * k, up, lat, lambda i: "leaf_up" + name(i))
            self._leaf_down = block("leaf", units * k, up, lat, lambda i: "leaf_down" + name(i))
        self.max_hops = MAX_HOPS + (LEAF_HOPS if self.leaves else 0)
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

    def leaf_of(self, ranks) -> np.ndarray:
        """Index of the leaf switch (unit * nics_per_node + rail) of each rank's NIC;
        only with a leaf/spine fabric."""
        r = np.asarray(ranks, dtype=np.int64)
        k = self.cluster.nics_per_node
        return (self.node_of(r) // self.cluster.nodes_per_leaf) * k + self._nic_of_gpu[self.local_of(r)]

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
        [flows, max_hops] padded with -1. A flow from a rank to itself crosses nothing."""
        src = np.asarray(src, dtype=np.int64).ravel()
        dst = np.asarray(dst, dtype=np.int64).ravel()
        out = np.full((src.size, self.max_hops), -1, dtype=np.int64)
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
            if self.leaves:
                ls, ld = self.leaf_of(s), self.leaf_of(d)
                across = ls != ld
                col = 6 if self.oversubscribed else 4
                rows = np.flatnonzero(inter)[across]
                out[rows, col] = self._leaf_up + ls[across]
                out[rows, col + 1] = self._leaf_down + ld[across]
        return out

    def block_pairs(self, ranks, block) -> list[PairClass]:
        """The path classes of every ordered pair ``(s, d)``, ``s != d``, of ranks in the
        same block (``block[i]`` labels ``ranks[i]``; ranks distinct), fewest hops first,
        with the same links and multiplicities as :meth:`paths` of all those pairs would
        give, in O(ranks + links) time and memory rather than O(pairs): each rank's
        peers are only counted, per node (same node: the intra-node fabric; other
        nodes: PCIe, NIC and, oversubscribed, the node's uplinks)."""
        r = np.asarray(ranks, dtype=np.int64).ravel()
        b = np.unique(np.asarray(block).ravel(), return_inverse=True)[1].ravel()
        g = self.gpus_per_node
        node = r // g
        _, cell, cell_size = np.unique(b * self.nodes + node, return_inverse=True, return_counts=True)
        same = cell_size[cell.ravel()] - 1  # peers on the rank's own node, in its block
        other = np.bincount(b)[b] - 1 - same  # peers on other nodes
        n_links = len(self.links)
        classes: list[PairClass] = []

        def add(kind: str, per_src: np.ndarray, link_ids: list[np.ndarray], counts: list[np.ndarray], tier="") -> None:
            if not per_src.any():
                return
            mult = np.bincount(np.concatenate(link_ids), np.concatenate(counts).astype(np.float64), n_links)
            links = np.flatnonzero(mult)
            # One real pair of the class: its path gives the hop count and latency, which
            # every pair of the class shares (a link block has one latency).
            s = int(np.flatnonzero(per_src)[0])
            d = self._peer(r, b, node, s, kind, tier)
            path = self.paths([r[s]], [r[d]])
            lat = float(self.latency_of_paths(path)[0])  # summed as for every flow's path
            hops = int((path >= 0).sum())
            classes.append(PairClass(hops, kind, links, mult[links], per_src.astype(np.int64), lat))

        fabric = self.cluster.intra_node
        if fabric == "nvswitch":
            add("nvlink", same, [self._nvl_tx + r, self._nvl_rx + r], [same, same])
        elif fabric == "nvlink-pairs":
            lookup = np.full(self.world_size, -1, dtype=np.int64)
            lookup[r] = b
            bridged = (lookup[r ^ 1] == b).astype(np.int64)
            add("nvlink", bridged, [self._nvl_bridge + r], [bridged])
            rest = same - bridged
            add("pcie", rest, [self._pcie_up + r, self._pcie_down + r], [rest, rest])
        else:
            src, dst = self._cell_pairs(r, cell.ravel())
            add("nvlink", same, [self._nvl_pair + (src // g) * g * g + (src % g) * g + dst % g], [np.ones(src.size)])
        nic = self._nic_tx + self.nic_index(r)
        ids = [self._pcie_up + r, nic, nic - self._nic_tx + self._nic_rx, self._pcie_down + r]
        if self.oversubscribed:
            ids += [self._uplink + node, self._downlink + node]
        if not self.leaves:
            add("nic", other, ids, [other] * len(ids))
        else:
            # Peers on other nodes behind the rank's own leaf, and the rest, across the spines.
            leaf = self.leaf_of(r)
            on_leaf = _cell_sizes(b * (self.nodes * self.cluster.nics_per_node) + leaf)
            on_leaf_here = _cell_sizes(
                (b * self.nodes + node) * self.cluster.nics_per_node + self.nic_index(r) % self.cluster.nics_per_node
            )
            near = on_leaf - on_leaf_here
            far = other - near
            add("nic", near, ids, [near] * len(ids), "leaf")
            add("nic", far, ids + [self._leaf_up + leaf, self._leaf_down + leaf], [far] * (len(ids) + 2), "spine")
        return sorted(classes, key=lambda c: c.hops)

    @staticmethod
    def _cell_pairs(r: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every ordered pair of distinct ranks with the same ``cell`` label (at most a
        node's GPUs each): O(ranks x GPUs per node)."""
        order = np.argsort(cell, kind="stable")
        cs = cell[order]
        start = np.searchsorted(cs, cs, side="left")
        size = np.searchsorted(cs, cs, side="right") - start
        pos = np.arange(cs.size) - start
        src, dst = [], []
        for k in range(1, int(size.max()) if size.size else 1):
            on = k < size
            src.append(r[order[on]])
            dst.append(r[order[start[on] + (pos[on] + k) % size[on]]])
        if not src:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(src), np.concatenate(dst)

    def _peer(self, r: np.ndarray, b: np.ndarray, node: np.ndarray, s: int, kind: str, tier: str = "") -> int:
        """Index of a rank that ``r[s]`` sends to in path class ``kind`` (one exists;
        ``tier``: ``leaf`` or ``spine`` for a NIC class on a leaf/spine fabric)."""
        mates = (b == b[s]) & (np.arange(r.size) != s)
        if kind == "nic":
            mates &= node != node[s]
            if tier:
                same_leaf = self.leaf_of(r) == self.leaf_of(r[s])
                mates &= same_leaf if tier == "leaf" else ~same_leaf
            return int(np.flatnonzero(mates)[0])
        mates &= node == node[s]
        if self.cluster.intra_node == "nvlink-pairs":
            bridged = (r ^ 1) == r[s]
            mates &= bridged if kind == "nvlink" else ~bridged
        return int(np.flatnonzero(mates)[0])

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
