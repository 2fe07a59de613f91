"""Gradient reduction as each framework issues it (lina_sim.policies.training.grad_sync
and the ``grad_sync`` / ``partition_of`` policy options; docs/gradient-sync-research.md)."""

from collections import defaultdict

import pytest

from lina_sim.errors import ConfigError
from lina_sim.policies.registry import make_training_policy
from lina_sim.policies.training.grad_sync import (
    DDP_BUCKET_CAP_BYTES,
    DDP_FIRST_BUCKET_BYTES,
    ddp_buckets,
    framework_buckets,
    partition_buckets,
    zero_buckets,
)
from lina_sim.training.engine import TrainingEngine
from lina_sim.workload.comm import MB, GradRequest, piece_ranges
from lina_sim.workload.graph import build_training_graph
from lina_sim.workload.model import PRESETS, model_preset

# (policy, params): every gradient option, the defaults included.
OPTIONS = [
    ("deepspeed", {}),
    ("deepspeed", {"grad_sync": "zero"}),
    ("deepspeed", {"grad_sync": "zero", "bucket_elems": 1e6}),
    ("tutel", {}),
    ("tutel", {"grad_sync": "ddp"}),
    ("lina", {}),
    ("lina", {"partition_of": "bucket"}),
    ("lina", {"partition_of": "bucket", "framework": "zero"}),
    ("lina", {"partition_of": "bucket", "framework": "ddp"}),
    ("lina-partition", {"partition_of": "bucket", "framework": "ddp"}),
]


def _graph(preset="transformer-xl-12", k=2, world=16):
    # 16 experts on 16 ranks, 2 per device: expert_dp groups of 2 ranks, so both
    # communicators carry gradients.
    return build_training_graph(model_preset(preset), world, experts_per_device=k)


def _bytes_per_comm(items):
    out = defaultdict(float)
    for x in items:
        out[x.communicator] += x.nbytes
    return dict(out)


def _last_bwd_compute(graph):
    return max(o.id for o in graph.ops if o.kind == "compute" and o.phase == "bwd")


@pytest.mark.parametrize("name,params", OPTIONS)
@pytest.mark.parametrize("preset", ["transformer-xl-12", "gpt2-moe"])
def test_partitioning_never_changes_the_volume(name, params, preset):
    g = _graph(preset)
    mops = make_training_policy(name, **params).partition_gradients(g.grad_requests)
    want = _bytes_per_comm(g.grad_requests)
    assert set(want) == {"dp", "expert_dp"}
    got = _bytes_per_comm(mops)
    assert got.keys() == want.keys()
    for comm in want:
        assert got[comm] == pytest.approx(want[comm], rel=1e-12)
    # every micro-op's pieces add up to it, and each tensor is carried exactly once
    carried = defaultdict(float)
    for m in mops:
        assert sum(b for _, b in m.pieces) == pytest.approx(m.nbytes, rel=1e-12)
        for t, b in m.pieces:
            carried[t] += b
    assert carried == pytest.approx({r.name: r.nbytes for r in g.grad_requests}, rel=1e-12)
    # seq numbers every communicator 0..n-1 in submission order
    for comm in want:
        assert [m.seq for m in mops if m.communicator == comm] == list(range(sum(m.communicator == comm for m in mops)))


@pytest.mark.parametrize("name,params", OPTIONS + [("lina", {"partition_of": "bucket", "micro_op_mb": 7})])
def test_piece_ranges_tile_every_tensor_once(name, params):
    """What the executor reduces (piece_ranges): every tensor's [0, 1) split into
    consecutive ranges with no gap or overlap, however the micro-ops cut it (a 7 MB cut
    of 25 MB buckets starts and ends inside tensors)."""
    g = _graph("gpt2-moe")
    mops = make_training_policy(name, **params).partition_gradients(g.grad_requests)
    spans = defaultdict(list)
    for m in sorted(mops, key=lambda m: (m.communicator, m.seq)):
        for t, lo, hi in piece_ranges(mops)[m.id]:
            spans[t].append((lo, hi))
    assert set(spans) == {r.name for r in g.grad_requests}
    for t, ranges in spans.items():
        assert ranges[0][0] == 0.0 and ranges[-1][1] == pytest.approx(1.0, abs=1e-12), t
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), t


# deepseek-moe-16b's 0.5 B dense parameters exceed ZeRO's 500M-element reduce bucket (two dp buckets).
@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p != "deepseek-moe-16b"))
@pytest.mark.parametrize("k", [1, 2])
def test_zero_stage0_is_one_allreduce_per_communicator_after_backward(preset, k):
    g = _graph(preset, k)
    mops = make_training_policy("deepspeed", grad_sync="zero").partition_gradients(g.grad_requests)
    comms = {r.communicator for r in g.grad_requests}  # groups of one rank are already dropped
    assert len(mops) == 1 + (1 if "expert_dp" in comms else 0)
    assert ("expert_dp" in comms) == (k == 2)
    last = max(r.ready_after for r in g.grad_requests)
    assert last == _last_bwd_compute(g)
    assert all(m.ready_after == last for m in mops)
    assert [m.communicator for m in mops][0] == "dp"  # dense first, then experts


def test_zero_buckets_close_after_the_tensor_past_the_limit_in_registration_order():
    reqs = [
        GradRequest(f"t{i}", "dp", 2.0 * n, ready_after=10 + i, layer=0, order=i) for i, n in enumerate([4, 3, 5, 1])
    ]
    # registration order = reverse ready order: t3 (1), t2 (5), t1 (3), t0 (4); limit 5 elements
    buckets = zero_buckets(reqs, bucket_elems=5, bytes_per_elem=2)
    assert [[t for t, _ in b.pieces] for b in buckets] == [["t3", "t2"], ["t1", "t0"]]
    assert all(b.ready_after == 13 for b in buckets)
    assert [b.seq for b in buckets] == [0, 1]


@pytest.mark.parametrize("preset", ["transformer-xl-12", "gpt2-moe", "bert2gpt2-moe"])
def test_ddp_bucket_bounds_and_in_order_readiness(preset):
    g = _graph(preset)
    biggest = max(r.nbytes for r in g.grad_requests)
    buckets = ddp_buckets(g.grad_requests)
    assert buckets == make_training_policy("tutel", grad_sync="ddp").partition_gradients(g.grad_requests)
    for comm in ("dp", "expert_dp"):
        bs = [b for b in buckets if b.communicator == comm]
        assert len(bs) > 2
        assert bs[0].nbytes <= DDP_FIRST_BUCKET_BYTES + biggest
        assert all(b.nbytes < DDP_BUCKET_CAP_BYTES + biggest for b in bs[1:])
        # every bucket but the last is full; readiness never decreases with the bucket index
        assert bs[0].nbytes >= DDP_FIRST_BUCKET_BYTES
        assert all(b.nbytes >= DDP_BUCKET_CAP_BYTES for b in bs[1:-1])
        readies = [b.ready_after for b in bs]
        assert readies == sorted(readies)
        # a bucket is ready no earlier than any of its tensors
        ready_of = {r.name: r.ready_after for r in g.grad_requests}
        assert all(b.ready_after >= max(ready_of[t] for t, _ in b.pieces) for b in bs)


@pytest.mark.parametrize("framework", ["ddp-25mb", "zero", "ddp"])
@pytest.mark.parametrize("micro_mb", [30.0, 4.0, 0.5])
def test_lina_bucket_partition_bounds_and_order(framework, micro_mb):
    g = _graph("gpt2-moe")
    pol = make_training_policy("lina", partition_of="bucket", framework=framework, micro_op_mb=micro_mb)
    mops = pol.partition_gradients(g.grad_requests)
    buckets = framework_buckets(g.grad_requests, framework)
    assert all(m.nbytes <= micro_mb * MB * (1 + 1e-12) for m in mops)
    for comm in ("dp", "expert_dp"):
        ms = [m for m in mops if m.communicator == comm]
        bs = [b for b in buckets if b.communicator == comm]
        # in bucket order: the micro-ops of bucket i, then those of bucket i+1
        ids = [m.id.split(".p")[0] for m in ms]
        assert list(dict.fromkeys(ids)) == [b.id for b in bs]
        for b in bs:
            mine = [m for m in ms if m.id.split(".p")[0] == b.id]
            assert sum(m.nbytes for m in mine) == pytest.approx(b.nbytes, rel=1e-12)
            assert {m.ready_after for m in mine} == {b.ready_after}
            assert len({m.nbytes for m in mine}) == 1  # equal micro-ops
            assert len(mine) == max(1, -(-b.nbytes // (micro_mb * MB)))


def test_partition_buckets_slices_tensors_across_micro_ops():
    reqs = [GradRequest(f"t{i}", "dp", 3.0, ready_after=i, layer=0, order=i) for i in range(3)]
    (bucket,) = framework_buckets(reqs, "zero")
    mops = partition_buckets([bucket], 4.0)  # 9 B -> 3 micro-ops of 3 B
    assert [m.nbytes for m in mops] == [3.0, 3.0, 3.0]
    assert [m.ready_after for m in mops] == [2, 2, 2]
    assert [m.pieces for m in mops] == [(("t2", 3.0),), (("t1", 3.0),), (("t0", 3.0),)]
    mops = partition_buckets([bucket], 5.0)  # 9 B -> 2 micro-ops of 4.5 B
    assert [m.pieces for m in mops] == [(("t2", 3.0), ("t1", 1.5)), (("t1", 1.5), ("t0", 3.0))]


def test_defaults():
    """deepspeed: the Lina comparison's 25 MB buckets (a named assumption, not DeepSpeed's
    own default); tutel: PyTorch DDP as Tutel's examples run it; lina: the deepspeed
    baseline's buckets, each cut into micro-ops of at most 30 MB."""
    g = _graph()
    from lina_sim.policies.training.base import bucket_requests

    assert make_training_policy("deepspeed").partition_gradients(g.grad_requests) == bucket_requests(
        g.grad_requests, 25 * MB
    )
    assert make_training_policy("tutel").partition_gradients(g.grad_requests) == ddp_buckets(g.grad_requests)
    assert make_training_policy("lina").partition_gradients(g.grad_requests) == partition_buckets(
        bucket_requests(g.grad_requests, 25 * MB), 30 * MB
    )
    for name, param, default in [
        ("deepspeed", "grad_sync", "ddp-25mb"),
        ("tutel", "grad_sync", "ddp"),
        ("lina", "partition_of", "bucket"),
        ("lina", "framework", "ddp-25mb"),
    ]:
        assert make_training_policy(name).describe()[param] == default


def test_micro_op_below_one_kb_is_refused():
    with pytest.raises(ConfigError) as e:
        make_training_policy("lina", micro_op_mb=1e-9)
    assert e.value.field == "policies.lina.micro_op_mb" and "1 KB" in str(e.value)


@pytest.mark.parametrize(
    "name,params,field,allowed_has",
    [
        ("deepspeed", {"grad_sync": "ddp"}, "policies.deepspeed.grad_sync", "ddp-25mb, zero"),
        ("tutel", {"grad_sync": "zero"}, "policies.tutel.grad_sync", "ddp-25mb, ddp"),
        ("lina", {"partition_of": "buckets"}, "policies.lina.partition_of", "tensor, bucket"),
        ("lina", {"partition_of": "bucket", "framework": "tutel"}, "policies.lina.framework", "ddp-25mb, zero, ddp"),
        ("deepspeed", {"grad_sync": "zero", "bucket_elems": 0}, "policies.deepspeed.bucket_elems", "> 0"),
        ("deepspeed", {"grad_sync": "zero", "bytes_per_elem": 3}, "policies.deepspeed.bytes_per_elem", "2, 4"),
        ("tutel", {"bucket_elems": 5e8}, "policies.tutel.bucket_elems", "grad_sync"),
        # a parameter the chosen option ignores
        ("deepspeed", {"grad_sync": "zero", "bucket_mb": 10}, "policies.deepspeed.bucket_mb", "25.0"),
        ("deepspeed", {"bucket_elems": 1e6}, "policies.deepspeed.bucket_elems", "500000000.0"),
        ("tutel", {"grad_sync": "ddp", "bucket_mb": 10}, "policies.tutel.bucket_mb", "25.0"),
        ("lina", {"partition_of": "tensor", "framework": "zero"}, "policies.lina.framework", "ddp-25mb"),
        ("lina", {"partition_of": "bucket", "fuse_below_mb": 1}, "policies.lina.fuse_below_mb", "0.0"),
    ],
)
def test_bad_options_name_the_field_and_allowed_values(name, params, field, allowed_has):
    with pytest.raises(ConfigError) as e:
        make_training_policy(name, **params)
    assert e.value.field == field and allowed_has in e.value.allowed, str(e.value)


@pytest.mark.parametrize("name,params", OPTIONS)
def test_every_option_runs_a_step_and_reduces_every_byte(name, params):
    from lina_sim.hardware.compute import RooflineComputeModel
    from lina_sim.hardware.spec import load_preset

    cluster = load_preset("paper-testbed", nodes=2)
    policy = make_training_policy(name, **params)
    g = build_training_graph(
        model_preset("transformer-xl-12"), cluster, experts_per_device=2, pipeline_degree=policy.pipeline_degree
    )
    res = TrainingEngine(g, policy, cluster, RooflineComputeModel.from_cluster(cluster).op_time).run()
    assert res.step_time > 0
    ar = [c for c in res.collectives if not c.mop.is_a2a and 0 in c.group]
    assert _bytes_per_comm(c.mop for c in ar) == pytest.approx(_bytes_per_comm(g.grad_requests), rel=1e-12)
    if name == "deepspeed" and params.get("grad_sync") == "zero":
        # nothing is reduced before backward ends: the first allreduce starts after the last backward op
        last = _last_bwd_compute(g)
        tl = res.timeline
        end_bwd = tl[(tl["rank"] == 0) & (tl["op"] == g.ops[last].name)]["end"].max()
        assert min(c.start for c in ar) >= end_bwd
