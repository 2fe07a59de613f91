"""The engine's one-replica reduction (lina_sim/training/engine.py, ``replica_size``):
simulating one block of data-parallel replicas gives the step of simulating every rank,
at 64 and 256 GPUs, for every training policy; and it is not used where the replicas are
not interchangeable."""

from __future__ import annotations

import pytest

from lina_sim.config.scenario import expand
from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import cluster_from_dict, read_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network.alone import AloneTimes
from lina_sim.network.collectives import CollectiveAlgos
from lina_sim.policies.registry import TRAINING_POLICIES, make_training_policy
from lina_sim.training.breakdown import mean_breakdown
from lina_sim.training.engine import StepResult, TrainingEngine, replica_size, replica_size_estimate
from lina_sim.training.run import choose_shape, resolve_training
from lina_sim.workload.graph import build_training_graph, packing_candidates
from lina_sim.workload.model import model_from_dict

LAYERS = 4  # deepseek-moe-16b's shape, fewer layers: layer 0 dense, 1..3 MoE


def cluster(preset: str = "dgx-h100-superpod", nodes: int = 8, **over):
    data, _ = read_preset(preset)
    return cluster_from_dict({**data, "nodes": nodes, **over})


def model(experts: int, world: int):
    d = {"preset": "deepseek-moe-16b", "experts": experts, "layers": LAYERS, "moe_layers": list(range(1, LAYERS))}
    return model_from_dict(d, world_size=world)


def both(c, experts: int, policy_name: str, k: int = 1, algos: CollectiveAlgos = CollectiveAlgos()):
    """(every-rank result, reduced result, ranks the reduced run simulated)."""
    policy = make_training_policy(policy_name)
    g = build_training_graph(
        model(experts, c.world_size), c, k, policy.pipeline_degree, dispatch_kernels=policy.dispatch_kernels
    )
    topo = Topology(c)
    alone = AloneTimes(c, algos, topo)
    op_time = RooflineComputeModel.from_cluster(c, "bf16").op_time
    full = TrainingEngine(g, policy, c, op_time, algos, topo, alone=alone, all_ranks=True).run()
    engine = TrainingEngine(g, policy, c, op_time, algos, topo, alone=alone)
    return full, engine.run(), engine.block


# Where flows of several replicas share a contended link, one flow group of every copy's
# flows and one group per copy (the every-rank run) solve the same max-min rates in a
# different order: equal to float rounding (seen: 1 ulp), not always to the bit.
REL = 1e-12


def assert_same_step(full: StepResult, reduced: StepResult) -> None:
    """Same step time and, for every collective, the same [start, end) as every copy of it
    in the every-rank run; the same counts; the same mean breakdown (to float rounding)."""
    assert reduced.step_time == pytest.approx(full.step_time, rel=REL)
    assert reduced.collective_count == full.collective_count == len(full.collectives)
    by_id: dict[str, list] = {}
    for c in full.collectives:
        by_id.setdefault(c.mop.id, []).append(c)
    matched = 0
    u = reduced.block
    class_of = {b: cls for cls in reduced.classes for b in cls}
    for c in reduced.collectives:
        # Its copies: its group translated to every block of its class.
        j = c.group[0] // u
        heads = {c.group[0] + (i - j) * u for i in class_of[j]} if c.copies > 1 else {c.group[0]}
        copies = [x for x in by_id[c.mop.id] if x.group[0] in heads]
        assert len(copies) == c.copies, c.mop.id
        for x in copies:
            assert (x.start, x.end) == pytest.approx((c.start, c.end), rel=REL), (c.mop.id, x.group[:4])
        matched += len(copies)
    assert matched == len(full.collectives)
    want, got = mean_breakdown(full.timeline, full.step_time), reduced.mean_breakdown()
    assert got == pytest.approx(want, rel=REL, abs=1e-15)
    # The reduced timeline is the every-rank timeline's simulated ranks, event for event.
    keys = ["rank", "stream", "op"]
    simulated = full.timeline["rank"].isin(reduced.timeline["rank"].unique())
    assert simulated.sum() == len(reduced.timeline)
    head = full.timeline[simulated].sort_values(keys).reset_index(drop=True)
    mine = reduced.timeline.sort_values(keys).reset_index(drop=True)
    assert head[keys].equals(mine[keys])
    for col in ("start", "end"):
        assert mine[col].to_numpy() == pytest.approx(head[col].to_numpy(), rel=REL, abs=1e-15)


@pytest.mark.parametrize("policy", sorted(TRAINING_POLICIES))
@pytest.mark.parametrize(
    "nodes, experts, over",
    [
        (8, 16, {}),  # 64 GPUs: 4 replicas of 2 nodes, one leaf
        (32, 64, {}),  # 256 GPUs: 4 replicas of 8 nodes, one SU
        # 256 GPUs, 4-node leaves at 2:1: every replica crosses the (contended) spines.
        (32, 64, {"nodes_per_leaf": 4, "leaf_oversubscription": 2.0}),
    ],
)
def test_one_replica_gives_the_every_rank_step(policy, nodes, experts, over):
    full, reduced, sim = both(cluster(nodes=nodes, **over), experts, policy)
    assert full.ranks == full.world_size == nodes * 8
    assert sim == experts  # blocks of one replica
    assert reduced.ranks == sim * len(reduced.classes)  # one block per class simulated
    assert_same_step(full, reduced)


def test_replicas_that_a_tree_loads_unlike_run_as_classes():
    # 128 GPUs, 8 replicas of 2 nodes: NCCL's double binary tree over the 16 nodes (dp)
    # gives replicas' NICs unlike loads, beside DeepSpeed's all-to-alls; the replicas whose
    # links it loads alike form a class, simulated as its first replica.
    full, reduced, sim = both(cluster(nodes=16), 16, "deepspeed")
    assert sim == 16 and 1 < len(reduced.classes) < 8
    assert sorted(b for c in reduced.classes for b in c) == list(range(8))
    assert any(len(c) > 1 for c in reduced.classes)
    assert reduced.ranks == 16 * len(reduced.classes)
    assert_same_step(full, reduced)


def test_one_class_where_allreduces_across_replicas_never_meet_an_all_to_all():
    # Lina runs gradient allreduces apart from the all-to-alls: the trees' unlike loads
    # never meet one, so one replica stands for all, as for the no-contention bound
    # (allreduces on their own copy of the links).
    for policy in ("lina-partition", "no-contention"):
        full, reduced, sim = both(cluster(nodes=16), 16, policy)
        assert len(reduced.classes) == 1 and reduced.ranks == sim == 16, policy
        assert_same_step(full, reduced)


@pytest.mark.parametrize("policy", ["lina", "deepspeed"])
def test_replicas_inside_a_node_simulate_one_node(policy):
    # 16 experts, 4 per GPU: replicas of 4 GPUs, two per node; the node is the block.
    full, reduced, sim = both(cluster(nodes=8), 16, policy, k=4)
    assert sim == 8 and reduced.ranks == 8 * len(reduced.classes)
    assert_same_step(full, reduced)


def test_hierarchical_collectives_stay_identical():
    algos = CollectiveAlgos(algo="hierarchical", all_to_all="hierarchical")
    full, reduced, sim = both(cluster(nodes=8), 16, "deepspeed", algos=algos)
    assert sim == 16
    assert_same_step(full, reduced)


def test_every_rank_where_replicas_differ():
    # 3-node leaves: the 2-node replica on nodes 2-3 straddles a leaf boundary, replica 0 does not.
    c = cluster(nodes=8, nodes_per_leaf=3)
    g = build_training_graph(model(16, c.world_size), c, 1)
    assert replica_size(g, c, Topology(c)) == c.world_size
    # Ranks sharing a host's cores: every rank's compute slows the others'.
    for cores, sim in ((8, 4), (2, 8)):  # 2 replicas of one 4-GPU node; 8 cores: one per rank
        c = cluster("paper-testbed", nodes=2, host={"cores": cores})
        g = build_training_graph(model(8, c.world_size), c, 2)
        assert replica_size(g, c, Topology(c)) == sim
    # One replica is the whole world: nothing to reduce.
    c = cluster(nodes=2)
    g = build_training_graph(model(16, c.world_size), c, 1)
    assert replica_size(g, c, Topology(c)) == c.world_size


@pytest.mark.parametrize(
    "preset, nodes, over",
    [
        ("dgx-h100-superpod", 32, {}),
        ("dgx-h100-superpod", 8, {"nodes_per_leaf": 3}),
        ("dgx-h100-superpod", 16, {"nodes_per_leaf": 4, "leaf_oversubscription": 2.0}),
        ("dgx-a100", 16, {}),
        ("a100-pcie-nvlink-pairs", 8, {}),
        ("paper-testbed", 4, {}),
        ("paper-testbed", 4, {"host": {"cores": 4}}),
    ],
)
def test_the_guards_estimate_of_the_simulated_ranks_is_what_the_engine_picks(preset, nodes, over):
    c = cluster(preset, nodes=nodes, **over)
    m = model(16, c.world_size)
    topo = Topology(c)
    for k in packing_candidates(m, c.world_size):
        g = build_training_graph(m, c, k)
        assert replica_size_estimate(c, m.experts // k) == replica_size(g, c, topo), k


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(TRAINING_POLICIES))
def test_at_2048_gpus_the_classes_give_the_every_rank_step(policy):
    """Eight scalable units, the whole model: NCCL's trees and rings across replicas load
    replicas unevenly (the engine's docstring); simulating one replica per class of
    alike replicas gives the every-rank step, every collective's [start, end) and the
    breakdown to float rounding. Measured: deepspeed and tutel 24 classes of 32
    replicas, the others one. About 2 min of CPU for the six."""
    scenario = {
        "cluster": {"preset": "dgx-h100-superpod", "nodes": 256},
        "model": {"preset": "deepseek-moe-16b", "experts": 64},
        "policies": [policy],
    }
    setup = resolve_training(expand(scenario)[0])
    c = setup.cluster
    alone = AloneTimes(c, setup.algos, Topology(c))
    policy_obj, k, r = choose_shape(setup, setup.policies[0], alone)
    g = build_training_graph(setup.model, c, k, r, dispatch_kernels=policy_obj.dispatch_kernels)
    args = (g, policy_obj, c, setup.compute.op_time, setup.algos, alone.topology)
    full = TrainingEngine(*args, alone=alone, all_ranks=True).run()
    reduced = TrainingEngine(*args, alone=alone).run()
    assert reduced.ranks < full.ranks
    assert_same_step(full, reduced)
