"""The ``nvlink-pairs`` fabric: NVLink bridges between GPUs 2k and 2k+1, PCIe through the
host between every other pair of a node (Azure NC A100 v4, Vidur's a100_pairwise_nvlink)."""

import numpy as np
import pytest
import simpy
import yaml

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import PRESET_DIR, cluster_from_dict, load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network.collectives import Collectives
from lina_sim.network.fluid import FluidNetwork

PRESET = "a100-pcie-nvlink-pairs"


def names(topo, src, dst):
    return [topo.link_name(link) for link in topo.path(src, dst)]


def bw(link):
    return link.bandwidth * link.efficiency


def ring_allreduce(cluster, ranks, size):
    topo = Topology(cluster)
    env = simpy.Environment()
    proc = Collectives(FluidNetwork(env, topo)).allreduce(ranks, size, "flat-ring")
    env.run()
    return proc.value.duration


def test_preset_is_four_gpus_bridged_in_pairs():
    c = load_preset(PRESET)
    assert c.gpus_per_node == 4 and c.intra_node == "nvlink-pairs" and c.nics_per_node == 1
    assert c.nvlink.bandwidth == 300e9  # 600 GB/s bidirectional over 3 bridges
    assert c.pcie.bandwidth == 32e9 and c.nic.bandwidth == 10e9  # Gen4 x16; 80 Gb/s per VM


def test_bridged_pairs_use_their_nvlink_and_others_cross_pcie():
    topo = Topology(load_preset(PRESET, nodes=2))
    assert names(topo, 0, 1) == ["nvl[0->1]"]
    assert names(topo, 1, 0) == ["nvl[1->0]"]
    assert names(topo, 2, 3) == ["nvl[2->3]"]
    assert names(topo, 5, 4) == ["nvl[5->4]"]  # second node: local GPUs 1 and 0
    assert names(topo, 1, 2) == ["pcie_up[1]", "pcie_down[2]"]
    assert names(topo, 3, 0) == ["pcie_up[3]", "pcie_down[0]"]
    assert names(topo, 4, 7) == ["pcie_up[4]", "pcie_down[7]"]
    assert names(topo, 0, 5) == ["pcie_up[0]", "nic_tx[node0.0]", "nic_rx[node1.0]", "pcie_down[5]"]
    assert topo.path(2, 2) == []


def test_paths_vectorised_match_one_by_one():
    topo = Topology(load_preset(PRESET, nodes=3))
    src, dst = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    rows = topo.paths(src.ravel(), dst.ravel())
    for (s, d), row in zip(zip(src.ravel(), dst.ravel(), strict=True), rows, strict=True):
        assert [int(x) for x in row if x >= 0] == topo.path(int(s), int(d))


def test_capacities_and_latencies():
    c = load_preset(PRESET)
    topo = Topology(c)
    cap, lat = topo.links.capacity, topo.links.latency
    (bridge,) = topo.path(0, 1)
    assert cap[bridge] == pytest.approx(bw(c.nvlink)) and lat[bridge] == c.nvlink.latency
    assert topo.links.kind[bridge] == "nvlink"
    up, down = topo.path(0, 2)
    assert cap[up] == cap[down] == pytest.approx(bw(c.pcie))
    assert topo.links.kind[up] == topo.links.kind[down] == "pcie"
    assert topo.path_latency([0, 0], [1, 2]) == pytest.approx([c.nvlink.latency, 2 * c.pcie.latency])
    # One bridge link per GPU and direction, no link for unbridged pairs.
    assert sum(n.startswith("nvl[") for n in topo.links.names) == c.world_size


def test_link_kind_helpers():
    topo = Topology(load_preset(PRESET, nodes=2))
    assert not topo.intra_all_nvlink
    kinds = topo.intra_link_kind([0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 0, 4])
    assert kinds.tolist() == ["", "nvlink", "pcie", "nvlink", "pcie", "nic"]
    mesh = Topology(load_preset("paper-testbed"))
    assert mesh.intra_all_nvlink
    assert mesh.intra_link_kind(0, 2) == "nvlink" and mesh.intra_link_kind(0, 4) == "nic"
    switch = Topology(load_preset("dgx-a100"))
    assert switch.intra_all_nvlink and (switch.intra_link_kind(np.arange(8), 7)[:7] == "nvlink").all()


@pytest.mark.parametrize("size", [64 << 20, 1 << 30])
def test_four_gpu_ring_allreduce_is_pcie_bound(size):
    c = load_preset(PRESET)
    n = 4
    # Ring 0-1-2-3-0: hops 1->2 and 3->0 cross PCIe through the host; each PCIe link
    # carries one flow, so every step runs at the PCIe rate.
    expect = 2 * (n - 1) * (2 * c.pcie.latency + size / n / bw(c.pcie))
    t = ring_allreduce(c, list(range(n)), size)
    assert t == pytest.approx(expect, rel=0.02)
    # The bridged pair alone runs at NVLink speed: far faster per byte.
    pair = ring_allreduce(c, [0, 1], size)
    assert pair == pytest.approx(2 * (c.nvlink.latency + size / 2 / bw(c.nvlink)), rel=0.01)
    assert t > 5 * pair


def test_odd_gpus_per_node_is_an_error_naming_the_field():
    data = yaml.safe_load((PRESET_DIR / f"{PRESET}.yaml").read_text())
    data.update(gpus_per_node=3)
    with pytest.raises(ConfigError) as e:
        cluster_from_dict(data, where="cluster")
    assert e.value.field == "cluster.gpus_per_node" and "even" in str(e.value)
    data.update(gpus_per_node=6)
    assert Topology(cluster_from_dict(data)).path(4, 5) != Topology(cluster_from_dict(data)).path(4, 3)


def test_nccl_ring_on_four_gpus_is_pcie_bound():
    c = load_preset(PRESET)
    topo = Topology(c)
    env = simpy.Environment()
    size = 1 << 30
    proc = Collectives(FluidNetwork(env, topo)).allreduce(list(range(4)), size, "ring")
    env.run()
    busbw = size / proc.value.duration * 2 * 3 / 4
    assert 0.8 * bw(c.pcie) < busbw <= bw(c.pcie)
