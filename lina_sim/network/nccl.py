"""NCCL 2.30.7's allreduce tuning model on lina-sim's hardware specs, and the flow layouts
that run its choice on the fluid network.

NCCL prices every (algorithm, protocol) pair of a collective as ``latency + bytes /
bandwidth`` and runs the cheapest enabled one (``src/graph/tuning.cc:
ncclTopoTuneModel`` fills the tables once per communicator, ``ncclTopoGetAlgoTime``
prices one call, ``src/enqueue.cc: topoGetAlgoInfo`` picks the minimum). This module
re-implements that model for allreduce, following ``docs/nccl-tuning-model.md`` (NCCL
2.30.7, NVIDIA/nccl @ 5067397c), with three algorithms (NCCL's ``ring``, ``tree`` and
single-node ``nvls``) and three protocols (``LL``, ``LL128``, ``Simple``).

What comes from NCCL's source (constants and formulas, cited where they are used):
base and per-link-class latencies, the ring / tree / NVLS latency counts, the protocol
factors and caps (LL x0.5 capped at ``llMaxBw``; LL128 x0.92 capped per channel; the
tree's 0.92, 1/3.8, 7/9 or 120/128 factors and per-channel caps, and its x0.85 when the
tree graph's search pattern is ``TREE``; NVLS efficiency), the
bus-to-algorithm bandwidth conversion (ring n/(2(n-1)), tree 0.5), the tree correction
by size, the ring "plateau" latency factor, the enable rules (tree allreduce only;
NVLS needs an NVSwitch and Hopper or later and, across nodes, SHARP, which is not
modelled; NVLS only with Simple; LL128 only on NVLink paths), and the choice (lowest
time, ties to the lower algorithm index, then LL < LL128 < Simple).

What is ours (NCCL's input is a topology *graph search*; lina-sim has link specs):

- **Bus bandwidth.** The raw bandwidth of each algorithm is what its flow layout
  (below) gets alone on the simulated topology: the smallest capacity/load over the
  links it crosses. This stands for NCCL's ``graph.nChannels x graph.bw``; for the ring
  it is the same number lina-sim's plain ring achieves. NCCL's per-channel caps need a
  channel count: we take ``ring bus bandwidth / s``, ``s`` being the largest speed of
  NCCL's search array (``search.cc: ncclTopoCompute``, intra array on one node, inter
  array across nodes) that fits one NVLink link (``topo.h: ncclTopoNVLinkBw``) or one
  NIC, an equivalent (real-valued) channel count rather than a search result.
- **Host CPU** (``llMaxBw`` row and ``getNetOverhead``): the preset's ``host_cpu``
  (``amd`` for DGX A100, user guide: 2x AMD EPYC 7742; and Azure NC A100 v4, AMD EPYC
  7V13 on Azure's size page), so a calibrated profile keeps it.
- **Channel reduction for small sizes** (``topoGetAlgoInfo``'s ``nc--``) does not feed
  NCCL's own time estimate, so it is left out here too.
- **Measured corrections.** A cluster's :class:`lina_sim.hardware.spec.NcclSpec` scales
  NCCL's intra-node (base, NVLink, PCI) and network latencies and may replace NVLS's
  efficiency; shipped presets keep NCCL's numbers (scales 1), profiles written by
  ``lina-sim collective --calibrate`` carry fitted ones.
- **NVLSTree, CollNet and PAT** are not modelled (no SHARP in the specs; PAT is not an
  allreduce algorithm).

Flow layouts (bytes each flow carries per payload byte, ``share``):

- ``ring``: lina-sim's ring (:func:`ring_orders`), one flow per rank and channel,
  ``2(n-1)/(C n)`` each: the pipelined ring's 2(n-1) steps as one step.
- ``tree``: NCCL's double binary tree over nodes (``src/graph/trees.cc: ncclGetDtree``:
  tree 1 mirrors tree 0 for an even node count, shifts it by one for an odd one) plus
  each node's chain of G GPUs (``connect.cc: ncclTopoPreset``). Every channel carries
  both trees, half the data each (channels c and c+nCh in ``ncclTopoPostset``), and
  channel c attaches each node's tree links at the c-th GPU (its NIC), as lina-sim's
  ring does. Reduce-up and broadcast-down run concurrently (``all_reduce.h:
  runTreeSplit``), so every tree edge and chain hop is one flow each way in a single
  step, ``1/(2C)`` each. Simplification: all of a node's tree links sit on the chain's
  first GPU (NCCL's ``TREE`` pattern) rather than split over two GPUs
  (``BALANCED_TREE``): each GPU has its own NIC in the presets, so the two layouts load
  NICs alike. Which of the two NCCL's search ends with is modelled
  (:func:`tree_search_pattern`), for its x0.85 on the ``TREE`` pattern (tuning.cc).
  On two nodes the layout's NIC load is half that of three or more (each node is the
  other's only peer), which stands for NCCL using ``bwIntra`` there ("tree can go beyond
  the network bottleneck", nccl-tests#196).
- ``nvls``: every GPU sends its data through its NVSwitch port and gets the reduced
  result back (``all_reduce.h`` NVLS kernel; the switch reduces). Modelled as a flow
  between every ordered GPU pair of the node, ``1/G`` each: each port carries
  ``(G-1)/G`` of the data each way.

Running a pair: one step whose latency is the pair's whole modelled latency, whose
flows carry ``share x S x inflation`` bytes, where ``inflation = raw bandwidth /
the pair's modelled bandwidth``: the protocol's wire overhead (LL sends 8 bytes of flags
per 8 of data), its GPU-side caps and the tree corrections become extra bytes, so a
pair alone takes exactly the modelled time, and under contention it shares links
max-min fairly with everything else in proportion to what it really loads.

Units: seconds, bytes, bytes/s in the API; the NCCL tables keep NCCL's µs and GB/s.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from dataclasses import dataclass, field

import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network.fluid import links_of_paths

# NCCL's order (src/include/plugin/nccl_tuner.h: TREE=0, RING=1, NVLS=4; LL=0, LL128=1,
# SIMPLE=2): ties in the choice go to the earlier entry, as in topoGetAlgoInfo.
ALGOS = ("tree", "ring", "nvls")
PROTOS = ("LL", "LL128", "Simple")

US = 1e-6  # NCCL's latency tables are in µs
GBPS = 1e9  # NCCL's bandwidth tables are in GB/s (1000 bytes/µs)

# src/graph/tuning.cc: ncclTunerConstantsDefaults (2.30.7, tuning.cc:148-212), µs,
# per protocol (LL, LL128, Simple). NVLS's base latency is 0: its latency is "=" hwLat.
BASE_LAT_US: dict[str, tuple[float, float, float]] = {
    "tree": (6.8, 14.0, 8.4),
    "ring": (6.6, 14.0, 8.4),
    "nvls": (0.0, 0.0, 0.0),
}
# Same table, hwLatencies[hw][algo][proto], µs; hw = NVLink, PCI or network.
HW_LAT_US: dict[str, dict[str, tuple[float, float, float]]] = {
    "nvlink": {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4), "nvls": (0.0, 0.0, 25.0)},
    "pci": {"tree": (1.0, 1.9, 4.0), "ring": (1.0, 2.5, 5.7), "nvls": (0.0, 0.0, 0.0)},
    "net": {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0), "nvls": (0.0, 0.0, 18.0)},
}
# Architecture index (nccl_tuner.h compute-capability index): rows of the cap tables.
ARCHS = ("volta", "ampere", "hopper", "blackwell")
# Per-architecture caps (tuning.cc ncclTunerConstantsDefaults), GB/s; columns are the
# scale index min(nNodes-1, 2): one node, two nodes, three or more.
# llMaxBws: row = arch on one node; across nodes row 0 (Intel) or 1 (AMD) (tuning.cc:268-272).
LL_MAX_BW = ((39.0, 39.0, 20.4), (87.7, 22.5, 19.0), (141.0, 45.0, 35.0), (282.0, 90.0, 70.0))
PER_CH_MAX_RING_LL128_BW = ((20.0, 20.0, 20.0), (20.0, 20.0, 20.0), (36.7, 36.7, 36.7), (40.0, 40.0, 40.0))
PER_CH_MAX_TREE_LL128_BW = ((20.0, 20.0, 20.0), (20.0, 20.0, 20.0), (36.7, 36.7, 29.0), (55.6, 31.67, 20.0))
PER_CH_MAX_TREE_BW = ((26.5, 18.5, 10.0), (24.0, 23.6, 17.8), (38.7, 41.4, 36.0), (70.0, 42.8, 24.0))
# tuning.cc:139 nvlsEfficiency, per arch.
NVLS_EFFICIENCY = (0.0, 0.0, 0.85, 0.74)
# tuning.cc:623-627 treeCorrectionFactor[proto][log2i(nBytes >> 6)]; Tree uses indices 0-22.
TREE_CORRECTION: dict[str, tuple[float, ...]] = {
    "LL": (1.0, 1.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.4, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    + (1.0,) * 4,
    "LL128": (1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.8, 0.8, 0.8, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.8, 0.9, 0.9, 0.9)
    + (0.9, 1.0, 1.0, 1.0),
    "Simple": (0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.7, 0.6, 0.6, 0.5, 0.5, 0.5, 0.5, 0.6, 0.7, 0.8, 0.7, 0.7)
    + (0.8, 0.9, 0.9, 0.9),
}
TREE_CORRECTION_SIZES = 23  # ncclTopoGetAlgoTime: only logSize < 23 for Tree
# tuning.cc:228 getNetOverhead, µs: added per ring step across nodes (x3 for Simple).
NET_OVERHEAD_US = {"intel": 1.0, "amd": 2.0}
# ncclTopoGetAlgoTime "plateau effect of ring": Ring/Simple latency factor across nodes.
RING_PLATEAU = (1.9, 1.4)  # (minCompCap < 80, otherwise)
# search.cc:1051-1067 per-channel speeds (GB/s) the graph search tries, per arch
# (Blackwell has its own; Volta and Ampere share the pre-Hopper arrays).
_PRE_HOPPER = ((40, 30, 20, 18, 15, 12, 10, 9, 7, 6, 5, 4, 3), (48, 30, 28, 24, 20, 18, 15, 12, 10, 9, 7, 6, 5, 4, 3))
SEARCH_SPEEDS: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = (  # (intra, inter) per arch
    _PRE_HOPPER,
    _PRE_HOPPER,
    ((60, 50, 40, 30, 24, 20, 15, 12, 11, 6, 3), (48, 45, 42, 40, 30, 24, 22, 20, 17.5, 15, 12, 6, 3)),
    ((90, 80, 70, 60, 50, 45, 40, 30, 24, 20, 19, 18), (96, 86, 80, 48, 45.1, 42, 40, 30, 24, 22, 20, 17.5, 15, 12)),
)
# topo.h ncclTopoNVLinkBw: GB/s per NVLink link (sm80 20, sm90 20.6, sm100 40.1).
NVLINK_LINK_BW = (20.0, 20.0, 20.6, 40.1)
# GPU name -> architecture: NCCL reads the compute capability; our specs carry the name.
_ARCH_OF_NAME = (
    (r"V100", "volta"),
    (r"A100|A800|A30\b|A40\b|A10\b", "ampere"),
    (r"H100|H200|H800|H20\b|GH200", "hopper"),
    (r"B100|B200|B300|GB200|GB300", "blackwell"),
)


def gpu_arch(cluster: ClusterSpec) -> int:
    """NCCL's compute-capability index (0 Volta .. 3 Blackwell) of the cluster's GPU, from
    its name; an unknown name is a ConfigError on ``cluster.gpu.name``."""
    for pattern, arch in _ARCH_OF_NAME:
        if re.search(pattern, cluster.gpu.name, re.IGNORECASE):
            return ARCHS.index(arch)
    raise ConfigError(
        "cluster.gpu.name",
        f"the NCCL model cannot tell the architecture of GPU {cluster.gpu.name!r}",
        [p for p, _ in _ARCH_OF_NAME],
    )


def knows_gpu(cluster: ClusterSpec) -> bool:
    """Whether the model can place the cluster's GPU (:func:`gpu_arch`); a CPU testbed's
    cannot: there the runtime runs gloo, and lina-sim's flat models stand in."""
    try:
        gpu_arch(cluster)
    except ConfigError:
        return False
    return True


def log2i(x: int) -> int:
    """Floor of log2 for x >= 1, -1 for x <= 0 (NCCL's ``log2i``)."""
    return int(x).bit_length() - 1 if x > 0 else -1


@dataclass(frozen=True)
class CommShape:
    """What NCCL's tuning model reads of a communicator and its hardware.

    ``ranks`` over ``nodes``, ``per_node`` = ranks // nodes (NCCL's integer
    nRanks/nNodes, tuning.cc); ``arch`` index into :data:`ARCHS`; ``amd_host``: the
    CPU row of ``llMaxBws`` and the network overhead; ``nvls``: NVLink SHARP usable
    (NVSwitch, Hopper or later, ``transport/nvls.cc: ncclNvlsInit``, one node: across
    nodes NVLS needs IB SHARP, which lina-sim does not model, tuning.cc:440-541);
    ``ll128``: LL128 enabled (tuning.cc:518-536: NVLink inside the node, and across nodes
    a NIC on the GPU's PCIe switch (PXB), or reached through NVLink (PXN) on Hopper+);
    ``intra_scale`` / ``net_scale`` / ``nvls_efficiency``: the cluster's measured
    corrections (:class:`lina_sim.hardware.spec.NcclSpec`; 1, 1 and NCCL's own by default);
    ``pci``: the algorithms whose intra-node hops cross PCIe (unbridged pairs of an
    ``nvlink-pairs`` node): NCCL prices them with its PCI latencies and disables LL128
    there (tuning.cc: ``intraHw = typeIntra == LINK_NVL ? NVLINK : PCI``, LL128 only for
    ``typeIntra <= PATH_NVB``); ``coll_efficiency`` / ``coll_latency_scale``: the
    cluster's measured ring/tree NVLink fraction on one node and collective intra-node
    latency factor (``NcclSpec.collective_*``); ``tree_efficiency`` /
    ``tree_latency_scale``: the fraction of the tree's modelled bandwidth its graph gets
    and a factor on its latency (``NcclSpec.tree_*``); ``overhead_scale``: the factor on
    NCCL's network overhead per ring step (``NcclSpec.net_overhead_scale``); ``min_ctas`` /
    ``max_ctas``: ``NCCL_MIN_CTAS`` / ``NCCL_MAX_CTAS`` as the run set them (``None``:
    unset), which bound ``comm->nChannels`` (:func:`comm_channels`) but not the graph channels the tuning
    model counts in."""

    ranks: int
    nodes: int
    arch: int
    amd_host: bool
    nvls: bool
    ll128: bool
    intra_scale: float = 1.0
    net_scale: float = 1.0
    nvls_efficiency: float | None = None
    simple_scale: float = 1.0
    pci: frozenset[str] = frozenset()
    coll_efficiency: float = 1.0
    coll_latency_scale: float = 1.0
    tree_efficiency: float = 1.0
    tree_latency_scale: float = 1.0
    overhead_scale: float = 1.0
    min_ctas: int | None = None
    max_ctas: int | None = None
    tree_pattern: str = "BALANCED_TREE"

    @property
    def per_node(self) -> int:
        return self.ranks // self.nodes

    @property
    def nominal(self) -> CommShape:
        """The same communicator without the cluster's measured corrections: what NCCL's
        own table, which makes the choice, sees. ``tree_efficiency`` stays: it is the
        tree graph NCCL's search finds on the cluster, not a correction of its constants."""
        return dataclasses.replace(
            self,
            intra_scale=1.0,
            net_scale=1.0,
            nvls_efficiency=None,
            simple_scale=1.0,
            coll_efficiency=1.0,
            coll_latency_scale=1.0,
            tree_latency_scale=1.0,
            overhead_scale=1.0,
        )

    @property
    def scale(self) -> int:
        """The column of NCCL's cap tables: min(nNodes - 1, 2)."""
        return min(self.nodes - 1, 2)

    @classmethod
    def of(cls, cluster: ClusterSpec, ranks: int, nodes: int, pci: frozenset[str] = frozenset()) -> CommShape:
        arch = gpu_arch(cluster)
        own_nic = cluster.nics_per_node >= cluster.gpus_per_node  # each GPU's NIC on its own PCIe switch
        return cls(
            ranks=ranks,
            nodes=nodes,
            arch=arch,
            amd_host=cluster.host_cpu == "amd",
            nvls=cluster.intra_node == "nvswitch" and arch >= ARCHS.index("hopper") and nodes == 1 and ranks > 1,
            ll128=nodes == 1 or own_nic or arch >= ARCHS.index("hopper"),
            intra_scale=cluster.nccl.intra_latency_scale,
            net_scale=cluster.nccl.net_latency_scale,
            nvls_efficiency=cluster.nccl.nvls_efficiency,
            simple_scale=cluster.nccl.simple_latency_scale,
            pci=pci,
            coll_efficiency=cluster.nccl.collective_efficiency,
            coll_latency_scale=cluster.nccl.collective_latency_scale,
            tree_efficiency=cluster.nccl.tree_efficiency,
            tree_latency_scale=cluster.nccl.tree_latency_scale,
            overhead_scale=cluster.nccl.net_overhead_scale,
            min_ctas=cluster.nccl.min_ctas,
            max_ctas=cluster.nccl.max_ctas,
            tree_pattern=tree_search_pattern(arch, nodes, ranks // nodes, own_nic),
        )


def tree_search_pattern(arch: int, nodes: int, per_node: int, own_nic: bool) -> str:
    """The pattern of the tree graph NCCL's search ends with, ``"BALANCED_TREE"`` or
    ``"TREE"`` (``search.cc: ncclTopoCompute``, NCCL 2.30.7).

    ``init.cc`` searches the tree as ``NCCL_TOPO_PATTERN_BALANCED_TREE`` with exactly the
    ring graph's channel count (``minChannels = maxChannels = ringGraph->nChannels``):
    per channel, a NIC feeds one GPU, and that GPU and the *next GPU of the chain* each
    send back to that same NIC at half the speed (``ncclTopoSearchRecGpu``: ``bwInter /=
    2`` on steps 0 and 1; ``ncclTopoSearchCheckNet``: step 1 must use the channel's NIC),
    both within the path type being tried, which starts at the GPUs' closest NIC path
    (``minTypeInter``, PIX/PXB: a NIC on the GPU's own PCIe switch). The search ends
    with the ``TREE`` pattern (one GPU sends and receives the node's tree traffic):

    - with one GPU per node: ``if (ngpus == 1 && pattern != RING) pattern = TREE``;
    - on Hopper and later across nodes (``ccMin >= 90``), when each GPU has its own NIC
      (``own_nic``: no second GPU sits on a GPU's NIC switch, so the balanced step 1
      fails at the first path type): pass 1 then tries "a simpler tree" (``pattern =
      TREE``) before raising the path type, and that search at full speed is complete
      (the ring's channel count: ``time = -1``). Before Hopper there is no such fallback
      and the search raises the path type until the balanced tree fits ("Ampere relies
      on BALANCED_TREE which sometimes needs to come back through SYS or PHB").

    On one node the tree search has no NIC step and keeps ``BALANCED_TREE``. The pattern
    matters to the tuning model only through ``comm->maxTreePattern`` (tuning.cc:
    ``busBw *= .85`` for the tree when it is ``TREE``)."""
    if nodes > 1 and per_node == 1:
        return "TREE"
    if nodes > 1 and arch >= ARCHS.index("hopper") and own_nic:
        return "TREE"
    return "BALANCED_TREE"


@dataclass(frozen=True)
class PairCost:
    """One (algorithm, protocol) pair of the table: ``latency`` (s) and algorithm
    bandwidth ``bandwidth`` (bytes/s of user buffer, before the size-dependent tree
    correction), as ``ncclTopoTuneModel`` fills ``latencies`` / ``bandwidths``."""

    algo: str
    proto: str
    latency: float
    bandwidth: float


@dataclass(frozen=True)
class NcclModel:
    """NCCL's allreduce cost table for one communicator.

    ``raw`` maps each algorithm with a flow layout to the algorithm bandwidth (bytes/s)
    that layout gets alone on the network; ``channels`` is the equivalent graph channel
    count the per-channel caps are multiplied by (``graphs[a]->nChannels``);
    ``comm_channels`` NCCL's ``comm->nChannels`` (:func:`comm_channels`; default twice
    ``channels``), which the ring plateau test and the p2p channels read; ``graph_speed``
    the ring graph's per-channel speed (GB/s, :func:`equivalent_channels`); ``costs`` holds
    the enabled pairs."""

    shape: CommShape
    raw: dict[str, float]
    channels: float
    comm_channels: float = 0.0
    graph_speed: float = 0.0
    costs: dict[tuple[str, str], PairCost] = field(default_factory=dict)
    nominal: NcclModel | None = None  # NCCL's own table, when corrections make this one differ

    @classmethod
    def tune(
        cls,
        shape: CommShape,
        raw: dict[str, float],
        channels: float,
        comm_channels: float | None = None,
        graph_speed: float = 0.0,
    ) -> NcclModel:
        """Fill the table as ``tuning.cc: ncclTopoTuneModel`` does for AllReduce; with
        measured corrections, also NCCL's uncorrected table, which :meth:`choose` ranks by."""
        comm = min(64.0, 2 * channels) if comm_channels is None else comm_channels
        nominal = None if shape.nominal == shape else cls.tune(shape.nominal, raw, channels, comm, graph_speed)
        model = cls(shape, dict(raw), channels, comm, graph_speed, nominal=nominal)
        for algo in ALGOS:
            for proto in PROTOS:
                cost = model._pair(algo, proto)
                if cost is not None:
                    model.costs[(algo, proto)] = cost
        return model

    # -- the table ---------------------------------------------------------------------
    def _enabled(self, algo: str, proto: str) -> bool:
        """tuning.cc:440-541 and enqueue.cc updateCollCostTable, for AllReduce."""
        s = self.shape
        if algo not in self.raw or s.ranks < 2:
            return False
        if algo == "nvls":
            return s.nvls and proto == "Simple"  # NVLS is Simple only
        return proto != "LL128" or (s.ll128 and algo not in s.pci)

    def _pair(self, algo: str, proto: str) -> PairCost | None:
        if not self._enabled(algo, proto):
            return None
        p = PROTOS.index(proto)
        return PairCost(algo, proto, self._latency(algo, p) * US, self._bus_bw(algo, p) * self._bus_to_alg(algo) * GBPS)

    def _bus_to_alg(self, algo: str) -> float:
        """tuning.cc ncclTopoTuneModel: ring and NVLS nRanks/nsteps = n/(2(n-1)); tree 0.5."""
        n = self.shape.ranks
        return 0.5 if algo == "tree" else n / (2 * (n - 1))

    def _bus_bw(self, algo: str, p: int) -> float:
        """Bus bandwidth of a pair in GB/s (tuning.cc:288-383, AllReduce branches)."""
        s = self.shape
        ch = self.channels
        ll_max = LL_MAX_BW[s.arch if s.nodes == 1 else int(s.amd_host)][s.scale]
        # The layout's raw bandwidth, as a bus bandwidth: what NCCL calls nCh x graph bw; on
        # one node over NVLink, the measured fraction of the (p2p-fitted) link the graph reaches.
        bus = self.raw[algo] / self._bus_to_alg(algo) / GBPS
        if s.nodes == 1 and algo != "nvls" and algo not in s.pci:
            bus *= s.coll_efficiency
        if algo == "ring":
            if p == 0:
                return min(ll_max, 0.5 * bus)
            if p == 1:
                return min(0.92 * bus, ch * PER_CH_MAX_RING_LL128_BW[s.arch][s.scale])  # 120/128 wire
            return bus
        if algo == "tree":
            x = min(0.92 * bus, ch * PER_CH_MAX_TREE_BW[s.arch][s.scale])
            if p == 0:
                x = min(x / 3.8, ll_max)
            elif p == 1:
                x = min(x * (7 / 9 if s.nodes == 1 else 120 / 128), ch * PER_CH_MAX_TREE_LL128_BW[s.arch][s.scale])
            # tuning.cc: "if (a == NCCL_ALGO_TREE && comm->maxTreePattern ==
            # NCCL_TOPO_PATTERN_TREE) busBw *= .85", after the protocol caps.
            # The cluster's measured fraction of NCCL's tree estimate (NcclSpec.tree_efficiency).
            return x * (0.85 if s.tree_pattern == "TREE" else 1.0) * s.tree_efficiency
        # NVLS: busBw = nH x bwIntra x nvlsEfficiency x (nH-1)/nH x 2 ("AllReduce pipelines
        # two operations"), nH = heads = GPUs per node; nH x bwIntra is one GPU's switch
        # port, which the layout (a flow per GPU pair, 1/G each) loads with (G-1)/G of S.
        g = s.per_node
        port = self.raw[algo] * (g - 1) / g / GBPS
        eff = NVLS_EFFICIENCY[s.arch] if s.nvls_efficiency is None else s.nvls_efficiency
        return 2 * eff * port * (g - 1) / g

    def _latency(self, algo: str, p: int) -> float:
        """Latency of a pair in µs (tuning.cc:384-435, AllReduce branches); intra-node hops
        at NCCL's NVLink latencies, or its PCI ones for algorithms in ``shape.pci``; with
        the cluster's corrections: every intra-node term (base and hops) scaled by
        ``intra_scale`` and ``coll_latency_scale`` and, for Simple, ``simple_scale``;
        network hops by ``net_scale``."""
        s = self.shape
        local = s.intra_scale * s.coll_latency_scale * (s.simple_scale if p == 2 else 1.0)
        intra = HW_LAT_US["pci" if algo in s.pci else "nvlink"][algo][p] * local
        # A lone GPU per node talks to the network at the tree's latency (2.23+).
        inter = HW_LAT_US["net"]["tree" if s.per_node == 1 else algo][p] * s.net_scale
        if algo == "nvls":
            return intra + (inter if s.nodes > 1 else 0.0)
        lat = BASE_LAT_US[algo][p] * local
        if algo == "tree":
            return (lat + 2 * ((s.per_node - 1) * intra + log2i(s.nodes) * inter)) * s.tree_latency_scale
        n = s.ranks
        overhead = NET_OVERHEAD_US["amd" if s.amd_host else "intel"] * (3 if p == 2 else 1) * s.net_scale
        overhead *= s.overhead_scale
        overhead = overhead if s.nodes > 1 else 0.0
        inter_steps = 2 * (s.nodes - 1)
        return lat + (2 * (n - 1) - inter_steps) * max(intra, overhead) + inter_steps * inter

    # -- one call ----------------------------------------------------------------------
    def cost(self, algo: str, proto: str) -> PairCost:
        if (algo, proto) not in self.costs:
            raise ConfigError("algo", f"NCCL pair {algo}/{proto} is not enabled here", self.pairs())
        return self.costs[(algo, proto)]

    def pairs(self) -> list[str]:
        return [f"{a}/{p}" for a, p in self.costs]

    def latency(self, algo: str, proto: str, nbytes: float) -> float:
        """The pair's latency for one call of ``nbytes`` (s), with the ring plateau factor."""
        s = self.shape
        lat = self.cost(algo, proto).latency
        if algo == "ring" and proto == "Simple" and s.nodes > 1 and nbytes / (self.comm_channels * s.ranks) >= 64:
            lat *= RING_PLATEAU[int(s.arch >= ARCHS.index("ampere"))]
        return lat

    def bandwidth(self, algo: str, proto: str, nbytes: float) -> float:
        """The pair's algorithm bandwidth for ``nbytes`` (bytes/s), with the tree correction."""
        bw = self.cost(algo, proto).bandwidth
        size_index = log2i(int(nbytes) >> 6)
        if algo == "tree" and 0 <= size_index < TREE_CORRECTION_SIZES:
            bw *= TREE_CORRECTION[proto][size_index]
        return bw

    def time(self, algo: str, proto: str, nbytes: float) -> float:
        """``ncclTopoGetAlgoTime`` for one allreduce of ``nbytes`` per rank (s)."""
        if nbytes <= 0 or self.shape.ranks < 2:
            return 0.0
        return self.latency(algo, proto, nbytes) + nbytes / self.bandwidth(algo, proto, nbytes)

    def inflation(self, algo: str, proto: str, nbytes: float) -> float:
        """Bytes the layout moves per byte it would move at full speed, so that alone it
        takes the pair's modelled bandwidth term (>= 1 for every pair NCCL models)."""
        return self.raw[algo] / self.bandwidth(algo, proto, nbytes)

    def choose(self, nbytes: float, algo: str | None = None, proto: str | None = None) -> tuple[str, str]:
        """The fastest enabled pair for ``nbytes`` (enqueue.cc topoGetAlgoInfo: strict
        minimum in algorithm, then protocol order). ``algo`` / ``proto`` restrict the
        candidates like NCCL_ALGO / NCCL_PROTO; a restriction that leaves nothing, or an
        unknown name, is a ConfigError naming the field and what is allowed here."""
        check_names(algo, proto)
        if algo is not None and all(a != algo for a, _ in self.costs):
            algos = sorted({a for a, _ in self.costs}, key=ALGOS.index)
            raise ConfigError("algo", f"NCCL algorithm {algo!r} is not available {self._where()}", algos)
        candidates = [(a, p) for a, p in self.costs if (algo is None or a == algo) and (proto is None or p == proto)]
        if not candidates:
            allowed = [p for a, p in self.costs if algo is None or a == algo]
            raise ConfigError(
                "proto", f"NCCL protocol {proto!r} is not available for {algo or 'any algorithm'}", allowed
            )
        # NCCL ranks by its own table; measured corrections change only how long it takes.
        ranker = self.nominal or self
        return min(candidates, key=lambda pair: ranker.time(*pair, nbytes))  # first of equal times

    def _where(self) -> str:
        s = self.shape
        why = "" if s.nvls else " (nvls needs one node of NVSwitch with NVLink SHARP: Hopper or later)"
        return f"on {s.nodes} node(s) x {s.per_node} {ARCHS[s.arch]} GPU(s){why}"


def check_names(algo: str | None, proto: str | None) -> None:
    """Forced algorithm and protocol names must be NCCL's (ConfigError on ``algo`` / ``proto``)."""
    if algo is not None and algo not in ALGOS:
        raise ConfigError("algo", f"unknown NCCL algorithm {algo!r}", ALGOS)
    if proto is not None and proto not in PROTOS:
        raise ConfigError("proto", f"unknown NCCL protocol {proto!r}", PROTOS)


# -- flow layouts ---------------------------------------------------------------------
@dataclass(frozen=True)
class FlowLayout:
    """The flows of one algorithm: ``src[i] -> dst[i]``, each carrying ``share`` bytes per
    byte of allreduce payload."""

    src: np.ndarray
    dst: np.ndarray
    share: float


def ring_orders(topo: Topology, by_node: list[np.ndarray]) -> list[np.ndarray]:
    """One rank order per ring channel. Channel c rotates each node's local order by c, so
    that each channel leaves a node through a different GPU (and NIC); a full mesh of more
    than two GPUs runs both directions, which use disjoint pair links."""
    if len(by_node) == 1:
        local = by_node[0]
        if topo.cluster.intra_node == "full-mesh" and local.size > 2:
            return [local, local[::-1]]
        return [local]
    nics = min(len(np.unique(topo.nic_index(n))) for n in by_node)
    per_node = min(n.size for n in by_node)
    channels = max(1, min(nics, per_node))
    return [np.concatenate(_rotated(by_node, c)) for c in range(channels)]


def _rotated(by_node: list[np.ndarray], c: int) -> list[np.ndarray]:
    """Each node's local order rotated left by ``c``; one array operation when every
    node holds as many ranks (thousands of nodes at frontier scale)."""
    if len({n.size for n in by_node}) == 1:
        return list(np.roll(np.stack(by_node), -c, axis=1))
    return [np.roll(n, -c) for n in by_node]


def btree_parent(rank: int, n: int) -> int:
    """Parent of ``rank`` in NCCL's binary tree of ``n`` ranks rooted at 0, -1 for the
    root (src/graph/trees.cc: ncclGetBtree)."""
    if rank == 0:
        return -1
    bit = rank & -rank  # lowest set bit
    up = (rank ^ bit) | (bit << 1)
    return rank ^ bit if up >= n else up


def dtree_edges(n: int) -> list[list[tuple[int, int]]]:
    """(child, parent) edges of NCCL's two trees over ``n`` nodes (trees.cc: ncclGetDtree):
    tree 0 is the binary tree, tree 1 its mirror (n even) or its shift by one (n odd)."""
    if n % 2 == 0:
        to1, from1 = (lambda x: n - 1 - x), (lambda p: n - 1 - p)
    else:
        to1, from1 = (lambda x: (x - 1) % n), (lambda p: (p + 1) % n)
    tree0 = [(x, btree_parent(x, n)) for x in range(1, n)]
    tree1 = [(x, from1(btree_parent(to1(x), n))) for x in range(n) if btree_parent(to1(x), n) >= 0]
    return [tree0, tree1]


def _tree_layout(by_node: list[np.ndarray], channels: int) -> FlowLayout:
    """``channels``: the ring's channel count across nodes, 1 on one node."""
    edges = dtree_edges(len(by_node))
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for c in range(channels):
        chains = _rotated(by_node, c)  # position 0 of each node's chain attaches the trees
        up = np.concatenate([x[1:] for x in chains])  # chain hops, reduce direction: towards position 0
        down = np.concatenate([x[:-1] for x in chains])
        attach = np.array([x[0] for x in chains])
        for tree in edges:  # both trees on every channel, each with half the data
            # Reduce up and broadcast down run concurrently, on the chain and on the tree.
            src += [up, down]
            dst += [down, up]
            if tree:
                child, parent = np.array(tree).T
                src += [attach[child], attach[parent]]
                dst += [attach[parent], attach[child]]
    return FlowLayout(np.concatenate(src), np.concatenate(dst), 1.0 / (2 * channels))


def _nvls_layout(by_node: list[np.ndarray]) -> FlowLayout:
    local = by_node[0]
    src, dst = np.meshgrid(local, local, indexing="ij")
    return FlowLayout(src.ravel(), dst.ravel(), 1.0 / local.size)


def ring_layout(orders: list[np.ndarray]) -> FlowLayout:
    """The ring's flows over the channel orders of :func:`ring_orders` (each order holds
    every rank): each rank sends to the next of its order."""
    n = orders[0].size
    return FlowLayout(
        np.concatenate(orders), np.concatenate([np.roll(o, -1) for o in orders]), 2 * (n - 1) / (len(orders) * n)
    )


def layouts(topo: Topology, by_node: list[np.ndarray]) -> dict[str, FlowLayout]:
    """The flow layout of each algorithm on this communicator (its ranks grouped by
    node); NVLS only on one node of an NVSwitch."""
    orders = ring_orders(topo, by_node)
    out = {"ring": ring_layout(orders), "tree": _tree_layout(by_node, len(orders) if len(by_node) > 1 else 1)}
    if len(by_node) == 1 and topo.cluster.intra_node == "nvswitch":
        out["nvls"] = _nvls_layout(by_node)
    return out


def alone_bandwidth(topo: Topology, layout: FlowLayout) -> float:
    """Algorithm bandwidth (payload bytes/s) of a layout alone, when every flow carries
    the same bytes at the same fair-share weight: the most loaded link (flows/capacity)
    sets every flow's pace, so the step lasts share x S x max(load/capacity)."""
    keep = layout.src != layout.dst
    paths = topo.paths(layout.src[keep], layout.dst[keep])
    links, mult = links_of_paths(paths, len(topo.links))
    per_flow = float(np.min(topo.links.capacity[links] / mult))
    return per_flow / layout.share


def search_speed(topo: Topology, shape: CommShape) -> float:
    """The per-channel speed (GB/s) NCCL's ring search settles on, as lina-sim stands in
    for it: the largest speed of the search array (``search.cc: ncclTopoCompute``, intra
    array on one node, inter array across nodes) that fits one NVLink link
    (``topo.h: ncclTopoNVLinkBw``; one PCIe link where the ring crosses PCIe) or one NIC."""
    c = topo.cluster
    intra, inter = SEARCH_SPEEDS[shape.arch]
    if shape.nodes == 1:
        bound = c.pcie.effective_bandwidth / GBPS if "ring" in shape.pci else NVLINK_LINK_BW[shape.arch]
        speeds = intra
    else:
        bound, speeds = min(c.nic.effective_bandwidth, c.pcie.effective_bandwidth) / GBPS, inter
    return next((s for s in speeds if s <= bound), speeds[-1])


def dup_factor(arch: int, speed: float, channels: float) -> int:
    """``search.cc: ncclTopoDupChannels``: the search's channels are doubled (and their
    speed halved) unless the speed is below 25 GB/s, or, on Hopper and later (``ccMin >
    80``), below 50 GB/s with more than 4 channels. NVLS graphs are never duplicated."""
    if speed < 25.0 or (arch >= ARCHS.index("hopper") and speed < 50.0 and channels > 4):
        return 1
    return 2


def equivalent_channels(topo: Topology, shape: CommShape, ring_bus_bw: float) -> tuple[float, float]:
    """Graph channels the per-channel caps are counted in, and their per-channel speed
    (GB/s): ring bus bandwidth over :func:`search_speed`, an equivalent (real-valued)
    count, then duplicated as ``ncclTopoDupChannels`` does (:func:`dup_factor`; at most
    ``MAXCHANNELS / 2`` = 32 graph channels, ``graph->maxChannels``)."""
    speed = search_speed(topo, shape)
    channels = max(1.0, ring_bus_bw / GBPS / speed)
    dup = dup_factor(shape.arch, speed, channels)
    return min(max(channels, 32.0), channels * dup), speed / dup


def comm_channels(shape: CommShape, graph_channels: float, graph_speed: float) -> float:
    """NCCL's ``comm->nChannels`` from the ring graph's channels and per-channel speed
    (``connect.cc: ncclTopoPostset``): doubled (channels c and c + nCh), at most
    ``MAXCHANNELS`` = 64; doubled again on Hopper and later across nodes when the ring's
    ``bwIntra`` exceeds 45 GB/s with fewer than 16 channels ("4 compute channels per
    search channel"); then clamped to ``NCCL_MAX_CTAS`` and raised to ``NCCL_MIN_CTAS``
    (``shape.max_ctas`` / ``shape.min_ctas``, legacy ``NCCL_MAX/MIN_NCHANNELS``; ``init.cc``
    caps both at ``MAXCHANNELS``); ``tree_pattern``: the pattern of NCCL's tree graph,
    ``"BALANCED_TREE"`` or ``"TREE"`` (:func:`tree_search_pattern`)."""
    n = min(64.0, 2 * graph_channels)
    if shape.arch >= ARCHS.index("hopper") and shape.nodes > 1 and graph_speed > 45.0 and n < 16:
        n *= 2
    if shape.max_ctas is not None:
        n = min(n, float(min(shape.max_ctas, 64)))
    if shape.min_ctas is not None:
        n = max(n, float(min(shape.min_ctas, 64)))
    return n


def model_for(topo: Topology, by_node: list[np.ndarray]) -> tuple[NcclModel, dict[str, FlowLayout]]:
    """NCCL's table for a communicator (its ranks grouped by node) and the flow layouts
    it was priced on; worked out once per topology and communicator (the allreduce's
    tables and the p2p model both read it)."""
    cache = _MODELS.setdefault(topo, {})
    key = np.concatenate(by_node).tobytes()
    if key not in cache:
        cache[key] = _model_for(topo, by_node)
    return cache[key]


# Topology -> communicator -> (model, layouts), alive as long as the topology is.
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_for(topo: Topology, by_node: list[np.ndarray]) -> tuple[NcclModel, dict[str, FlowLayout]]:
    lay = layouts(topo, by_node)
    pci = frozenset(a for a, x in lay.items() if (topo.intra_link_kind(x.src, x.dst) == "pcie").any())
    shape = CommShape.of(topo.cluster, sum(x.size for x in by_node), len(by_node), pci)
    if shape.ranks < 2:
        return NcclModel(shape, {}, 1.0), lay
    raw = {a: alone_bandwidth(topo, x) for a, x in lay.items()}
    n = shape.ranks
    channels, speed = equivalent_channels(topo, shape, raw["ring"] * 2 * (n - 1) / n)
    return NcclModel.tune(shape, raw, channels, comm_channels(shape, channels, speed), speed), lay


def predict(
    cluster: ClusterSpec,
    nbytes: float,
    nodes: int | None = None,
    per_node: int | None = None,
    algo: str | None = None,
    proto: str | None = None,
) -> tuple[str, str, float]:
    """NCCL's choice and its modelled time (s) for an allreduce of ``nbytes`` per rank on
    the first ``per_node`` GPUs of the first ``nodes`` nodes (default: the whole cluster),
    optionally restricted like NCCL_ALGO / NCCL_PROTO: (algo, proto, seconds)."""
    nodes = cluster.nodes if nodes is None else nodes
    per_node = cluster.gpus_per_node if per_node is None else per_node
    if not (1 <= nodes and 1 <= per_node <= cluster.gpus_per_node):
        raise ConfigError("ranks", f"{nodes} x {per_node} does not fit {cluster.nodes} x {cluster.gpus_per_node}")
    topo = Topology(cluster if nodes <= cluster.nodes else cluster.with_nodes(nodes))
    g = cluster.gpus_per_node
    model, _ = model_for(topo, [np.arange(k * g, k * g + per_node) for k in range(nodes)])
    a, p = model.choose(nbytes, algo, proto)
    return a, p, model.time(a, p, nbytes)
