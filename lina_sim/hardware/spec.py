"""Hardware specifications: GPUs, links and clusters, loaded from YAML presets.

Units everywhere: bytes, seconds, bytes/s, FLOP/s. A preset is a YAML file in
``lina_sim/config/presets/`` (or any path, such as a profile written by ``lina-run calibrate``);
each number in a shipped preset carries a comment saying where it comes from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lina_sim.config.fields import (
    Field,
    check_declared,
    check_fields,
    check_known,
    check_mapping,
    declare,
    declared,
    load_yaml,
)
from lina_sim.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "config" / "presets"
INTRA_NODE_FABRICS = ("nvswitch", "full-mesh", "nvlink-pairs")
_EFFICIENCY = dict(minimum=0, exclusive_minimum=True, maximum=1)  # a fraction in (0, 1]
_POSITIVE = dict(minimum=0, exclusive_minimum=True)
_UNSET_RATE = dict(allow_none=True, **_POSITIVE)  # bytes/s > 0, or absent: not modelled
PEAK_FLOPS = Field(float, minimum=0, exclusive_minimum=True, help="dense peak of one dtype, FLOP/s")


def _each(entries: Mapping[Any, Any], f: Field, where: str) -> dict[str, Any]:
    """Every value of a mapping with free keys (dtypes, collective kinds) checked by ``f``."""
    return {str(k): f.check(v, f"{where}.{k}") for k, v in entries.items()}


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: peak dense FLOP/s per dtype, HBM bandwidth (bytes/s), memory (bytes)."""

    name: str = declare(Field(str, "gpu", help="the accelerator's name"), keyword=False)
    peak_flops: Mapping[str, float]  # dtype -> FLOP/s, each checked by PEAK_FLOPS
    hbm_bandwidth: float = declare(Field(float, minimum=0, exclusive_minimum=True, help="HBM bandwidth, bytes/s"))
    memory_bytes: float = declare(Field(float, minimum=0, exclusive_minimum=True, help="device memory, bytes"))
    # Streaming multiprocessors: GEMM tiles run in waves of this many (tile and wave
    # quantization, lina_sim.hardware.compute). null: a plain roofline for GEMMs.
    sms: int | None = declare(
        Field(int, None, minimum=1, allow_none=True, help="streaming multiprocessors (datasheet), or null")
    )

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ConfigError("dtype", f"GPU {self.name} has no peak for {dtype!r}", sorted(self.peak_flops))
        return float(self.peak_flops[dtype])

    def check(self, where: str = "gpu") -> GPUSpec:
        check_declared(self, where)
        if not isinstance(self.peak_flops, Mapping) or not self.peak_flops:
            raise ConfigError(f"{where}.peak_flops", "missing: give FLOP/s per dtype, e.g. {bf16: 312e12}")
        _each(self.peak_flops, PEAK_FLOPS, f"{where}.peak_flops")
        return self


@dataclass(frozen=True)
class LinkSpec:
    """A link class: datasheet bandwidth per direction (bytes/s), the fraction of it that
    collectives achieve (``efficiency``), and a one-way per-hop latency (s)."""

    bandwidth: float = declare(
        Field(float, minimum=0, exclusive_minimum=True, help="datasheet bandwidth per direction, bytes/s")
    )
    latency: float = declare(Field(float, 0.0, minimum=0, help="one-way latency per hop, s"))
    efficiency: float = declare(
        Field(float, 1.0, **_EFFICIENCY, help="fraction of the bandwidth collectives achieve (0, 1]")
    )

    @property
    def effective_bandwidth(self) -> float:
        """Achievable bytes/s per direction: what the simulated link's capacity is."""
        return self.bandwidth * self.efficiency


@dataclass(frozen=True)
class ComputeSpec:
    """Compute-model factors: achieved fraction of peak FLOP/s for matmuls and of HBM
    bandwidth for memory-bound kernels, and the launch overhead per kernel (s)."""

    matmul_efficiency: float = declare(
        Field(float, 1.0, **_EFFICIENCY, help="achieved fraction of peak FLOP/s in matmuls (0, 1]")
    )
    memory_efficiency: float = declare(
        Field(float, 1.0, **_EFFICIENCY, help="achieved fraction of HBM bandwidth in memory-bound kernels (0, 1]")
    )
    kernel_launch_s: float = declare(Field(float, 0.0, minimum=0, help="launch overhead per kernel, s"))


@dataclass(frozen=True)
class NcclSpec:
    """Measured corrections to NCCL's tuning-model constants (:mod:`lina_sim.network.nccl`).

    NCCL's latency tables (``src/graph/tuning.cc: ncclTunerConstantsDefaults``) and its
    NVLS efficiency are NVIDIA's estimates for its reference systems; nccl-tests times
    measured on a cluster correct them. 1.0 (and ``None``) keep NCCL's own numbers, which
    is what every shipped preset does; ``lina-sim collective --calibrate`` writes fitted
    values into a profile.

    - ``intra_latency_scale``: multiplies NCCL's base latencies and its per-hop NVLink /
      PCI latencies (dimensionless).
    - ``net_latency_scale``: multiplies NCCL's per-hop network latencies and its network
      overhead per ring step (dimensionless).
    - ``nvls_efficiency``: NVLink SHARP's fraction of the switch ports' bandwidth, in place
      of NCCL's per-architecture ``nvlsEfficiency`` (``None``: NCCL's).
    - ``simple_latency_scale``: multiplies the intra-node latencies (base and NVLink/PCI
      hops) of the Simple protocol on top of ``intra_latency_scale`` (dimensionless):
      Simple moves data in large pipelined chunks, and a measured cluster shows how much
      more than NCCL's estimate filling that pipeline costs, which the LL protocols
      (small sizes) do not identify.

    - ``collective_efficiency``: the fraction of the NVLink bandwidth (as point-to-point
      copies reach it) that ring and tree collectives reach on one node (0, 1]. NCCL
      prices p2p and collectives apart: p2p copies run on ``p2pnChannelsPerPeer``
      channels per peer (``paths.cc: ncclTopoGetNchannels``), ring and tree on the graph
      search's ``nChannels x bwIntra`` (``search.cc: ncclTopoCompute``, discrete speeds)
      with a reduction in the loop, so one NVLink number cannot fit both. Fitted only
      where one-node p2p tables fixed the link and one-node collective tables exist.
    - ``collective_latency_scale``: multiplies the intra-node latencies of collectives
      (allreduce) on top of ``intra_latency_scale``, which the p2p model also reads; fitted
      in the same stage as ``collective_efficiency``.
    - ``tree_efficiency``: the fraction (0, 1] of the tree bandwidth NCCL's tuning model
      derives from the preset's topology (``tuning.cc``: the tree graph's ``nChannels x
      bw``, ``0.92``, the per-channel caps and protocol factors, ``treeCorrectionFactor``)
      that the cluster's tree graph gets. Unlike the latency scales this is a property of
      the topology NCCL's own search sees (``search.cc``: the tree is searched at the
      speeds the cluster's PCIe/NIC paths allow), so NCCL's *choice* uses it too: a slower
      tree hands sizes to the ring earlier. A measured multi-node allreduce at the sizes
      NCCL runs as a tree identifies it (8 x 8 H100: 1-8 MiB at 35.6 GB/s of algorithm
      bandwidth, 2-3x below the preset's tree). Fitted only where such rows exist (the
      ``nic`` stage of ``lina-sim collective --calibrate``).
    - ``tree_latency_scale``: multiplies the tree's latencies (base, intra-node and network
      hops) on top of the scales above (dimensionless), fitted with ``tree_efficiency``: NCCL's
      ring and tree latency constants are separate estimates (``tuning.cc``:
      ``baseLat`` / ``hwLat`` per algorithm), and a cluster's tree can be off by another
      factor than its ring (8 x 8 H100 tree 116 µs at 1 MiB; 2 x 8 ring 154 µs). A
      correction like the other latency scales: NCCL still chooses with its constants.
    - ``net_overhead_scale``: multiplies NCCL's network overhead per ring step
      (``tuning.cc: getNetOverhead``, 1 µs Intel / 2 µs AMD, which bounds every intra-node
      step of a multi-node ring) on top of ``net_latency_scale`` (dimensionless). NCCL's
      overhead and its network hop latency are separate constants; multi-node rings of
      several node counts tell them apart (2 x 8 H100: 28 intra-node steps and 2 network
      hops; 8 x 8: 112 and 14).

    NCCL still *chooses* an algorithm and protocol with its own constants; these
    corrections (all but ``tree_efficiency``) change how long the chosen pair takes.

    - ``p2p_channel_scale``: multiplies the NVLink bandwidth one p2p channel is assumed to
      move (``ncclTopoNVLinkBw``, :mod:`lina_sim.network.nccl_p2p`; NCCL gives no per-channel
      p2p figure), dimensionless. A one-node pair runs on a fixed number of channels (8 on
      A100), so this, not the link's bandwidth, is what bounds its p2p rate below the
      datasheet.

    Three more describe only what a *sender-timed* measurement sees (Vidur's send/recv
    profiles time the sender's kernel of a one-way send): the sender's kernel ends once its
    last chunk is in the connection's FIFO, not when it arrives
    (:mod:`lina_sim.experiments.sender_timed`). Nothing else the simulator runs reads them.

    - ``p2p_read_fill_bandwidth``: bytes/s at which a sender copies its message into its
      own Simple-protocol FIFO on an NVLink connection NCCL runs in P2P-read mode (Ampere
      over NVLink: ``transport/p2p.cc: p2pUseRead``); the receiver then reads it over
      NVLink. ``None``: not measured (the sender is taken to end when the data arrive).
    - ``net_fill_bandwidth``: bytes/s at which a sender's kernel fills its network FIFO
      (``None``: as above).
    - ``receiver_lag``: seconds by which the measuring harness starts the receiver after
      the sender (a property of the harness, not of NCCL); a sender whose message
      overflows the FIFO waits for it.

    Two settings, not corrections, ride along: ``min_ctas`` / ``max_ctas`` are
    ``NCCL_MIN_CTAS`` / ``NCCL_MAX_CTAS`` (legacy ``NCCL_MIN_NCHANNELS`` /
    ``NCCL_MAX_NCHANNELS``) as the runs set them, integers in 1..64 (``init.cc`` caps them
    at ``MAXCHANNELS``); ``None`` leaves NCCL's own channel count. They bound
    ``comm->nChannels`` (``connect.cc: ncclTopoPostset``), hence the ring plateau test and
    the p2p channels (:func:`lina_sim.network.nccl.comm_channels`); a measured table whose
    command line sets them is simulated with them.
    """

    intra_latency_scale: float = declare(
        Field(float, 1.0, minimum=0, exclusive_minimum=True, help="factor on NCCL's intra-node latencies")
    )
    net_latency_scale: float = declare(
        Field(float, 1.0, minimum=0, exclusive_minimum=True, help="factor on NCCL's network latencies")
    )
    nvls_efficiency: float | None = declare(
        Field(float, None, allow_none=True, **_EFFICIENCY, help="NVLS efficiency (0, 1] (absent: NCCL's)")
    )
    simple_latency_scale: float = declare(
        Field(float, 1.0, minimum=0, exclusive_minimum=True, help="factor on the Simple protocol's latencies")
    )
    collective_efficiency: float = declare(
        Field(float, 1.0, **_EFFICIENCY, help="one-node ring/tree fraction of the NVLink bandwidth p2p reaches (0, 1]")
    )
    collective_latency_scale: float = declare(
        Field(float, 1.0, minimum=0, exclusive_minimum=True, help="factor on collectives' intra-node latencies")
    )
    tree_efficiency: float = declare(
        Field(float, 1.0, **_EFFICIENCY, help="fraction of NCCL's modelled tree bandwidth the cluster reaches (0, 1]")
    )
    tree_latency_scale: float = declare(
        Field(float, 1.0, minimum=0, exclusive_minimum=True, help="factor on the tree's latencies")
    )
    net_overhead_scale: float = declare(
        Field(float, 1.0, minimum=0, exclusive_minimum=True, help="factor on NCCL's network overhead per ring step")
    )
    p2p_channel_scale: float = declare(
        Field(float, 1.0, **_POSITIVE, help="factor on the assumed NVLink p2p bandwidth per channel (ncclTopoNVLinkBw)")
    )
    p2p_read_fill_bandwidth: float | None = declare(
        Field(
            float, None, **_UNSET_RATE, help="bytes/s a sender fills its own FIFO with on a P2P-read NVLink connection"
        )
    )
    net_fill_bandwidth: float | None = declare(
        Field(float, None, **_UNSET_RATE, help="bytes/s a sender's kernel fills its network FIFO with")
    )
    receiver_lag: float = declare(
        Field(float, 0.0, minimum=0, help="s by which a sender-timed measurement starts the receiver late")
    )
    min_ctas: int | None = declare(
        Field(int, None, allow_none=True, minimum=1, maximum=64, help="NCCL_MIN_CTAS the runs set (absent: unset)")
    )
    max_ctas: int | None = declare(
        Field(int, None, allow_none=True, minimum=1, maximum=64, help="NCCL_MAX_CTAS the runs set (absent: unset)")
    )


COLLECTIVE_KINDS = ("all_to_all", "allreduce")
STEP_DELAY = Field(float, minimum=0, help="extra delay per step of a collective on an oversubscribed host, s")


@dataclass(frozen=True)
class HostSpec:
    """One CPU host that runs every rank as a process (an emulated testbed).

    - ``cores``: the cores the ranks share; ops of ranks that compute at once divide
      them (processor sharing, :mod:`lina_sim.hardware.processors`).
    - ``step_delay_s[kind]``: extra seconds per step of a collective (``all_to_all``:
      one per peer; ``allreduce``: ``2(n-1)`` ring steps) while the cores are
      oversubscribed: CPU collectives (gloo) progress on threads that must wait for a
      core when compute threads outnumber the cores. Measured by ``lina-run calibrate``
      as (mean time with every rank computing - mean time alone) / steps.
    - ``reference_excess``: the oversubscription ``(running - cores) / cores`` at which
      ``step_delay_s`` was measured; the delay accrues in proportion to it.
    """

    cores: int = declare(Field(int, minimum=1, help="CPU cores the ranks share"))
    step_delay_s: Mapping[str, float] = field(default_factory=dict)  # kind -> STEP_DELAY, s
    reference_excess: float = declare(
        Field(
            float,
            1.0,
            minimum=0,
            exclusive_minimum=True,
            help="oversubscription (running - cores) / cores at which step_delay_s was measured (a ratio)",
        )
    )

    @staticmethod
    def steps(kind: str, n: int) -> int:
        """Steps a CPU collective of ``n`` ranks takes: one per peer for an all-to-all,
        ``2(n-1)`` for a ring allreduce (what ``step_delay_s`` is per)."""
        return n - 1 if kind == "all_to_all" else 2 * (n - 1)

    def collective_delay_s(self, kind: str, n: int) -> float:
        """Seconds a ``kind`` collective of ``n`` ranks waits for its threads when the host
        is oversubscribed as at calibration."""
        return self.steps(kind, n) * self.step_delay_s.get(kind, 0.0)

    def check(self, where: str = "host") -> HostSpec:
        check_declared(self, where)
        check_known(self.step_delay_s, COLLECTIVE_KINDS, f"{where}.step_delay_s", "collective")
        _each(self.step_delay_s, STEP_DELAY, f"{where}.step_delay_s")
        return self


LINKS = ("nvlink", "pcie", "nic")
# NCCL's tuning model reads the host CPU's vendor (tuning.cc: getNetOverhead, the llMaxBws row).
HOST_CPUS = ("intel", "amd")


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of identical nodes.

    - ``intra_node``: ``nvswitch`` (each GPU has one port of ``nvlink`` bandwidth into a
      switch), ``full-mesh`` (each ordered GPU pair has its own ``nvlink`` link) or
      ``nvlink-pairs`` (local GPUs 2k and 2k+1 share an NVLink bridge of ``nvlink``
      bandwidth per direction; every other pair of a node goes GPU -> PCIe -> host ->
      PCIe -> GPU over the sender's and the receiver's ``pcie`` links, as on PCIe cards
      bridged in pairs; ``gpus_per_node`` must be even).
    - ``nic_of_gpu[i]``: the local NIC that local GPU ``i`` sends and receives through.
    - ``pcie``: each GPU's PCIe link to its NIC (and to host memory).
    - ``oversubscription``: node uplink capacity is NICs × NIC bandwidth / this factor;
      1.0 means a non-blocking fabric and no uplink is modelled.
    - ``nodes_per_leaf`` (0: off, the NICs hang off one switch tier): a rail-optimised
      leaf/spine fabric, as in NVIDIA's DGX SuperPOD: local NIC ``k`` of each of
      ``nodes_per_leaf`` consecutive nodes (a scalable unit) plugs into one leaf switch,
      the leaf of rail ``k``; a flow between NICs of one leaf stays on it, any other
      flow climbs to the spines and back (two more switch hops). Each leaf has one
      uplink and one downlink of ``nodes_per_leaf`` × NIC bandwidth /
      ``leaf_oversubscription`` towards the spines (1: non-blocking, as the SuperPOD's
      equal node-leaf, leaf-spine and spine-core cable counts are).
    - ``host_cpu``: ``intel`` or ``amd``, the nodes' CPUs; NCCL's tuning model prices
      network overhead and LL bandwidth by it (``tuning.cc: getNetOverhead``, ``llMaxBws``).
    - ``host``: ``None`` (the default) gives every rank a device of its own; a
      :class:`HostSpec` says every rank is a CPU process on one shared host (an emulated
      testbed).
    """

    name: str = declare(Field(str, "custom", help="the preset's name"), keyword=False)
    gpu: GPUSpec
    nodes: int = declare(Field(int, 1, minimum=1, help="nodes in the cluster"), keyword=False)
    gpus_per_node: int = declare(Field(int, minimum=1, help="GPUs (ranks) per node"))
    intra_node: str = declare(
        Field(str, "nvswitch", choices=INTRA_NODE_FABRICS, help="the fabric inside a node"), keyword=False
    )
    nvlink: LinkSpec
    pcie: LinkSpec
    nic: LinkSpec
    nics_per_node: int = declare(Field(int, 1, minimum=1, help="NICs per node"), keyword=False)
    nic_of_gpu: tuple[int, ...]
    oversubscription: float = declare(
        Field(float, 1.0, minimum=1, help="node uplinks' fabric oversubscription (a ratio; 1: non-blocking)")
    )
    switch_latency: float = declare(Field(float, 0.0, minimum=0, help="latency of one switch hop, s"))
    nodes_per_leaf: int = declare(
        Field(
            int,
            0,
            minimum=0,
            help="nodes whose NICs of one rail share a leaf switch (a scalable unit); 0: one switch tier",
        )
    )
    leaf_oversubscription: float = declare(
        Field(
            float, 1.0, minimum=1, help="a leaf's NIC-facing over its spine-facing capacity (a ratio; 1: non-blocking)"
        )
    )
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    nccl: NcclSpec = field(default_factory=NcclSpec)
    host_cpu: str = declare(
        Field(str, "intel", choices=HOST_CPUS, help="the nodes' CPU vendor, as NCCL's tuning model reads it")
    )
    description: str = declare(Field(str, "", help="free text"))
    host: HostSpec | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def with_nodes(self, nodes: int) -> ClusterSpec:
        return dataclasses.replace(self, nodes=declared(ClusterSpec)["nodes"].check(nodes, "nodes"))

    def check(self, where: str = "cluster") -> ClusterSpec:
        check_declared(self, where)
        self.gpu.check(f"{where}.gpu")
        for name in LINKS:
            check_declared(getattr(self, name), f"{where}.{name}")
        check_declared(self.compute, f"{where}.compute")
        check_declared(self.nccl, f"{where}.nccl")
        if self.host is not None:
            self.host.check(f"{where}.host")
        if self.intra_node == "nvlink-pairs" and self.gpus_per_node % 2:
            raise ConfigError(
                f"{where}.gpus_per_node",
                f"{self.gpus_per_node} GPUs cannot form NVLink pairs (intra_node: nvlink-pairs)",
                "an even number",
            )
        if len(self.nic_of_gpu) != self.gpus_per_node:
            raise ConfigError(
                f"{where}.nic_of_gpu",
                f"has {len(self.nic_of_gpu)} entries, expected one per GPU ({self.gpus_per_node})",
            )
        bad = [n for n in self.nic_of_gpu if not 0 <= n < self.nics_per_node]
        if bad:
            raise ConfigError(f"{where}.nic_of_gpu", f"NIC index {bad[0]} out of range", f"0..{self.nics_per_node - 1}")
        return self

    @property
    def shares_cores(self) -> bool:
        """Whether ranks contend for CPU cores (fewer host cores than ranks)."""
        return self.host is not None and self.host.cores < self.world_size


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _mapping_of(cls: type, *more: str) -> str:
    return "a mapping of " + ", ".join([*declared(cls), *more])


# A preset: the declared ClusterSpec fields, and blocks read by their own tables.
PRESET_FIELDS: dict[str, Field] = {
    **declared(ClusterSpec),
    "gpu": Field(dict, allowed=_mapping_of(GPUSpec, "peak_flops"), help="the accelerator"),
    **{name: Field(dict, allowed=_mapping_of(LinkSpec), help=f"the {name} link class") for name in LINKS},
    "compute": Field(
        dict,
        None,
        allow_none=True,
        allowed=_mapping_of(ComputeSpec),
        help="compute-model factors (absent: the ideal roofline)",
    ),
    "nccl": Field(
        dict,
        None,
        allow_none=True,
        allowed=_mapping_of(NcclSpec),
        help="measured corrections to NCCL's tuning model (absent: NCCL's own constants)",
    ),
    "host": Field(
        dict,
        None,
        allow_none=True,
        allowed=_mapping_of(HostSpec, "step_delay_s"),
        help="one CPU host shared by every rank (absent: a device per rank)",
    ),
    "nic_of_gpu": Field(
        tuple,
        None,
        allow_none=True,
        allowed="a list of NIC indices, one per GPU",
        help="the local NIC of each local GPU (absent: GPUs spread evenly over the NICs)",
    ),
    "source": Field(str, "", help="free text: where the numbers come from"),
    # Kept in the file for people, not read: what `lina-sim collective --calibrate` fitted
    # the links to (files, tables, algorithm, fitted values, residuals).
    "calibration": Field(
        dict, None, allow_none=True, allowed="a mapping (written by --calibrate)", help="provenance of a fitted profile"
    ),
}
NIC_INDEX = Field(int, help="index of a local NIC")
# The mappings of a preset whose entries are checked one by one (PEAK_FLOPS, STEP_DELAY).
_PEAKS = Field(dict, allowed="FLOP/s per dtype, e.g. {bf16: 312e12}", help="dense peak FLOP/s per dtype")
_DELAYS = Field(
    dict,
    None,
    allow_none=True,
    allowed="seconds per collective kind, e.g. {allreduce: 0.01}",
    help="extra delay per step of each collective kind on an oversubscribed host, s",
)


def _gpu(g: Mapping[str, Any], where: str) -> GPUSpec:
    values = check_fields(g, {**declared(GPUSpec), "peak_flops": _PEAKS}, where)
    values["peak_flops"] = _each(values["peak_flops"], PEAK_FLOPS, f"{where}.peak_flops")
    return GPUSpec(**values)


def _host(h: Mapping[str, Any] | None, where: str) -> HostSpec | None:
    if h is None:
        return None
    values = check_fields(h, {**declared(HostSpec), "step_delay_s": _DELAYS}, where)
    delays = values["step_delay_s"] or {}
    check_known(delays, COLLECTIVE_KINDS, f"{where}.step_delay_s", "collective")
    values["step_delay_s"] = _each(delays, STEP_DELAY, f"{where}.step_delay_s")
    return HostSpec(**values)


def cluster_from_dict(d: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """Build a ClusterSpec from a preset-shaped mapping, naming any bad field."""
    v = check_fields(check_mapping(d, where, sorted(PRESET_FIELDS)), PRESET_FIELDS, where)
    nics, gpn = v["nics_per_node"], v["gpus_per_node"]
    # GPUs are spread evenly over the NICs in local-rank order unless the preset says.
    nic_of_gpu = v["nic_of_gpu"] if v["nic_of_gpu"] is not None else [i * nics // gpn for i in range(gpn)]
    spec = ClusterSpec(
        **{k: v[k] for k in declared(ClusterSpec)},
        gpu=_gpu(v["gpu"], f"{where}.gpu"),
        **{name: LinkSpec(**check_fields(v[name], declared(LinkSpec), f"{where}.{name}")) for name in LINKS},
        compute=ComputeSpec(**check_fields(v["compute"] or {}, declared(ComputeSpec), f"{where}.compute")),
        nccl=NcclSpec(**check_fields(v["nccl"] or {}, declared(NcclSpec), f"{where}.nccl")),
        host=_host(v["host"], f"{where}.host"),
        nic_of_gpu=tuple(NIC_INDEX.check(n, f"{where}.nic_of_gpu[{i}]") for i, n in enumerate(nic_of_gpu)),
    )
    return spec.check(where)


def read_preset(name: str, field: str = "preset") -> tuple[dict, Path]:
    """The raw mapping of a preset given by name (``dgx-a100``) or by path to a YAML
    profile, and the file it came from; a bad name is an error on ``field``."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        if name not in available_presets():
            raise ConfigError(field, f"unknown preset {name!r}", available_presets() + ["<path to a profile .yaml>"])
        path = PRESET_DIR / f"{name}.yaml"
    return load_yaml(path, "preset"), path


def load_preset(name: str, nodes: int | None = None) -> ClusterSpec:
    """Load a preset by name (``dgx-a100``) or by path to a YAML profile.

    ``nodes`` overrides the preset's default node count.
    """
    data, path = read_preset(name)
    spec = cluster_from_dict(data, where=path.stem)
    if nodes is not None:
        spec = spec.with_nodes(nodes)
    return spec


def _merge(base: dict, over: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def resolve_cluster(block: Any, where: str = "cluster") -> ClusterSpec:
    """A scenario's ``cluster:`` block: ``preset`` (name or path), optional ``nodes``, and
    overrides of any preset field (e.g. ``nic: {bandwidth: 25e9}``), validated by name."""
    if isinstance(block, str):
        block = {"preset": block}
    if not isinstance(block, Mapping) or "preset" not in block:
        raise ConfigError(f"{where}.preset", "missing", available_presets() + ["<path to a profile .yaml>"])
    base, _ = read_preset(str(block["preset"]), f"{where}.preset")
    overrides = {k: v for k, v in block.items() if k != "preset"}
    return cluster_from_dict(_merge(base, overrides), where=where)
