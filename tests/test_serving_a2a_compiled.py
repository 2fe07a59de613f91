"""The compiled all-to-all solver (``serving_a2a_kernels``): against the simpy network and
the fluid module's own references on several topologies, exact whatever the stack, and
compiled once for every topology."""

from __future__ import annotations

import numpy as np
import pytest

from lina_sim.hardware.spec import load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network import serving_a2a_kernels as kernels
from lina_sim.network.alone import SimCluster
from lina_sim.network.fluid import max_min_rates, per_flow_makespan
from lina_sim.network.serving_a2a import AllToAllTimer


def uneven(n: int, count: int, seed: int) -> np.ndarray:
    """``[count, n, n]`` byte matrices: uneven, some sparse, one empty, one with every flow
    the same size (all its flows end at one instant) and one repeated."""
    rng = np.random.default_rng(seed)
    ms = rng.integers(0, 400, size=(count, n, n)).astype(float) * 1024
    ms[::3][rng.random(((count + 2) // 3, n, n)) < 0.7] = 0.0
    ms[1] = 0.0
    ms[2] = 8192.0
    ms[3] = ms[4]
    return ms


@pytest.mark.parametrize(
    "preset,nodes,algo",
    [
        ("paper-testbed", 2, "direct"),  # isolated components of 16 flows
        ("paper-testbed", 4, "flat"),
        ("a100-pcie-nvlink-pairs", 2, "direct"),  # one 48-aggregate component
        ("a100-pcie-nvlink-pairs", 2, "hierarchical"),
        ("dgx-a100", 2, "flat"),  # four components solved apart
    ],
)
def test_times_match_the_simulated_network(preset, nodes, algo):
    """What Collectives.all_to_all gives on a fresh FluidNetwork, on topologies the
    serving tests do not cover."""
    cluster = load_preset(preset, nodes)
    topo = Topology(cluster)
    n = cluster.world_size
    ms = uneven(n, 5, seed=nodes)
    got = AllToAllTimer(cluster, algo=algo, topology=topo).times(ms)
    assert got[1] == 0.0 and (got[np.arange(5) != 1] > 0).all()
    for m, g in zip(ms, got):
        sim = SimCluster(cluster, topo)
        p = sim.coll.all_to_all(range(n), m, algo)
        sim.env.run()
        assert g == pytest.approx(p.value.duration, rel=1e-9)


@pytest.mark.parametrize("preset,nodes", [("paper-testbed", 4), ("a100-pcie-nvlink-pairs", 2), ("dgx-a100", 2)])
def test_fluid_phase_matches_the_per_flow_reference(preset, nodes):
    """The event loop's fluid time (flat step: bytes as sent) is fluid.per_flow_makespan's,
    every flow on its own path, no aggregates, no dropped links."""
    cluster = load_preset(preset, nodes)
    timer = AllToAllTimer(cluster, algo="flat")
    step = timer._direct
    paths = timer.topology.paths(step.src, step.dst)
    ms = uneven(timer.n, 6, seed=11)
    nbytes, active, weight, lat = step._flows(ms[:, step.src, step.dst])
    fluid = step.times(ms) - lat
    for i in range(len(ms)):
        on = active[i]
        want = per_flow_makespan(paths[on], nbytes[i, on], weight[i, on], timer.topology.links.capacity)
        assert fluid[i] == pytest.approx(want, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("preset,nodes", [("paper-testbed", 4), ("a100-pcie-nvlink-pairs", 2), ("dgx-h100", 2)])
def test_start_rates_are_the_networks_max_min_rates(preset, nodes):
    """Every flow's rate with all of its matrix's flows running (what the NCCL inflation is
    computed from) is fluid.max_min_rates' for the same flows and weights."""
    cluster = load_preset(preset, nodes)
    timer = AllToAllTimer(cluster)
    step = timer._direct
    paths = timer.topology.paths(step.src, step.dst)
    capacity = timer.topology.links.capacity
    ms = uneven(timer.n, 5, seed=5)
    _, active, weight, _ = step._flows(ms[:, step.src, step.dst])
    rates = kernels.start_rates(weight, step.plan)
    assert (rates[~active] == 0).all()
    for i in range(len(ms)):
        on = np.flatnonzero(active[i])
        groups = [(paths[f][paths[f] >= 0], np.ones((paths[f] >= 0).sum()), weight[i, f]) for f in on]
        np.testing.assert_allclose(rates[i, on], max_min_rates(groups, capacity), rtol=1e-12)


@pytest.mark.parametrize("preset,nodes,algo", [("paper-testbed", 4, "direct"), ("dgx-a100", 2, "hierarchical")])
def test_each_matrix_is_solved_alone_exactly_and_deterministically(preset, nodes, algo):
    """Matrices are solved one at a time, so a time does not depend, even in the last bit,
    on the stack it was solved in or its place there; and fresh timers agree exactly."""
    cluster = load_preset(preset, nodes)
    ms = uneven(cluster.world_size, 12, seed=3)
    stacked = AllToAllTimer(cluster, algo=algo).times(ms)
    alone = np.array([AllToAllTimer(cluster, algo=algo).times(m) for m in ms])
    order = np.random.default_rng(0).permutation(len(ms))
    shuffled = AllToAllTimer(cluster, algo=algo).times(ms[order])
    assert stacked.tolist() == alone.tolist()
    assert shuffled.tolist() == stacked[order].tolist()
    assert AllToAllTimer(cluster, algo=algo).times(ms).tolist() == stacked.tolist()


@pytest.mark.parametrize("preset,nodes", [("paper-testbed", 4), ("a100-pcie-nvlink-pairs", 2), ("dgx-a100", 2)])
def test_link_bounds_are_the_busiest_links_load(preset, nodes):
    """The lower bound's link term is, to the last bit, the numpy formulation it replaced:
    bytes summed per aggregate with ``np.add.at``, per link by the incidence product."""
    cluster = load_preset(preset, nodes)
    step = AllToAllTimer(cluster)._direct
    ms = uneven(cluster.world_size, 7, seed=13)
    nbytes = ms[:, step.src, step.dst]
    want = np.zeros(len(ms))
    for c in step.joint:
        comp = step.components[c]
        per_agg = np.zeros((comp.A.shape[0], len(ms)))
        np.add.at(per_agg, comp.agg, nbytes[:, comp.flows].T)
        want = np.maximum(want, ((comp.A.T @ per_agg) / comp.cap[:, None]).max(axis=0))
    got = kernels.link_bounds(nbytes, step.joint, step.plan)
    assert step.joint.size and (want > 0).any()
    np.testing.assert_allclose(got, want, rtol=1e-15)
    if preset == "paper-testbed":  # the incidence product sums in aggregate order here
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("preset,nodes", [("paper-testbed", 4), ("a100-pcie-nvlink-pairs", 2), ("dgx-h100", 2)])
def test_p2p_terms_are_p2p_comms_to_the_last_bit(preset, nodes):
    """The compiled flow terms are P2pComm's own: each matrix's latency is
    ``P2pComm.latency`` of its flows sent, and each flow's bytes on the wire its bytes
    times ``P2pComm.inflation`` at its max-min rate with every flow running."""
    cluster = load_preset(preset, nodes)
    step = AllToAllTimer(cluster)._direct
    ms = uneven(cluster.world_size, 6, seed=17)
    ms[5] = 2.0e6  # large messages: several channels, no LL
    sent = ms[:, step.src, step.dst]
    nbytes, active, weight, lat = step._flows(sent)
    comm, kinds = step.p2p, step.kinds
    rates = kernels.start_rates(weight, step.plan)
    for i in range(len(ms)):
        on = active[i]
        assert lat[i] == comm.latency(step.src[on], sent[i, on], kinds[on])
        share = comm.share(step.src[on], sent[i, on]) if on.any() else 1.0
        want = sent[i, on] * comm.inflation(sent[i, on], kinds[on], share, rates[i, on])
        assert nbytes[i, on].tolist() == want.tolist()


def test_lanes_take_the_stack_in_as_few_turns():
    """Fewer lanes than ``_LANES`` where as many turns suffice, whole vectors of four."""
    sizes = (1, 3, 5, 32, 33, 40, 64, 65, 200)
    assert [kernels._lanes(np.zeros((n, 1))) for n in sizes] == [1, 3, 8, 32, 20, 20, 32, 24, 32]


def test_the_kernel_is_compiled_once_for_every_topology():
    """One specialisation serves every topology and algorithm (compile time is paid once,
    then loaded from the on-disk cache)."""
    for preset, nodes, algo in [
        ("paper-testbed", 4, "direct"),
        ("dgx-a100", 2, "flat"),
        ("paper-testbed", 2, "hierarchical"),
    ]:
        cluster = load_preset(preset, nodes)
        AllToAllTimer(cluster, algo=algo).times(uneven(cluster.world_size, 5, seed=1))
    assert len(kernels._solve.signatures) == 1
    assert len(kernels._flow_terms.signatures) == 1
