"""Property tests of the fluid network on random flow sets."""

import numpy as np
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from lina_sim.hardware.spec import load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network.fluid import FluidNetwork

TOPO = Topology(load_preset("paper-testbed", nodes=3))
N = TOPO.world_size

flow = st.tuples(
    st.integers(0, N - 1),
    st.integers(0, N - 1),
    st.floats(1e3, 1e9),
    st.sampled_from([1.0, 0.5, 0.25, 2.0]),
    st.floats(0, 5e-3),
)


def start_flows(flows, delayed=True):
    env = simpy.Environment()
    net = FluidNetwork(env, TOPO)
    done = {}

    def launch(i, s, d, size, w, t0):
        if delayed and t0 > 0:
            yield env.timeout(t0)
        ev = net.transfer_paths(TOPO.paths([s], [d]), size, tag=str(i), weight=w)
        g = yield ev
        done[i] = (g.start, g.end)

    for i, f in enumerate(flows):
        env.process(launch(i, *f))
    return env, net, done


@settings(max_examples=60, deadline=None)
@given(st.lists(flow, min_size=1, max_size=25))
def test_rates_respect_capacity_and_are_max_min_fair(flows):
    flows = [f for f in flows if f[0] != f[1]]
    env, net, _ = start_flows(flows, delayed=False)
    env.run(until=1e-12)  # after the t=0 admission, before anything finishes
    groups = net.active_groups
    assert len(groups) == len(flows)
    load = np.zeros(len(TOPO.links))
    for g in groups:
        assert g.rate > 0
        load[g.links] += g.mult * g.rate
    cap = TOPO.links.capacity
    assert np.all(load <= cap * (1 + 1e-7))
    saturated = load >= cap * (1 - 1e-7)
    for g in groups:
        # A bottleneck: a saturated link where this flow's rate per weight is the largest.
        ok = False
        for link in g.links[saturated[g.links]]:
            others = [h.rate / h.weight for h in groups if link in h.links]
            if g.rate / g.weight >= max(others) * (1 - 1e-7):
                ok = True
                break
        assert ok, "flow without a bottleneck link"


@settings(max_examples=40, deadline=None)
@given(st.lists(flow, min_size=1, max_size=20))
def test_bytes_are_conserved_and_every_flow_finishes(flows):
    flows = [f for f in flows if f[0] != f[1]]
    env, net, done = start_flows(flows)
    env.run()
    assert sorted(done) == list(range(len(flows)))
    expect = np.zeros(len(TOPO.links))
    for s, d, size, _, _ in flows:
        expect[TOPO.path(s, d)] += size
    np.testing.assert_allclose(net.link_bytes, expect, rtol=1e-6, atol=1e-3)
    for i, (s, d, size, _, t0) in enumerate(flows):
        start, end = done[i]
        assert start == t0
        # No flow beats its path's slowest link running for it alone.
        assert end - start >= size / TOPO.links.capacity[TOPO.path(s, d)].min() * (1 - 1e-9)
    # A link is never busier than the time it carried traffic at full capacity.
    assert np.all(net.link_busy >= net.link_bytes / TOPO.links.capacity * (1 - 1e-9))


def test_flows_finishing_together_are_retired_together():
    env = simpy.Environment()
    net = FluidNetwork(env, TOPO)
    evs = [net.transfer_paths(TOPO.paths([r], [r + 4]), 1e8) for r in range(4)]  # share node 0's NIC
    env.run()
    ends = {e.value.end for e in evs}
    assert len(ends) == 1
    assert net.stats.rate_updates == 1  # one admission; the joint retirement leaves nothing to re-rate


def test_nothing_preempts_a_flow():
    """A late, heavy flow slows an early one but never stops it."""
    env = simpy.Environment()
    net = FluidNetwork(env, TOPO)
    first = net.transfer_paths(TOPO.paths([0], [4]), 1e9)

    def late():
        yield env.timeout(0.01)
        yield net.transfer_paths(TOPO.paths([1], [5]), 1e9, weight=100.0)

    env.process(late())
    env.run(until=0.0100001)
    early = [g for g in net.active_groups if g.start == 0.0]
    assert len(early) == 1 and early[0].rate > 0  # still moving, at a fair share
    env.run()
    assert first.value.end > 0.0100001


def test_identical_inputs_give_identical_results():
    flows = [(0, 5, 3e8, 1.0, 0.0), (1, 9, 7e8, 0.5, 1e-3), (4, 0, 2e8, 1.0, 2e-3), (2, 3, 9e8, 1.0, 0.0)]
    runs = []
    for _ in range(2):
        env, net, done = start_flows(flows)
        env.run()
        runs.append((done, net.link_bytes.tolist(), net.link_busy.tolist()))
    assert runs[0] == runs[1]
