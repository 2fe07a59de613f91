"""Lina's launch plan: the estimated program, the gap assignment, the planned launch rule."""

import pytest

from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import load_preset
from lina_sim.network.alone import AloneTimes
from lina_sim.policies.registry import make_training_policy
from lina_sim.policies.training.base import ProgramEstimate, RankScheduler, owed_per_gap
from lina_sim.training.launch_plan import estimate_program, planned_micro_ops
from lina_sim.workload.comm import ALL_TO_ALL, ALLREDUCE, MicroOp
from lina_sim.workload.graph import build_training_graph
from lina_sim.workload.model import model_from_dict

CLUSTER = load_preset("paper-testbed", nodes=2)


def grad(i, ready_after, nbytes=1.0, comm="dp"):
    return MicroOp(f"g{i}", ALLREDUCE, comm, i, nbytes, ready_after=ready_after)


# Three all-to-alls: gap 0 is [0, 1), gap 1 [2, 5), gap 2 [6, 6) (empty), gap 3 [7, inf).
PROGRAM = ProgramEstimate(
    a2a_start_s=(1.0, 5.0, 6.0),
    a2a_end_s=(2.0, 6.0, 7.0),
    op_end_s={10: 0.0, 11: 2.5, 12: 4.5},
    min_gap={10: 0, 11: 1, 12: 1},
)


def plan(grads, seconds):
    out = make_training_policy("lina").plan(grads, PROGRAM, lambda m: seconds[m.id])
    return [m.gap for m in out]


def test_micro_ops_fill_gaps_in_order_and_the_rest_runs_after_the_last_all_to_all():
    grads = [grad(0, 10), grad(1, 11), grad(2, 11), grad(3, 12)]
    # g0 fits gap 0 (0..0.5); g1 is ready at 2.5 and fits gap 1 (2.5..4); g2 would end at
    # 5.5 > 5, gap 2 is empty, so gap 3; g3 may not overtake g2: gap 3 as well.
    assert plan(grads, {"g0": 0.5, "g1": 1.5, "g2": 1.5, "g3": 0.1}) == [0, 1, 3, 3]
    # Nothing fits anywhere: everything after the last all-to-all.
    assert plan(grads, {g.id: 10.0 for g in grads}) == [3, 3, 3, 3]


def test_a_micro_op_never_goes_before_the_all_to_alls_its_gradient_needs():
    # Ready after op 11, which needs all-to-all 0 done: never gap 0, even if it would fit.
    assert plan([grad(0, 11)], {"g0": 0.1}) == [1]


def test_local_launch_plans_nothing():
    grads = (grad(0, 10),)
    assert make_training_policy("lina", launch="local").plan(grads, PROGRAM, lambda m: 0.1) == grads
    assert make_training_policy("deepspeed").plan(grads, PROGRAM, lambda m: 0.1) == grads


def test_planned_scheduler_holds_an_all_to_all_behind_the_micro_ops_planned_before_it():
    a0 = MicroOp("a0", ALL_TO_ALL, "ep", 0, 1.0, role="combine", phase="bwd")
    a1 = MicroOp("a1", ALL_TO_ALL, "ep", 1, 1.0, role="dispatch", phase="bwd")
    g = MicroOp("g", ALLREDUCE, "dp", 0, 1.0, ready_after=5, gap=1)
    s = RankScheduler(make_training_policy("lina"), owed=owed_per_gap((a0, a1, g)))
    s.submit(g)
    assert s.poll() == ()  # its gap opens only once a0 has completed
    s.submit(a0)
    assert s.poll() == (a0,)
    s.submit(a1)
    assert s.poll() == ()  # a1 waits: g is owed before it
    s.complete(a0)
    assert s.poll() == (g,)
    s.complete(g)
    assert s.poll() == (a1,)


def test_estimated_program_follows_the_graph():
    m = model_from_dict({"preset": "transformer-xl-12", "layers": 4}, world_size=CLUSTER.world_size)
    g = build_training_graph(m, CLUSTER, experts_per_device=1, pipeline_degree=2)
    cm = RooflineComputeModel.from_cluster(CLUSTER)
    alone = AloneTimes(CLUSTER)
    comm = g.communicators["ep"].groups[0]
    prog = estimate_program(g, cm.op_time, lambda op: alone("all_to_all", op.bytes, comm))
    a2a_ops = [o for o in g.ops if o.kind == ALL_TO_ALL]
    assert prog.gaps == len(a2a_ops) + 1
    # One all-to-all stream: each starts after the previous one ends.
    assert all(prog.a2a_start_s[j] >= prog.a2a_end_s[j - 1] - 1e-15 for j in range(1, len(a2a_ops)))
    compute = [o for o in g.ops if o.kind != ALL_TO_ALL]
    gaps = [prog.min_gap[o.id] for o in compute]
    assert gaps == sorted(gaps) and gaps[0] == 0 and gaps[-1] == len(a2a_ops)
    for o in compute:  # a compute op ends after every all-to-all it needs
        for d in o.deps:
            if d in {a.id for a in a2a_ops}:
                j = [a.id for a in a2a_ops].index(d)
                assert prog.op_end_s[o.id] >= prog.a2a_end_s[j] and prog.min_gap[o.id] > j


@pytest.mark.parametrize("k", [1, 2])
def test_plan_is_the_same_for_every_caller_and_fills_gaps(k):
    """The engine and the executor call planned_micro_ops with the same inputs: the plan
    is a pure function of them, and with micro-ops smaller than the 25 MB buckets some
    run mid-backward."""
    m = model_from_dict({"preset": "transformer-xl-12", "layers": 12}, world_size=CLUSTER.world_size)
    policy = make_training_policy("lina", micro_op_mb=5)
    g = build_training_graph(m, CLUSTER, experts_per_device=k, pipeline_degree=policy.pipeline_degree)
    op_time = RooflineComputeModel.from_cluster(CLUSTER).op_time
    a = planned_micro_ops(g, policy, CLUSTER, op_time, AloneTimes(CLUSTER))
    b = planned_micro_ops(g, make_training_policy("lina", micro_op_mb=5), CLUSTER, op_time, AloneTimes(CLUSTER))
    assert a == b
    gaps = [x.gap for x in a if not x.is_a2a]
    assert all(x >= 0 for x in gaps) and gaps == sorted(gaps)
    assert min(gaps) < max(gaps)
