"""NCCL's allreduce tuning model (lina_sim.network.nccl) and the allreduce that runs its
choice on the fluid network: ``algo`` auto (the default) / ring / tree / nvls and ``proto``,
as NCCL_ALGO / NCCL_PROTO."""

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pytest
import simpy

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network import nccl
from lina_sim.network.collectives import ALGORITHMS, PROTOCOLS, CollectiveAlgos, Collectives
from lina_sim.network.fluid import FluidNetwork
from lina_sim.training.run import _algos

MEASURED = Path("/work/shared/data/nccl-measured/nccl-tests")


def model_of(preset: str, nodes: int) -> nccl.NcclModel:
    c = load_preset(preset, nodes=nodes)
    g = c.gpus_per_node
    model, _ = nccl.model_for(Topology(c), [np.arange(k * g, (k + 1) * g) for k in range(nodes)])
    return model


def run(cluster, sizes_and_kw: list[tuple[float, dict]], algo: str = "auto", ranks=None) -> list[float]:
    """Start every allreduce at once on one fresh cluster; their durations (s). A kw
    ``algo`` overrides ``algo`` for that call."""
    env = simpy.Environment()
    coll = Collectives(FluidNetwork(env, Topology(cluster)))
    ranks = list(range(cluster.world_size)) if ranks is None else ranks
    procs = [coll.allreduce(ranks, size, **{"algo": algo, **kw}) for size, kw in sizes_and_kw]
    env.run()
    return [p.value.duration for p in procs]


def test_nccl_names_and_auto_default():
    assert CollectiveAlgos() == CollectiveAlgos(algo="auto", proto="auto", all_to_all="direct")
    assert ALGORITHMS["allreduce"] == ("auto", "ring", "tree", "nvls", "hierarchical", "flat-ring")
    assert PROTOCOLS == ("auto", "LL", "LL128", "Simple")
    assert {"flat", "direct", "hierarchical"} == set(ALGORITHMS["all_to_all"])
    assert _algos({"algo": "tree", "proto": "LL128"}) == CollectiveAlgos(algo="tree", proto="LL128")
    assert _algos({}) == CollectiveAlgos()


def test_auto_runs_nccls_choice_and_flat_ring_the_old_ring():
    c = load_preset("dgx-a100", nodes=4)
    for size in (8 << 10, 1 << 20, 1 << 30):
        a, p, t = nccl.predict(c, size)
        assert run(c, [(size, {})])[0] == pytest.approx(t, rel=0.02)
        assert run(c, [(size, {"algo": a, "proto": p})])[0] == pytest.approx(t, rel=0.02)
    # The default is NCCL's choice: the 4 KB allreduce is a tree, far faster than the flat ring.
    env = simpy.Environment()
    coll = Collectives(FluidNetwork(env, Topology(c)))
    assert coll.allreduce_choice(range(32), 4 << 10) == ("tree", "LL")
    assert coll.allreduce_choice(range(32), 4 << 10, "flat-ring") == ("flat-ring", "-")
    assert coll.allreduce_choice(range(32), 4 << 10, "hierarchical") == ("hierarchical", "-")
    assert coll.allreduce_choice(range(32), 0) == ("-", "-")
    assert run(c, [(4 << 10, {})])[0] * 10 < run(c, [(4 << 10, {})], "flat-ring")[0]


def test_auto_on_a_gpu_nccl_cannot_place_is_the_flat_ring():
    c = load_preset("paper-testbed")
    cpu = dataclasses.replace(c, gpu=dataclasses.replace(c.gpu, name="cpu-x86_64-1thread"))
    assert run(cpu, [(1 << 20, {})]) == run(cpu, [(1 << 20, {})], "flat-ring")
    with pytest.raises(ConfigError, match="gpu.name"):  # forcing NCCL's ring there is an error
        run(cpu, [(1 << 20, {})], "ring")


@pytest.mark.parametrize(
    "block,field,text",
    [
        ({"allreduce": "ring"}, "collectives.allreduce", "renamed to collectives.algo"),
        ({"allreduce": "nccl"}, "collectives.allreduce", "'nccl' is now collectives.algo: auto"),
        ({"algo": "nccl"}, "collectives.algo", "allowed: auto, ring, tree, nvls, hierarchical, flat-ring"),
        ({"proto": "ll"}, "collectives.proto", "allowed: auto, LL, LL128, Simple"),
        ({"algo": "flat-ring", "proto": "LL"}, "collectives.proto", "needs one of NCCL's algorithms"),
        ({"all_to_all": "ring"}, "collectives.all_to_all", "allowed: direct, hierarchical, flat"),
    ],
)
def test_scenario_block_errors(block, field, text):
    with pytest.raises(ConfigError) as e:
        _algos(block)
    assert e.value.field == field and text in str(e.value), str(e.value)


def test_scenario_nvls_needs_the_hardware():
    with pytest.raises(ConfigError) as e:
        _algos({"algo": "nvls"}, load_preset("dgx-a100", nodes=1))
    assert e.value.field == "collectives.algo" and "Hopper" in str(e.value)
    assert "allowed: auto, ring, tree, hierarchical, flat-ring" in str(e.value)
    with pytest.raises(ConfigError, match="collectives.algo"):  # across nodes
        _algos({"algo": "nvls"}, load_preset("dgx-h100", nodes=2))
    assert _algos({"algo": "nvls"}, load_preset("dgx-h100", nodes=1)).algo == "nvls"
    with pytest.raises(ConfigError, match="collectives.proto"):  # NVLS is Simple only
        _algos({"algo": "nvls", "proto": "LL"}, load_preset("dgx-h100", nodes=1))


CASES = [("dgx-a100", 1), ("dgx-h100", 1), ("dgx-a100", 4), ("dgx-h100", 2), ("dgx-h100", 5), ("paper-testbed", 4)]


@pytest.mark.parametrize("preset,nodes", CASES)
def test_each_forced_pair_alone_takes_the_modelled_time(preset, nodes):
    c = load_preset(preset, nodes=nodes)
    model = model_of(preset, nodes)
    sizes = [4 << 10, 1 << 20, 256 << 20]
    calls = [(s, {"algo": a, "proto": p}) for (a, p) in model.costs for s in sizes]
    for (size, kw), got in zip(calls, [run(c, [call])[0] for call in calls], strict=True):
        expect = model.time(kw["algo"], kw["proto"], size)
        assert got == pytest.approx(expect, rel=0.02), (kw, size)


@pytest.mark.parametrize(
    "ranks",
    [
        [0, 8, 16, 24, 32, 40, 48, 56],  # one GPU per node
        [1, 2, 9, 10, 11, 17, 18, 33],  # uneven: 2, 3, 2 and 1 GPU(s) on four nodes
    ],
)
def test_odd_communicators_take_the_modelled_time(ranks):
    c = load_preset("dgx-h100", nodes=8)
    topo = Topology(c)
    by_node = [np.array([r for r in ranks if r // 8 == k]) for k in sorted({r // 8 for r in ranks})]
    model, _ = nccl.model_for(topo, by_node)
    for (a, p), size in [(pair, size) for pair in model.costs for size in (8 << 10, 64 << 20)]:
        got = run(c, [(size, {"algo": a, "proto": p})], ranks=ranks)[0]
        assert got == pytest.approx(model.time(a, p, size), rel=0.02), (a, p, size)


def test_nccl_ring_simple_moves_bytes_as_fast_as_the_flat_ring():
    # The ring layout is lina-sim's flat ring: only the latency differs (NCCL's instead of the links').
    c = load_preset("dgx-a100", nodes=4)
    model = model_of("dgx-a100", 4)
    size = 1 << 30
    plain_small, plain_big = run(c, [(1.0, {})], "flat-ring")[0], run(c, [(size, {})], "flat-ring")[0]
    nccl_big = run(c, [(size, {"algo": "ring", "proto": "Simple"})])[0]
    assert nccl_big - model.latency("ring", "Simple", size) == pytest.approx(plain_big - plain_small, rel=0.01)


def test_tables_match_the_research_notes_latencies():
    # docs/nccl-tuning-model.md section 6.E: 1 node x 8 H100 and 4 nodes x 8 H100 (Intel).
    one = model_of("dgx-h100", 1)
    expect_one = {
        ("ring", "LL"): 15.0,
        ("ring", "LL128"): 40.6,
        ("ring", "Simple"): 56.0,
        ("tree", "LL"): 15.2,
        ("tree", "LL128"): 31.5,
        ("tree", "Simple"): 64.4,
        ("nvls", "Simple"): 25.0,
    }
    for pair, us in expect_one.items():
        assert one.cost(*pair).latency == pytest.approx(us * 1e-6, abs=0.05e-6), pair
    four = model_of("dgx-h100", 4)
    expect_four = {
        ("tree", "LL"): 35.2,
        ("tree", "LL128"): 65.5,
        ("tree", "Simple"): 120.4,
        ("ring", "LL"): 78.8,
        ("ring", "LL128"): 144.4,
        ("ring", "Simple"): 282.8,
    }
    for pair, us in expect_four.items():
        assert four.cost(*pair).latency == pytest.approx(us * 1e-6, abs=0.05e-6), pair
    assert ("nvls", "Simple") not in four.costs  # multi-node NVLS needs SHARP
    # NVLS on 8 H100: busBw = 2 x 0.85 x port x 7/8, algBw = busBw x 8/14 = 0.85 x port.
    port = one.raw["nvls"] * 7 / 8
    assert one.cost("nvls", "Simple").bandwidth == pytest.approx(0.85 * port)


def test_auto_choice_one_node():
    assert nccl.predict(load_preset("dgx-a100"), 8 << 10)[1] == "LL"
    assert nccl.predict(load_preset("dgx-a100"), 1 << 30)[:2] == ("ring", "Simple")
    assert nccl.predict(load_preset("dgx-h100"), 8 << 10)[1] == "LL"
    assert nccl.predict(load_preset("dgx-h100"), 1 << 30)[:2] == ("nvls", "Simple")


def test_auto_choice_multi_node():
    c = load_preset("dgx-a100", nodes=4)
    assert nccl.predict(c, 8 << 10)[:2] == ("tree", "LL")
    assert nccl.predict(c, 1 << 20)[0] == "tree"
    assert nccl.predict(c, 1 << 30)[:2] == ("ring", "Simple")
    # A restriction is honoured, as NCCL_ALGO / NCCL_PROTO are.
    assert nccl.predict(c, 8 << 10, algo="ring")[:2] == ("ring", "LL")
    assert nccl.predict(c, 8 << 10, proto="Simple")[:2] == ("tree", "Simple")


def test_1024_gpu_small_allreduce_is_fast_and_cheap():
    c = load_preset("dgx-a100", nodes=128)
    t0 = time.perf_counter()
    (nccl_time,) = run(c, [(4 << 10, {})])
    wall = time.perf_counter() - t0
    (ring_time,) = run(c, [(4 << 10, {})], "flat-ring")
    assert ring_time > 13e-3  # 2(n-1) steps of link latency
    assert nccl_time < 0.2e-3  # a tree: 2 x (7 chain hops + log2(128) network levels)
    assert nccl.predict(c, 4 << 10)[:2] == ("tree", "LL")
    assert wall < 10.0


def test_nvls_needs_nvswitch_sharp():
    with pytest.raises(ConfigError) as e:
        nccl.predict(load_preset("dgx-a100"), 1 << 20, algo="nvls")
    assert e.value.field == "algo" and "nvls" in str(e.value)
    with pytest.raises(ConfigError, match="algo") as e:
        run(load_preset("dgx-a100"), [(1 << 20, {})], "nvls")
    assert e.value.field == "algo" and "auto, ring, tree, hierarchical, flat-ring" in str(e.value)
    with pytest.raises(ConfigError, match="algo"):  # raised at the call, before anything runs
        Collectives(FluidNetwork(simpy.Environment(), Topology(load_preset("dgx-h100", nodes=2)))).allreduce(
            range(16), 1 << 20, "nvls"
        )
    with pytest.raises(ConfigError, match="algo"):  # across nodes NVLS needs IB SHARP
        nccl.predict(load_preset("dgx-h100", nodes=2), 1 << 20, algo="nvls")
    with pytest.raises(ConfigError) as e:  # NVLS is Simple only
        nccl.predict(load_preset("dgx-h100"), 1 << 20, algo="nvls", proto="LL")
    assert e.value.field == "proto"


@pytest.mark.parametrize("kw,field", [({"algo": "collnet"}, "algo"), ({"proto": "ll"}, "proto")])
def test_unknown_names_are_config_errors(kw, field):
    with pytest.raises(ConfigError) as e:
        nccl.predict(load_preset("dgx-h100"), 1 << 20, **kw)
    assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        run(load_preset("dgx-h100"), [(1 << 20, kw)])
    assert e.value.field == field
    with pytest.raises(ConfigError):  # even when there is nothing to move
        run(load_preset("dgx-h100"), [(0, kw)])
    for algo in ("flat-ring", "hierarchical"):  # a protocol only with NCCL's algorithms
        with pytest.raises(ConfigError) as e:
            run(load_preset("dgx-h100"), [(1 << 20, {"proto": "LL"})], algo)
        assert e.value.field == "proto" and "auto|ring|tree|nvls" in str(e.value)


def test_unknown_gpu_is_a_config_error():
    c = load_preset("dgx-a100")
    c = dataclasses.replace(c, gpu=dataclasses.replace(c.gpu, name="mystery"))
    with pytest.raises(ConfigError, match="gpu.name"):
        nccl.predict(c, 1 << 20)


@pytest.mark.parametrize(
    "preset,nodes,size", [("dgx-a100", 1, 64 << 20), ("dgx-a100", 4, 8 << 20), ("dgx-h100", 1, 1 << 30)]
)
def test_two_concurrent_nccl_allreduces_contend(preset, nodes, size):
    c = load_preset(preset, nodes=nodes)
    (alone,) = run(c, [(size, {})])
    both = run(c, [(size, {}), (size, {})])
    assert min(both) > alone * 1.2


def test_double_binary_tree_shape():
    # trees.cc's figure: 0 -> 8 -> {4, 12}, 4 -> {2, 6} on 16 ranks.
    assert [nccl.btree_parent(r, 16) for r in (8, 4, 12, 2, 6, 0)] == [0, 8, 8, 4, 4, -1]
    for n in range(2, 40):
        trees = nccl.dtree_edges(n)
        for edges in trees:
            assert len(edges) == n - 1  # a spanning tree
        # No node sends on more than four tree links in the two trees together (an inner
        # node in one, a leaf in the other): the tree's NIC load stays that of a ring.
        out = np.zeros(n, int)
        for edges in trees:
            for child, parent in edges:
                out[child] += 1
                out[parent] += 1
        assert out.max() <= 4 if n > 2 else out.max() <= 2


def _measured(name: str) -> dict[int, float]:
    """Out-of-place time (s) per size (bytes) of an nccl-tests all_reduce_perf log."""
    rows = {}
    for line in (MEASURED / name).read_text().splitlines():
        f = line.split()
        if len(f) > 6 and re.fullmatch(r"\d+", f[0]) and f[3] == "sum":
            rows.setdefault(int(f[0]), float(f[5]) * 1e-6)
    return rows


@pytest.mark.skipif(not MEASURED.exists(), reason="no shipped nccl-tests measurements")
def test_sanity_against_measured_nccl(capsys):
    """Not a calibration: prints predicted vs measured for a few points, and only asserts
    that the auto choice stays within a factor of three."""
    points = [
        ("a100-1x8-allreduce-1.txt", "dgx-a100", 1, [8 << 10, 8 << 20, 64 << 20]),
        ("h100-8x8-allreduce-1.txt", "dgx-h100", 8, [1 << 20, 64 << 20]),
        ("h100-1x8-allreduce-1.txt", "dgx-h100", 1, [64 << 20, 1 << 30]),
    ]
    lines = []
    for name, preset, nodes, sizes in points:
        if not (MEASURED / name).exists():
            continue
        measured = _measured(name)
        model = model_of(preset, nodes)
        for size in sizes:
            if size not in measured:
                continue
            auto = model.choose(size)
            t = model.time(*auto, size)
            per_pair = " ".join(f"{a}/{p}={model.time(a, p, size) * 1e6:.0f}" for a, p in model.costs)
            lines.append(
                f"{preset} x{nodes} {size:>10} B: measured {measured[size] * 1e6:7.1f} us, auto {auto[0]}/{auto[1]}"
                f" {t * 1e6:7.1f} us ({t / measured[size] - 1:+.0%}); {per_pair}"
            )
            assert 1 / 3 < t / measured[size] < 3
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_corrections_change_the_time_not_nccls_choice():
    """A calibrated profile's latency corrections (NcclSpec) make the chosen pair slower,
    but NCCL still chooses with its own constants; Simple's scale leaves LL alone."""
    base = load_preset("dgx-h100", nodes=2)
    slow = dataclasses.replace(
        base, nccl=dataclasses.replace(base.nccl, intra_latency_scale=5.0, simple_latency_scale=3.0)
    )
    by_node = [np.arange(8), np.arange(8, 16)]
    m0, _ = nccl.model_for(Topology(base), by_node)
    m1, _ = nccl.model_for(Topology(slow), by_node)
    for size in (4 << 10, 1 << 20, 64 << 20, 1 << 30):
        pair = m0.choose(size)
        assert m1.choose(size) == pair
        assert m1.time(*pair, size) > m0.time(*pair, size)
    ll = m0.latency("ring", "LL", 4096), m1.latency("ring", "LL", 4096)
    simple = m0.latency("ring", "Simple", 4096), m1.latency("ring", "Simple", 4096)
    assert simple[1] / simple[0] > ll[1] / ll[0]  # Simple scaled by both factors


def test_channel_counts_follow_nccls_duplication_rules():
    """comm->nChannels: the search's channels, duplicated below 50 GB/s only with at most 4
    channels on Hopper (search.cc ncclTopoDupChannels), doubled by ncclTopoPostset, then
    bounded by NCCL_MIN_CTAS / NCCL_MAX_CTAS; the tuning model's own channel x speed
    product is unchanged by the duplication."""
    assert nccl.dup_factor(nccl.ARCHS.index("hopper"), 45.0, 1.04) == 2
    assert nccl.dup_factor(nccl.ARCHS.index("hopper"), 45.0, 8.4) == 1
    assert nccl.dup_factor(nccl.ARCHS.index("ampere"), 20.0, 1.0) == 1
    assert nccl.dup_factor(nccl.ARCHS.index("ampere"), 30.0, 8.0) == 2
    h100 = load_preset("dgx-h100", nodes=2)
    lone, _ = nccl.model_for(Topology(h100), [np.array([0]), np.array([8])])  # 1 GPU per node
    assert lone.channels * lone.graph_speed == pytest.approx(h100.nic.effective_bandwidth / 1e9)
    assert lone.graph_speed == 22.5 and lone.comm_channels == pytest.approx(2 * lone.channels)
    whole = model_of("dgx-h100", 2)  # 8 channels at 45 GB/s: not duplicated on Hopper
    assert whole.graph_speed == 45.0 and whole.comm_channels == pytest.approx(2 * whole.channels)
    shape = dataclasses.replace(whole.shape, min_ctas=24)
    assert nccl.comm_channels(shape, whole.channels, whole.graph_speed) == 24
    shape = dataclasses.replace(whole.shape, max_ctas=8)
    assert nccl.comm_channels(shape, whole.channels, whole.graph_speed) == 8
    # Hopper, across nodes, bwIntra > 45 with fewer than 16 channels: doubled again.
    assert nccl.comm_channels(whole.shape, 4.0, 48.0) == 16


def test_collective_corrections_change_one_node_ring_and_tree_only():
    """collective_efficiency scales the one-node ring and tree bandwidths over NVLink (not
    NVLS, not layouts across PCIe or nodes) and collective_latency_scale their intra-node
    latencies; NCCL still chooses with its own table."""
    base = load_preset("dgx-h100")
    fixed = dataclasses.replace(
        base, nccl=dataclasses.replace(base.nccl, collective_efficiency=0.5, collective_latency_scale=2.0)
    )

    def table(cluster, nodes):
        c = cluster.with_nodes(nodes)
        return nccl.model_for(Topology(c), [np.arange(k * 8, k * 8 + 8) for k in range(nodes)])[0]

    one, one_fixed = table(base, 1), table(fixed, 1)
    for algo in ("ring", "tree"):
        assert one_fixed.cost(algo, "Simple").bandwidth == pytest.approx(0.5 * one.cost(algo, "Simple").bandwidth)
        assert one_fixed.cost(algo, "LL").latency == pytest.approx(2 * one.cost(algo, "LL").latency)
    assert one_fixed.cost("nvls", "Simple").bandwidth == one.cost("nvls", "Simple").bandwidth
    for size in (1 << 10, 1 << 20, 1 << 30):
        assert one_fixed.choose(size) == one.choose(size)
    two, two_fixed = table(base, 2), table(fixed, 2)
    assert two_fixed.cost("ring", "Simple").bandwidth == two.cost("ring", "Simple").bandwidth


def test_tree_pattern_follows_nccls_search():
    """search.cc ncclTopoCompute: one GPU per node, or Hopper across nodes with a NIC per
    GPU (the balanced tree's second GPU has no PIX path to the channel's NIC), ends with
    the TREE pattern, whose tree bandwidth tuning.cc multiplies by 0.85 after the
    protocol caps; one node, pre-Hopper and shared NICs keep BALANCED_TREE."""
    hopper, ampere = nccl.ARCHS.index("hopper"), nccl.ARCHS.index("ampere")
    assert nccl.tree_search_pattern(hopper, 8, 8, own_nic=True) == "TREE"
    assert nccl.tree_search_pattern(hopper, 8, 8, own_nic=False) == "BALANCED_TREE"
    assert nccl.tree_search_pattern(hopper, 1, 8, own_nic=True) == "BALANCED_TREE"
    assert nccl.tree_search_pattern(ampere, 8, 8, own_nic=True) == "BALANCED_TREE"
    assert nccl.tree_search_pattern(ampere, 10, 1, own_nic=True) == "TREE"
    assert model_of("dgx-a100", 8).shape.tree_pattern == "BALANCED_TREE"
    assert model_of("dgx-h100", 1).shape.tree_pattern == "BALANCED_TREE"
    h100 = model_of("dgx-h100", 8)
    assert h100.shape.tree_pattern == "TREE"
    balanced = nccl.NcclModel.tune(
        dataclasses.replace(h100.shape, tree_pattern="BALANCED_TREE"),
        h100.raw,
        h100.channels,
        h100.comm_channels,
        h100.graph_speed,
    )
    for (algo, proto), cost in h100.costs.items():
        factor = 0.85 if algo == "tree" else 1.0
        assert cost.bandwidth == pytest.approx(factor * balanced.cost(algo, proto).bandwidth), (algo, proto)
        assert cost.latency == balanced.cost(algo, proto).latency
    # NCCL's own table now hands 64 MiB on 8 x 8 H100 to the ring (the balanced tree kept it).
    assert balanced.choose(64 << 20)[0] == "tree"
    assert h100.choose(64 << 20) == ("ring", "LL128")


def test_tree_efficiency_is_seen_by_nccls_choice_and_its_latency_scale_is_not():
    """tree_efficiency is the tree graph NCCL's search finds on the cluster: it slows the
    tree and NCCL, ranking with it, hands sizes to the ring earlier; tree_latency_scale
    and net_overhead_scale correct NCCL's constants: the time changes, the choice does not."""
    base = load_preset("dgx-h100", nodes=8)
    by_node = [np.arange(k * 8, k * 8 + 8) for k in range(8)]

    def model(**nccl_fields):
        c = dataclasses.replace(base, nccl=dataclasses.replace(base.nccl, **nccl_fields))
        return nccl.model_for(Topology(c), by_node)[0]

    m0, slow_tree = model(), model(tree_efficiency=0.4)
    assert slow_tree.cost("tree", "LL128").bandwidth == pytest.approx(0.4 * m0.cost("tree", "LL128").bandwidth)
    assert slow_tree.cost("ring", "LL128") == m0.cost("ring", "LL128")
    sizes = [1 << k for k in range(16, 31)]
    first_ring = [next(s for s in sizes if m.choose(s)[0] == "ring") for m in (m0, slow_tree)]
    assert first_ring[1] < first_ring[0]
    late = model(tree_latency_scale=3.0, net_overhead_scale=2.0)
    for size in sizes:
        pair = m0.choose(size)
        assert late.choose(size) == pair
        assert late.time(*pair, size) > m0.time(*pair, size)
    assert late.cost("tree", "LL").latency == pytest.approx(3 * m0.cost("tree", "LL").latency)
    assert late.cost("ring", "Simple").latency > m0.cost("ring", "Simple").latency
