import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lina_sim.errors import ConfigError
from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import load_preset
from lina_sim.network.alone import AloneTimes
from lina_sim.policies.registry import TRAINING_POLICIES, make_training_policy, training_policy_class
from lina_sim.policies.training.base import RankScheduler, RankView, check_selection, owed_per_gap
from lina_sim.training.launch_plan import planned_micro_ops
from lina_sim.workload.comm import ALL_TO_ALL, ALLREDUCE, MB, GradRequest, MicroOp, PackingEstimate
from lina_sim.workload.graph import build_training_graph
from lina_sim.workload.model import model_preset

NAMES = sorted(TRAINING_POLICIES)
LINA_FAMILY = ("lina", "lina-priority", "lina-partition")


def test_registry_and_defaults():
    assert set(NAMES) == {"deepspeed", "tutel", "lina", "lina-priority", "lina-partition", "no-contention"}
    p = {n: make_training_policy(n) for n in NAMES}
    assert [p[n].pipeline_degree for n in ("deepspeed", "tutel", "lina", "lina-priority", "lina-partition")] == [
        1,
        2,
        2,
        1,
        1,
    ]
    assert p["no-contention"].isolated_allreduce and not any(
        p[n].isolated_allreduce for n in NAMES if n != "no-contention"
    )
    assert make_training_policy("tutel", pipeline_degree=4).pipeline_degree == 4
    assert p["lina"].describe()["micro_op_mb"] == 30.0


@pytest.mark.parametrize(
    "name,params,field,allowed_has",
    [
        ("deepspeed", {"bucket_size": 5}, "policies.deepspeed.bucket_size", "bucket_mb"),
        ("deepspeed", {"bucket_mb": -1}, "policies.deepspeed.bucket_mb", "> 0"),
        ("tutel", {"pipeline_degree": 1.5}, "policies.tutel.pipeline_degree", ">= 1"),
        ("lina", {"hold": "never"}, "policies.lina.hold", "moe-block"),
        ("lina", {"launch": "global"}, "policies.lina.launch", "planned, local"),
        ("lina", {"packing": "yes"}, "policies.lina.packing", "cost, paper, off"),
        ("lina-priority", {"micro_op_mb": 30}, "policies.lina-priority.micro_op_mb", "bucket_mb"),
    ],
)
def test_bad_params_name_the_field_and_allowed_values(name, params, field, allowed_has):
    with pytest.raises(ConfigError) as e:
        make_training_policy(name, **params)
    assert e.value.field == field and allowed_has in e.value.allowed


@pytest.mark.parametrize(
    "name,param",
    [
        ("deepspeed", "bucket_mb"),
        ("lina", "micro_op_mb"),
        ("lina", "fuse_below_mb"),
        ("tutel", "pipeline_degree"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_params_are_one_error_naming_the_field(name, param, value):
    with pytest.raises(ConfigError) as e:
        make_training_policy(name, **{param: value})
    assert e.value.field == f"policies.{name}.{param}" and "finite" in e.value.problem


def test_every_param_is_a_field_with_help():
    from lina_sim.config.fields import Field

    for n in NAMES:
        for key, f in training_policy_class(n).PARAMS.items():
            assert isinstance(f, Field) and f.help, (n, key)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        training_policy_class("fastmoe")
    assert "lina" in e.value.allowed


def test_where_overrides_the_error_path():
    with pytest.raises(ConfigError) as e:
        training_policy_class("lina").from_params(name="lina", _where="policies[2]", micro_op_mb=0)
    assert e.value.field == "policies[2].micro_op_mb"


# -- partitioning ----------------------------------------------------------------------------
def reqs(sizes_mb, comm="dp", prefix="t"):
    return [
        GradRequest(f"{prefix}{i}", comm, s * MB, ready_after=10 + i // 2, layer=i, order=i)
        for i, s in enumerate(sizes_mb)
    ]


def per_tensor_bytes(mops):
    out = {}
    for m in mops:
        for name, b in m.pieces:
            out[name] = out.get(name, 0.0) + b
    return out


SIZES = [0.001, 12, 30, 61, 8, 8, 8, 100, 0.002, 3]


def test_deepspeed_buckets_fill_to_the_cap_in_ready_order():
    rs = reqs(SIZES) + reqs([40, 1], "expert_dp", prefix="e")
    by_name = {r.name: r for r in rs}
    mops = make_training_policy("deepspeed").partition_gradients(rs)
    assert per_tensor_bytes(mops) == pytest.approx({r.name: r.nbytes for r in rs})
    for comm in ("dp", "expert_dp"):
        ms = [m for m in mops if m.communicator == comm]
        assert [m.seq for m in ms] == list(range(len(ms)))
        assert all(m.nbytes >= 25 * MB for m in ms[:-1])
        assert all(by_name[n].communicator == comm for m in ms for n, _ in m.pieces)
        assert all(m.ready_after == max(by_name[n].ready_after for n, _ in m.pieces) for m in ms)


def test_lina_cuts_equal_micro_ops_without_mixing_tensors():
    rs = reqs(SIZES)
    mops = make_training_policy("lina", partition_of="tensor").partition_gradients(rs)
    assert all(len(m.pieces) == 1 and m.nbytes <= 30 * MB + 1e-6 for m in mops)
    assert per_tensor_bytes(mops) == pytest.approx({r.name: r.nbytes for r in rs})
    t7 = [m for m in mops if m.pieces[0][0] == "t7"]
    assert len(t7) == 4 and len({m.nbytes for m in t7}) == 1  # 100 MB -> 4 x 25 MB
    assert len([m for m in mops if m.pieces[0][0] == "t2"]) == 1  # exactly 30 MB stays whole
    assert [m.seq for m in mops] == list(range(len(mops)))
    small = reqs([0.001, 0.002, 5, 0.001, 0.001, 0.6, 0.6, 0.6])
    fused = make_training_policy("lina", partition_of="tensor", fuse_below_mb=1).partition_gradients(small)
    assert [[n for n, _ in m.pieces] for m in fused] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5", "t6"], ["t7"]]
    assert per_tensor_bytes(fused) == pytest.approx({r.name: r.nbytes for r in small})


# -- launch decisions: hypothesis over random pending / in-flight states -----------------------
COMMS = ("ep", "dp", "expert_dp")


@st.composite
def rank_views(draw):
    n = draw(st.integers(0, 14))
    comms = draw(st.lists(st.sampled_from(COMMS), min_size=n, max_size=n))
    seq = {c: 0 for c in COMMS}
    ops = []
    for i, c in enumerate(comms):
        a2a = c == "ep"
        ops.append(
            MicroOp(
                id=f"m{i}",
                kind=ALL_TO_ALL if a2a else ALLREDUCE,
                communicator=c,
                seq=seq[c],
                nbytes=draw(st.floats(1, 1e8)),
                layer=draw(st.integers(0, 3)),
                phase=draw(st.sampled_from(("fwd", "bwd"))),
                role=draw(st.sampled_from(("dispatch", "combine"))) if a2a else "grad",
            )
        )
        seq[c] += 1
    # Per communicator: a prefix completed, then some in flight, the rest pending.
    cut = {c: sorted(draw(st.lists(st.integers(0, seq[c]), min_size=2, max_size=2))) for c in COMMS}
    in_flight = tuple(m for m in ops if cut[m.communicator][0] <= m.seq < cut[m.communicator][1])
    pending = tuple(m for m in ops if m.seq >= cut[m.communicator][1])
    blocks = frozenset(draw(st.sets(st.integers(0, 3), max_size=2)))
    return RankView(pending, in_flight, blocks)


@settings(max_examples=300, deadline=None)
@given(view=rank_views(), name=st.sampled_from(NAMES))
def test_every_policy_keeps_communicator_order_and_is_deterministic(view, name):
    a, b = make_training_policy(name), make_training_policy(name)
    chosen = a.select(view)
    check_selection(view, chosen)
    assert b.select(view) == chosen == a.select(view)


@settings(max_examples=300, deadline=None)
@given(view=rank_views(), name=st.sampled_from(LINA_FAMILY), hold=st.sampled_from(("moe-block", "a2a")))
def test_local_lina_never_launches_allreduce_while_an_a2a_is_pending_or_running(view, name, hold):
    chosen = make_training_policy(name, hold=hold, launch="local").select(view)
    ar = [m for m in chosen if m.kind == ALLREDUCE]
    a2a_busy = any(m.kind == ALL_TO_ALL for m in view.pending + view.in_flight)
    if a2a_busy or any(m.kind == ALLREDUCE for m in view.in_flight) or (hold == "moe-block" and view.open_moe_blocks):
        assert ar == []
    assert len(ar) <= 1
    # All-to-alls are never held back.
    assert [m for m in chosen if m.kind == ALL_TO_ALL] == [m for m in view.pending if m.kind == ALL_TO_ALL]


def test_deepspeed_launches_everything_at_once():
    a2a = MicroOp("a", ALL_TO_ALL, "ep", 0, 1.0, role="dispatch")
    g = MicroOp("g", ALLREDUCE, "dp", 0, 1.0)
    view = RankView(pending=(g,), in_flight=(a2a,))
    assert make_training_policy("deepspeed").select(view) == (g,)
    assert make_training_policy("lina", launch="local").select(view) == ()


# -- the scheduler driven by a random event loop over a real graph ------------------------------
def drive(policy_name, seed, **params):
    """Run one rank's scheduler over the step with random completion times.

    Returns the launch order per communicator; checks Lina's rule at every launch: a
    local Lina launches no allreduce while an all-to-all is pending or running, a planned
    one never has an allreduce and an all-to-all in flight together."""
    policy = make_training_policy(policy_name, **params)
    cluster = load_preset("paper-testbed", nodes=2)
    g = build_training_graph(
        model_preset("transformer-xl-12"), cluster, experts_per_device=2, pipeline_degree=policy.pipeline_degree
    )
    rng = random.Random(seed)
    mops = planned_micro_ops(
        g, policy, cluster, RooflineComputeModel.from_cluster(cluster).op_time, AloneTimes(cluster)
    )
    planned = any(m.gap >= 0 for m in mops)
    a2a_of = {m.op_id: m for m in mops if m.kind == ALL_TO_ALL}
    grads_after: dict[int, list[MicroOp]] = {}
    for m in mops:
        if m.kind == ALLREDUCE:
            grads_after.setdefault(m.ready_after, []).append(m)
    sched = RankScheduler(policy, owed=owed_per_gap(mops))
    launched: dict[str, list[int]] = {}
    in_flight: list[MicroOp] = []

    def launch():
        view = sched.view()
        for m in sched.poll():
            if policy_name in LINA_FAMILY and m.kind == ALLREDUCE and not planned:
                assert not any(x.kind == ALL_TO_ALL for x in view.pending + view.in_flight)
            launched.setdefault(m.communicator, []).append(m.seq)
            in_flight.append(m)
        if planned:
            assert len({m.kind for m in in_flight}) <= 1, in_flight

    for op in g.ops:  # the compute stream in program order; a2a ops block until done
        if op.id in a2a_of:
            sched.submit(a2a_of[op.id])
        for m in rng.sample(grads_after.get(op.id, []), len(grads_after.get(op.id, []))):
            sched.submit(m)  # submitted in a shuffled order: the scheduler restores seq order
        while True:
            launch()
            must_finish = op.id in a2a_of and not any(m.op_id == op.id for m in sched.view().pending)
            must_finish = must_finish and any(m.op_id == op.id for m in in_flight)
            held = op.id in a2a_of and any(m.op_id == op.id for m in sched.view().pending)
            if not in_flight or (not (must_finish or held) and rng.random() < 0.5):
                assert not held, f"{op.name} held with nothing in flight: a deadlock"
                break
            idx = rng.randrange(len(in_flight))
            if must_finish:
                idx = next(i for i, m in enumerate(in_flight) if m.op_id == op.id)
            sched.complete(in_flight.pop(idx))
    while not sched.idle:
        launch()
        sched.complete(in_flight.pop(0))
    return launched, mops


@pytest.mark.parametrize("name,params", [(n, {}) for n in NAMES] + [("lina", {"launch": "local"})])
def test_scheduler_launches_each_communicator_in_order_identically_on_all_ranks(name, params):
    orders = []
    for seed in range(3):  # three "ranks" with different timings
        launched, mops = drive(name, seed, **params)
        for comm, seqs in launched.items():
            assert seqs == list(range(sum(1 for m in mops if m.communicator == comm)))
        orders.append(launched)
    assert orders[0] == orders[1] == orders[2]


# -- expert packing ------------------------------------------------------------------------------
def test_lina_paper_rule_doubles_packing_while_ffn_micro_op_is_shorter_than_a2a_micro_op():
    lina = make_training_policy("lina", packing="paper")
    est = {
        k: PackingEstimate(f, a) for k, (f, a) in {1: (1.0, 4.0), 2: (1.1, 2.0), 4: (1.2, 1.0), 8: (1.3, 0.5)}.items()
    }
    assert lina.experts_per_device([1, 2, 4, 8], est) == 4
    assert lina.experts_per_device([1, 2, 4, 8], {**est, 1: PackingEstimate(5.0, 4.0)}) == 1
    paper2 = make_training_policy("lina", packing="paper", max_experts_per_device=2)
    assert paper2.experts_per_device([1, 2, 4, 8], est) == 2
    for name in ("deepspeed", "tutel", "lina-priority", "lina-partition", "no-contention"):
        assert make_training_policy(name).experts_per_device([1, 2, 4, 8], est) == 1
    assert make_training_policy("deepspeed").experts_per_device([2, 4]) == 2
    assert make_training_policy("lina", packing=False).experts_per_device([1, 2, 4, 8], est) == 1


def test_lina_cost_rule_counts_the_expert_gradient_allreduce():
    """The default packing takes the lowest estimated step: a cheaper all-to-all is not
    worth an expert-gradient allreduce the backward compute cannot hide."""
    lina = make_training_policy("lina")
    assert lina.packing_rule == "cost" and make_training_policy("lina", packing=True).packing_rule == "cost"

    def est(a2a_s: float, expert_allreduce_s: float) -> PackingEstimate:
        return PackingEstimate(
            1.0,
            2.0,
            compute_s=10.0,
            backward_compute_s=6.0,
            a2a_s=a2a_s,
            dense_allreduce_s=1.0,
            expert_allreduce_s=expert_allreduce_s,
        )

    cheap_a2a = {1: est(8.0, 0.0), 2: est(5.0, 1.0), 4: est(4.0, 9.0)}
    assert [cheap_a2a[k].step_s for k in (1, 2, 4)] == [18.0, 15.0, 18.0]
    assert lina.experts_per_device([1, 2, 4], cheap_a2a) == 2
    # The paper's rule packs on: FFN micro-op (1 s) shorter than the all-to-all one (2 s).
    assert make_training_policy("lina", packing="paper").experts_per_device([1, 2, 4], cheap_a2a) == 4
    # Ties go to fewer experts per device.
    assert lina.experts_per_device([1, 2], {1: est(8.0, 0.0), 2: est(8.0, 0.0)}) == 1


@pytest.mark.parametrize("hold,launches_in_ffn_gap", [("moe-block", False), ("a2a", True)])
def test_lina_hold_covers_the_backward_moe_block(hold, launches_in_ffn_gap):
    combine = MicroOp("L3.bwd.combine.c0", ALL_TO_ALL, "ep", 0, 1.0, layer=3, phase="bwd", role="combine")
    dispatch = MicroOp("L3.bwd.dispatch.c0", ALL_TO_ALL, "ep", 1, 1.0, layer=3, phase="bwd", role="dispatch")
    grad = MicroOp("dp.L4.attn_qkv", ALLREDUCE, "dp", 0, 1.0, layer=4)
    s = RankScheduler(make_training_policy("lina", hold=hold, launch="local"))
    s.submit(combine)
    s.submit(grad)
    assert s.poll() == (combine,)  # the all-to-all goes first, the gradient waits
    s.complete(combine)  # now the expert FFN runs: the gap
    assert s.poll() == ((grad,) if launches_in_ffn_gap else ())
    if not launches_in_ffn_gap:
        s.submit(dispatch)
        assert s.poll() == (dispatch,)
        s.complete(dispatch)  # the layer's MoE block is over
        assert s.poll() == (grad,)
