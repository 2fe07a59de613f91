"""Every collective, run alone, matches its closed-form alpha-beta time."""

import dataclasses

import numpy as np
import pytest
import simpy

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network.collectives import Collectives
from lina_sim.network.fluid import FluidNetwork

SIZES = [1 << 20, 64 << 20, 1 << 30]


def simulate(cluster, op, algo, size, ranks=None):
    topo = Topology(cluster)
    env = simpy.Environment()
    coll = Collectives(FluidNetwork(env, topo))
    ranks = list(range(cluster.world_size)) if ranks is None else ranks
    p = coll.allreduce(ranks, size, algo) if op == "allreduce" else coll.all_to_all(ranks, size, algo)
    env.run()
    return p.value.duration


def lat_inter(c):
    return 2 * c.pcie.latency + 2 * c.nic.latency + c.switch_latency


def bw(link):
    return link.bandwidth * link.efficiency


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_allreduce_one_node_nvswitch(size, n):
    c = load_preset("dgx-a100")
    expect = 2 * (n - 1) * (c.nvlink.latency + size / n / bw(c.nvlink))
    assert simulate(c, "allreduce", "flat-ring", size, list(range(n))) == pytest.approx(expect, rel=0.01)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("nodes", [2, 4, 16])
def test_ring_allreduce_multi_node_uses_every_nic(size, nodes):
    c = load_preset("dgx-a100", nodes=nodes)
    n = c.world_size
    # 8 channels, one leaving each node through each GPU's own NIC: NIC-bound steps.
    expect = 2 * (n - 1) * (lat_inter(c) + size / (8 * n) / min(bw(c.nic), bw(c.pcie)))
    assert simulate(c, "allreduce", "flat-ring", size) == pytest.approx(expect, rel=0.01)


@pytest.mark.parametrize("size", SIZES)
def test_ring_allreduce_paper_testbed_shared_nic(size):
    c = load_preset("paper-testbed")
    n = c.world_size
    expect = 2 * (n - 1) * (lat_inter(c) + size / n / bw(c.nic))
    assert simulate(c, "allreduce", "flat-ring", size) == pytest.approx(expect, rel=0.01)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("preset,nodes", [("dgx-a100", 2), ("dgx-a100", 4), ("paper-testbed", 4), ("paper-testbed", 2)])
def test_hierarchical_allreduce(size, preset, nodes):
    c = load_preset(preset, nodes=nodes)
    g, k = c.gpus_per_node, nodes
    gpus_per_nic = g // c.nics_per_node
    intra = 2 * (g - 1) * (c.nvlink.latency + size / g / bw(c.nvlink))
    inter = 2 * (k - 1) * (lat_inter(c) + size / (g * k) / (bw(c.nic) / gpus_per_nic))
    assert simulate(c, "allreduce", "hierarchical", size) == pytest.approx(intra + inter, rel=0.01)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "preset,nodes", [("dgx-a100", 1), ("dgx-a100", 2), ("dgx-a100", 8), ("paper-testbed", 4), ("dgx-h100", 2)]
)
def test_direct_all_to_all(size, preset, nodes):
    c = load_preset(preset, nodes=nodes)
    n, g = c.world_size, c.gpus_per_node
    per_nic = g // c.nics_per_node
    if nodes == 1:
        expect = c.nvlink.latency + size * (g - 1) / n / bw(c.nvlink)
    else:
        expect = lat_inter(c) + per_nic * size * (n - g) / n / min(bw(c.nic), bw(c.pcie) * per_nic)
    assert simulate(c, "all_to_all", "flat", size) == pytest.approx(expect, rel=0.01)


@pytest.mark.parametrize("size", [64 << 20, 1 << 30])
@pytest.mark.parametrize("preset,nodes", [("dgx-a100", 2), ("dgx-a100", 4), ("paper-testbed", 4)])
def test_hierarchical_all_to_all(size, preset, nodes):
    """Large sizes, where both phases are bandwidth-bound: each phase runs as NCCL's
    grouped p2p (its own latency and per-channel caps), so the links' closed form holds
    to within NCCL's channel caps, not exactly."""
    c = load_preset(preset, nodes=nodes)
    g = c.gpus_per_node
    per_nic = g // c.nics_per_node
    # Phase 1: each GPU sends size/g to each local peer; phase 2: size/nodes to each remote peer.
    if c.intra_node == "nvswitch":
        p1 = c.nvlink.latency + size * (g - 1) / g / bw(c.nvlink)
    else:
        p1 = c.nvlink.latency + size / g / bw(c.nvlink)
    p2 = lat_inter(c) + per_nic * size * (nodes - 1) / nodes / bw(c.nic)
    assert simulate(c, "all_to_all", "hierarchical", size) == pytest.approx(p1 + p2, rel=0.1)


def test_collectives_on_a_sub_communicator():
    c = load_preset("dgx-a100", nodes=2)
    ranks = [1, 3, 9, 11]  # two per node, each with its own NIC
    size = 256 << 20
    expect = lat_inter(c) + size * 2 / 4 / bw(c.nic)
    assert simulate(c, "all_to_all", "flat", size, ranks) == pytest.approx(expect, rel=0.01)
    n = 4
    expect = 2 * (n - 1) * (lat_inter(c) + size / (2 * n) / bw(c.nic))
    assert simulate(c, "allreduce", "flat-ring", size, ranks) == pytest.approx(expect, rel=0.01)


def test_uneven_all_to_all_time_is_set_by_most_loaded_link():
    c = load_preset("paper-testbed")
    topo = Topology(c)
    rng = np.random.default_rng(7)
    n = c.world_size
    m = rng.uniform(0, 4 << 20, size=(n, n))
    m[0, 5] = 1 << 30  # one heavy pair: node 0's NIC carries it
    np.fill_diagonal(m, 0)
    env = simpy.Environment()
    net = FluidNetwork(env, topo)
    p = Collectives(net).all_to_all(range(n), m)
    env.run()
    src, dst = np.nonzero(m)
    loads = np.zeros(len(topo.links))
    for s, d in zip(src, dst):
        loads[topo.path(s, d)] += m[s, d]
    busiest = int(np.argmax(loads / topo.links.capacity))
    expect = float(topo.path_latency(src, dst).max()) + loads[busiest] / topo.links.capacity[busiest]
    assert p.value.duration == pytest.approx(expect, rel=0.01)
    assert net.link_report().iloc[0]["link"] == topo.link_name(busiest)


def test_concurrent_allreduce_slows_all_to_all_as_fair_sharing_predicts():
    # Zero latencies, so the ring keeps one flow on every NIC without gaps.
    c = load_preset("dgx-a100", nodes=2)
    c = dataclasses.replace(
        c,
        switch_latency=0.0,
        nvlink=dataclasses.replace(c.nvlink, latency=0.0),
        pcie=dataclasses.replace(c.pcie, latency=0.0),
        nic=dataclasses.replace(c.nic, latency=0.0),
    )
    n = c.world_size
    a2a_alone = simulate(c, "all_to_all", "direct", 64 << 20)
    env = simpy.Environment()
    coll = Collectives(FluidNetwork(env, Topology(c)))
    pa = coll.all_to_all(range(n), 64 << 20)
    coll.allreduce(range(n), 4 << 30, "flat-ring")  # long enough to overlap the whole all-to-all
    env.run(until=pa)
    # On each NIC: the GPU's 8 inter-node all-to-all flows (weight 1/15 each) share with
    # one ring-channel flow (weight 1/8): the all-to-all keeps (8/15) / (8/15 + 1/8).
    w_a2a, w_ring = 8 / 15, 1 / 8
    assert pa.value.duration / a2a_alone == pytest.approx((w_a2a + w_ring) / w_a2a, rel=0.01)


def test_bad_inputs_name_the_field():
    c = load_preset("paper-testbed")
    with pytest.raises(ConfigError, match="send_matrix.*shape"):
        simulate(c, "all_to_all", "direct", np.ones((3, 3)))
    with pytest.raises(ConfigError, match="algo"):
        simulate(c, "allreduce", "butterfly", 1)
    with pytest.raises(ConfigError, match="size"):
        simulate(c, "allreduce", "flat-ring", -5)
    with pytest.raises(ConfigError, match="ranks"):
        simulate(c, "allreduce", "flat-ring", 5, [0, 99])
    with pytest.raises(ConfigError, match="same number of ranks"):
        simulate(c, "allreduce", "hierarchical", 1 << 20, [0, 1, 4])
