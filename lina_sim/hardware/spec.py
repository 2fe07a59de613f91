"""Hardware specifications: GPUs, links and clusters, loaded from YAML presets.

Units everywhere: bytes, seconds, bytes/s, FLOP/s. A preset is a YAML file in
``lina_sim/config/presets/`` (or any path, such as a profile written by ``lina-run calibrate``);
each number in a shipped preset carries a comment saying where it comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from lina_sim.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "config" / "presets"
INTRA_NODE_FABRICS = ("nvswitch", "full-mesh")


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: peak dense FLOP/s per dtype, HBM bandwidth (bytes/s), memory (bytes)."""

    name: str
    peak_flops: Mapping[str, float]
    hbm_bandwidth: float
    memory_bytes: float

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ConfigError("dtype", f"GPU {self.name} has no peak for {dtype!r}", sorted(self.peak_flops))
        return float(self.peak_flops[dtype])


@dataclass(frozen=True)
class LinkSpec:
    """A link class: datasheet bandwidth per direction (bytes/s), the fraction of it that
    collectives achieve (``efficiency``), and a one-way per-hop latency (s)."""

    bandwidth: float
    latency: float
    efficiency: float = 1.0

    @property
    def effective_bandwidth(self) -> float:
        """Achievable bytes/s per direction: what the simulated link's capacity is."""
        return self.bandwidth * self.efficiency


@dataclass(frozen=True)
class ComputeSpec:
    """Compute-model factors: achieved fraction of peak FLOP/s for matmuls and of HBM
    bandwidth for memory-bound kernels, and the launch overhead per kernel (s)."""

    matmul_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    kernel_launch_s: float = 0.0


COLLECTIVE_KINDS = ("all_to_all", "allreduce")


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

    cores: int
    step_delay_s: Mapping[str, float] = field(default_factory=dict)
    reference_excess: float = 1.0

    @staticmethod
    def steps(kind: str, n: int) -> int:
        """Steps a CPU collective of ``n`` ranks takes: one per peer for an all-to-all,
        ``2(n-1)`` for a ring allreduce (what ``step_delay_s`` is per)."""
        return n - 1 if kind == "all_to_all" else 2 * (n - 1)

    def collective_delay_s(self, kind: str, n: int) -> float:
        """Seconds a ``kind`` collective of ``n`` ranks waits for its threads when the host
        is oversubscribed as at calibration."""
        return self.steps(kind, n) * self.step_delay_s.get(kind, 0.0)

    def check(self, where: str = "host") -> "HostSpec":
        _check_positive_int(f"{where}.cores", self.cores)
        for k, v in self.step_delay_s.items():
            if k not in COLLECTIVE_KINDS:
                raise ConfigError(f"{where}.step_delay_s.{k}", "unknown collective", COLLECTIVE_KINDS)
            if not v >= 0:
                raise ConfigError(f"{where}.step_delay_s.{k}", f"must be >= 0 s, got {v}")
        if not self.reference_excess > 0:
            raise ConfigError(f"{where}.reference_excess", f"must be > 0, got {self.reference_excess}")
        return self


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of identical nodes.

    - ``intra_node``: ``nvswitch`` (each GPU has one port of ``nvlink`` bandwidth into a
      switch) or ``full-mesh`` (each ordered GPU pair has its own ``nvlink`` link).
    - ``nic_of_gpu[i]``: the local NIC that local GPU ``i`` sends and receives through.
    - ``pcie``: each GPU's PCIe link to its NIC (and to host memory).
    - ``oversubscription``: node uplink capacity is NICs × NIC bandwidth / this factor;
      1.0 means a non-blocking fabric and no uplink is modelled.
    - ``host``: ``None`` (the default) gives every rank a device of its own; a
      :class:`HostSpec` says every rank is a CPU process on one shared host (an emulated
      testbed).
    """

    name: str
    gpu: GPUSpec
    nodes: int
    gpus_per_node: int
    intra_node: str
    nvlink: LinkSpec
    pcie: LinkSpec
    nic: LinkSpec
    nics_per_node: int
    nic_of_gpu: tuple[int, ...]
    oversubscription: float = 1.0
    switch_latency: float = 0.0
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    description: str = ""
    host: HostSpec | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def with_nodes(self, nodes: int) -> "ClusterSpec":
        _check_positive_int("nodes", nodes)
        return dataclasses.replace(self, nodes=int(nodes))

    def check(self, where: str = "cluster") -> "ClusterSpec":
        _check_positive_int(f"{where}.nodes", self.nodes)
        _check_positive_int(f"{where}.gpus_per_node", self.gpus_per_node)
        _check_positive_int(f"{where}.nics_per_node", self.nics_per_node)
        if self.intra_node not in INTRA_NODE_FABRICS:
            raise ConfigError(f"{where}.intra_node", f"unknown fabric {self.intra_node!r}", INTRA_NODE_FABRICS)
        if len(self.nic_of_gpu) != self.gpus_per_node:
            raise ConfigError(f"{where}.nic_of_gpu", f"has {len(self.nic_of_gpu)} entries, expected one per GPU ({self.gpus_per_node})")
        bad = [n for n in self.nic_of_gpu if not 0 <= n < self.nics_per_node]
        if bad:
            raise ConfigError(f"{where}.nic_of_gpu", f"NIC index {bad[0]} out of range", f"0..{self.nics_per_node - 1}")
        for name in ("nvlink", "pcie", "nic"):
            link: LinkSpec = getattr(self, name)
            if not link.bandwidth > 0:
                raise ConfigError(f"{where}.{name}.bandwidth", f"must be > 0 bytes/s, got {link.bandwidth}")
            if not 0 < link.efficiency <= 1:
                raise ConfigError(f"{where}.{name}.efficiency", f"must be in (0, 1], got {link.efficiency}")
            if link.latency < 0:
                raise ConfigError(f"{where}.{name}.latency", f"must be >= 0 s, got {link.latency}")
        if not self.oversubscription >= 1:
            raise ConfigError(f"{where}.oversubscription", f"must be >= 1, got {self.oversubscription}")
        if self.host is not None:
            self.host.check(f"{where}.host")
        return self

    @property
    def shares_cores(self) -> bool:
        """Whether ranks contend for CPU cores (fewer host cores than ranks)."""
        return self.host is not None and self.host.cores < self.world_size


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _num(d: Mapping[str, Any], key: str, where: str, default: Any = None) -> float:
    if key not in d:
        if default is not None:
            return default
        raise ConfigError(f"{where}.{key}", "missing")
    v = d[key]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}", f"not a number: {v!r}") from None


def _link(d: Any, where: str) -> LinkSpec:
    if not isinstance(d, Mapping):
        raise ConfigError(where, "must be a mapping with bandwidth, latency, efficiency")
    return LinkSpec(
        bandwidth=_num(d, "bandwidth", where),
        latency=_num(d, "latency", where, 0.0),
        efficiency=_num(d, "efficiency", where, 1.0),
    )


def _host(d: Any, where: str) -> HostSpec | None:
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError(where, "must be a mapping with cores, step_delay_s, reference_excess")
    for k in d:
        if k not in ("cores", "step_delay_s", "reference_excess"):
            raise ConfigError(f"{where}.{k}", "unknown field", ["cores", "reference_excess", "step_delay_s"])
    delays = d.get("step_delay_s") or {}
    if not isinstance(delays, Mapping):
        raise ConfigError(f"{where}.step_delay_s", "must be a mapping", COLLECTIVE_KINDS)
    return HostSpec(cores=d.get("cores"), step_delay_s={str(k): _num(delays, k, f"{where}.step_delay_s") for k in delays},
                    reference_excess=_num(d, "reference_excess", where, 1.0))


def cluster_from_dict(d: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """Build a ClusterSpec from a preset-shaped mapping, naming any bad field."""
    known = {"name", "description", "nodes", "gpus_per_node", "gpu", "intra_node", "nvlink", "pcie", "nic",
             "nics_per_node", "nic_of_gpu", "oversubscription", "switch_latency", "compute", "source", "host"}
    for k in d:
        if k not in known:
            raise ConfigError(f"{where}.{k}", "unknown field", sorted(known))
    g = d.get("gpu")
    if not isinstance(g, Mapping):
        raise ConfigError(f"{where}.gpu", "missing or not a mapping")
    peak = g.get("peak_flops")
    if not isinstance(peak, Mapping) or not peak:
        raise ConfigError(f"{where}.gpu.peak_flops", "missing: give FLOP/s per dtype, e.g. {bf16: 312e12}")
    gpu = GPUSpec(
        name=str(g.get("name", "gpu")),
        peak_flops={str(k): _num(peak, k, f"{where}.gpu.peak_flops") for k in peak},
        hbm_bandwidth=_num(g, "hbm_bandwidth", f"{where}.gpu"),
        memory_bytes=_num(g, "memory_bytes", f"{where}.gpu"),
    )
    c = d.get("compute", {}) or {}
    compute = ComputeSpec(
        matmul_efficiency=_num(c, "matmul_efficiency", f"{where}.compute", 1.0),
        memory_efficiency=_num(c, "memory_efficiency", f"{where}.compute", 1.0),
        kernel_launch_s=_num(c, "kernel_launch_s", f"{where}.compute", 0.0),
    )
    gpn = d.get("gpus_per_node")
    nics = d.get("nics_per_node", 1)
    nic_of_gpu = d.get("nic_of_gpu")
    if nic_of_gpu is None and isinstance(gpn, int) and isinstance(nics, int) and nics > 0:
        # GPUs are spread evenly over the NICs in local-rank order.
        nic_of_gpu = [i * nics // gpn for i in range(gpn)]
    spec = ClusterSpec(
        name=str(d.get("name", "custom")),
        description=str(d.get("description", "")),
        gpu=gpu,
        nodes=d.get("nodes", 1),
        gpus_per_node=gpn,
        intra_node=str(d.get("intra_node", "nvswitch")),
        nvlink=_link(d.get("nvlink"), f"{where}.nvlink"),
        pcie=_link(d.get("pcie"), f"{where}.pcie"),
        nic=_link(d.get("nic"), f"{where}.nic"),
        nics_per_node=nics,
        nic_of_gpu=tuple(int(x) for x in (nic_of_gpu or ())),
        oversubscription=_num(d, "oversubscription", where, 1.0),
        switch_latency=_num(d, "switch_latency", where, 0.0),
        compute=compute,
        host=_host(d.get("host"), f"{where}.host"),
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
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(str(path), "a preset must be a YAML mapping")
    return data, path


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
