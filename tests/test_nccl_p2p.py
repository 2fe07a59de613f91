"""NCCL's grouped point-to-point model (lina_sim.network.nccl_p2p) and the all-to-all /
sendrecv that run it on the fluid network."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import simpy

from lina_sim.hardware.spec import load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network import nccl
from lina_sim.network.collectives import Collectives
from lina_sim.network.fluid import FluidNetwork
from lina_sim.network.nccl_p2p import NIC, NVLINK, P2pComm
from lina_sim.network.serving_a2a import AllToAllTimer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nccl-measured"
US = 1e-6
NVL_CH = 20.6e9  # topo.h ncclTopoNVLinkBw(sm90): one p2p channel on NVLink (the model's assumption)
NET_CH = 14e9  # paths.cc NCCL_P2P_PER_CHANNEL_NET_BW


def comm_of(cluster, ranks_per_node: int) -> P2pComm:
    topo = Topology(cluster)
    g = cluster.gpus_per_node
    return P2pComm.of(topo, [np.arange(k * g, k * g + ranks_per_node) for k in range(cluster.nodes)])


def run(cluster, op, ranks, size, algo=None):
    env = simpy.Environment()
    net = FluidNetwork(env, Topology(cluster))
    coll = Collectives(net)
    if op == "sendrecv":
        p = coll.send_recv(ranks, size, algo=algo or "p2p")
    else:
        p = coll.all_to_all(ranks, size, algo or "direct")
    env.run()
    return p.value, coll, net


# -- the model --------------------------------------------------------------------------------
def test_channels_follow_nccls_p2p_scheduling():
    one = comm_of(load_preset("dgx-h100"), 8)
    # 32 p2p channels on DGX H100; 8 ranks -> 4 channels per peer, 64 KiB minimum parts,
    # doubling once a part passes 16 MiB (32 x the 512 KiB NVLink chunk).
    assert (one.channels, one.per_peer, one.channels_min, one.chunk) == (32, 32, 4, 1 << 19)
    assert list(one.channels_for([1, 64 << 10, 128 << 10, 4 << 20, 64 << 20, 128 << 20])) == [1, 1, 2, 4, 4, 8]
    two = comm_of(load_preset("dgx-h100", nodes=2), 8)
    # Across nodes: 4 channels per network peer (ceil(50 / 14)), 128 KiB chunks.
    assert (two.per_peer, two.channels_min, two.chunk) == (4, 1, 1 << 17)
    assert list(two.channels_for([32 << 10, 256 << 10, 64 << 20])) == [1, 2, 4]


def test_the_chunk_follows_the_communicators_own_gpus():
    pairs = load_preset("a100-pcie-nvlink-pairs")
    # NCCL builds a communicator's topology from its own GPUs: a bridged pair is all
    # NVLink (512 KiB chunks, so 64 MiB stays on 8 channels); the whole node, whose pairs
    # meet over PCIe, is not (128 KiB).
    pair = comm_of(pairs, 2)
    assert pair.chunk == 1 << 19
    assert list(pair.channels_for([1 << 20, 64 << 20])) == [8, 8]
    assert comm_of(pairs, pairs.gpus_per_node).chunk == 1 << 17


def test_protocol_switches_from_ll_to_simple_by_bytes_per_channel():
    one = comm_of(load_preset("dgx-h100"), 8)
    sizes = np.array([8 << 10, 16 << 10, (16 << 10) + 1, 1 << 20])
    nch = one.channels_for(sizes)
    assert list(one.is_ll(sizes, nch, NVLINK)) == [True, True, False, False]
    assert not one.is_ll(np.array([8 << 10]), np.array([1.0]), NIC).any()  # no LL buffers on the network
    # LL halves the goodput (8-byte flag per 8 bytes) and is capped by llMaxBw.
    cap, eta = one.cap(np.array([8 << 10, 1 << 20]), NVLINK, 1.0)
    assert eta.tolist() == [0.5, 1.0]
    assert cap[0] == pytest.approx(0.5 * NVL_CH) and cap[1] == pytest.approx(4 * NVL_CH)


def test_latency_uses_ncclss_constants_and_grows_with_peers():
    base, hw = nccl.BASE_LAT_US["ring"], nccl.HW_LAT_US
    one = comm_of(load_preset("dgx-h100"), 8)
    src = np.repeat(np.arange(8), 7)
    kinds = np.full(src.size, NVLINK)
    assert one.latency(src, np.full(src.size, 1024.0), kinds) == pytest.approx((base[0] + hw["nvlink"]["ring"][0]) * US)
    assert one.latency(src, np.full(src.size, 1e6), kinds) == pytest.approx((base[2] + hw["nvlink"]["ring"][2]) * US)
    # Uniform small all-to-alls: more peers, more network peers and more work batches.
    lat = []
    for nodes in (1, 2, 4, 16, 64):
        c = load_preset("dgx-h100", nodes=nodes)
        n = c.world_size
        comm = comm_of(c, 8)
        s, d = np.nonzero(~np.eye(n, dtype=bool))
        k = np.where(s // 8 == d // 8, NVLINK, NIC)
        lat.append(comm.latency(s, np.full(s.size, 4096.0), k))
    assert all(a < b for a, b in zip(lat, lat[1:]))
    # 2 nodes: Simple over the network (8.4 + 14 us), plus 1 us per network peer (8).
    assert lat[1] == pytest.approx((base[2] + hw["net"]["ring"][2] + 8 * 1.0) * US)


# -- on the fluid network ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,per_peer_rate",
    [
        # 8 MiB per peer: 4 channels x 20.6 GB/s > the NVSwitch port's share (360 / 7): link-bound.
        (64 << 20, lambda c: c.nvlink.effective_bandwidth / 7),
        # 128 KiB per peer: 2 channels (64 KiB parts), Simple: the channels bind.
        (1 << 20, lambda c: 2 * NVL_CH),
        # 8 KiB per peer: 1 channel, LL: half of one channel.
        (64 << 10, lambda c: 0.5 * NVL_CH),
    ],
)
def test_alone_all_to_all_takes_the_models_time(size, per_peer_rate):
    c = load_preset("dgx-h100")
    res, coll, _ = run(c, "all_to_all", range(8), size)
    proto = 0 if size // 8 <= 16 << 10 else 2
    lat = (nccl.BASE_LAT_US["ring"][proto] + nccl.HW_LAT_US["nvlink"]["ring"][proto]) * US
    rate = min(per_peer_rate(c), c.nvlink.effective_bandwidth / 7 * (0.5 if proto == 0 else 1.0))
    assert res.duration == pytest.approx(lat + size / 8 / rate, rel=1e-9)


def test_alone_sendrecv_across_nodes_is_nic_bound():
    c = load_preset("dgx-h100", nodes=2)
    res, _, _ = run(c, "sendrecv", [0, 8], 64 << 20)
    # A 2-rank, 2-node communicator: one search channel at 45 GB/s, duplicated
    # (ncclTopoDupChannels) and doubled (ncclTopoPostset): 4 p2p channels; the 64 MiB
    # message uses all 4 per peer (4 x 14 GB/s = 56 GB/s), so the NIC (47 GB/s) binds.
    comm = comm_of(c, 1)
    assert (comm.channels, comm.per_peer) == (4, 4)
    assert 4 * NET_CH > c.nic.effective_bandwidth
    lat = (nccl.BASE_LAT_US["ring"][2] + nccl.HW_LAT_US["net"]["ring"][2] + 1.0) * US
    assert (res.op, res.algo) == ("sendrecv", "p2p")
    assert res.duration == pytest.approx(lat + (64 << 20) / c.nic.effective_bandwidth, rel=1e-9)
    assert run(c, "sendrecv", [3], 1 << 20)[0].duration == 0.0


def test_flat_reproduces_the_pre_nccl_numbers():
    c = load_preset("dgx-a100")
    n = g = c.gpus_per_node
    size = 64 << 20
    res, _, _ = run(c, "all_to_all", range(n), size, "flat")
    assert res.duration == pytest.approx(c.nvlink.latency + size * (g - 1) / n / c.nvlink.effective_bandwidth, rel=1e-9)
    h = load_preset("dgx-h100", nodes=2)
    inter = 2 * h.pcie.latency + 2 * h.nic.latency + h.switch_latency
    bw = min(h.nic.effective_bandwidth, h.pcie.effective_bandwidth)
    res, _, _ = run(h, "sendrecv", [0, 8], size, "flat")
    assert res.algo == "flat" and res.duration == pytest.approx(inter + size / bw, rel=1e-9)


def test_concurrent_allreduce_still_shares_links_with_the_all_to_all():
    c = load_preset("dgx-h100", nodes=2)
    c = dataclasses.replace(c, nic=dataclasses.replace(c.nic, latency=0.0), switch_latency=0.0)
    n = c.world_size
    alone, _, _ = run(c, "all_to_all", range(n), 256 << 20)
    env = simpy.Environment()
    net = FluidNetwork(env, Topology(c))
    coll = Collectives(net)
    pa = coll.all_to_all(range(n), 256 << 20)
    coll.allreduce(range(n), 8 << 30, "flat-ring")  # long enough to overlap the whole all-to-all
    env.run(until=pa)
    assert pa.value.duration > 1.05 * alone.duration  # the NICs are shared, fairly
    report = net.link_report()
    assert (report[report["kind"] == "nic"]["bytes"] > 0).all()


def test_uneven_matrices_run_and_match_the_serving_timer():
    c = load_preset("dgx-h100", nodes=2)
    topo = Topology(c)
    n = c.world_size
    rng = np.random.default_rng(3)
    m = rng.integers(0, 4 << 20, size=(n, n)).astype(float)
    m[rng.random((n, n)) < 0.5] = 0.0
    m[0, 9] = 256 << 20  # one heavy pair across nodes
    timer = AllToAllTimer(c, algo="direct", topology=topo)
    for algo in ("direct", "hierarchical"):
        res, _, _ = run(c, "all_to_all", range(n), m, algo)
        assert res.duration > 0
        if algo == "direct":
            assert timer.times(m) == pytest.approx(res.duration, rel=1e-9)
    # The heavy pair is one connection: 4 channels x 14 GB/s, or its NIC share, whichever is less.
    res, _, _ = run(c, "all_to_all", range(n), m)
    assert res.duration >= (256 << 20) / (4 * NET_CH)


def test_hierarchical_is_two_grouped_p2p_calls():
    c = load_preset("dgx-a100", nodes=2)
    n, g = c.world_size, c.gpus_per_node
    size = 64 << 20
    # Phase 1: (a, l) -> (a, l') carries all (a, l) sends to local index l' anywhere
    # (nodes x size/n = size/g); phase 2: (a, l') -> (b, l') carries what node a sends to
    # (b, l') (g x size/n = size/nodes).
    same_node = np.arange(n)[:, None] // g == np.arange(n)[None, :] // g
    same_local = np.arange(n)[:, None] % g == np.arange(n)[None, :] % g
    p1 = np.where(same_node, size / g, 0.0)
    p2 = np.where(same_local & ~same_node, size / 2, 0.0)
    hier, _, _ = run(c, "all_to_all", range(n), size, "hierarchical")
    one = run(c, "all_to_all", range(n), p1)[0].duration + run(c, "all_to_all", range(n), p2)[0].duration
    assert hier.duration == pytest.approx(one, rel=1e-9)
    assert hier.steps == 2


def test_a_large_uniform_all_to_all_stays_a_few_flow_groups():
    c = load_preset("dgx-h100", nodes=32)
    _, coll, net = run(c, "all_to_all", range(c.world_size), 64 << 20)
    assert net.stats.groups_started <= 4


# -- against measurements ---------------------------------------------------------------------
# (file, table label) -> (size range in bytes, bound on the median |error| in %): what the
# model achieves on dgx-h100 (see docs/nccl-tuning-model.md §7), rounded up.
BOUNDS = {
    ("nccl-tests/h100-1x8-alltoall-1.txt", "h100-1x8-alltoall-1"): [((64 << 20, 1 << 40), 10.0)],
    ("nccl-tests/h100-2x8-alltoall-1.txt", "h100-2x8-alltoall-1"): [((64 << 20, 1 << 40), 10.0)],
    ("nccl-tests/h100-1x8-sendrecv-1.txt", "h100-1x8-sendrecv-1"): [((64 << 20, 1 << 40), 10.0)],
    ("nccl-tests/h100-2x8-sendrecv-1.txt", "h100-2x8-sendrecv-1"): [((64 << 20, 1 << 40), 10.0)],
    ("vidur/h100_dgx_send_recv.csv", "h100_dgx_send_recv[1x2]"): [((8 << 10, 8 << 20), 30.0)],
    ("vidur/h100_dgx_send_recv.csv", "h100_dgx_send_recv[2x1]"): [((8 << 10, 8 << 20), 35.0)],
}


@pytest.mark.parametrize("key", list(BOUNDS), ids=[k[1] for k in BOUNDS])
def test_measured_tables_within_the_achieved_error(key):
    if not SHARED.is_dir():
        pytest.skip(f"no measured data beside the project ({SHARED})")
    from lina_sim.experiments.measured import measured_tables, read_measured, table_config
    from lina_sim.experiments.microbench import compare_measured, shape_for

    path, label = key
    tables = dict(measured_tables([read_measured(SHARED / path)]))
    table = tables[label]
    shape = shape_for(load_preset("dgx-h100"), table_config(label, table))
    cmp = compare_measured(shape, table)
    for (lo, hi), bound in BOUNDS[key]:
        rows = cmp[(cmp["size_bytes"] >= lo) & (cmp["size_bytes"] <= hi)]
        assert len(rows) > 0
        assert rows["error_pct"].abs().median() <= bound
