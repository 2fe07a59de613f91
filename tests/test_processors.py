"""Shared host cores: processor sharing, oversubscription, and the engine on such a host."""

from __future__ import annotations

import dataclasses

import pytest
import simpy

from lina_sim.errors import ConfigError
from lina_sim.hardware.processors import ProcessorPool
from lina_sim.hardware.spec import HostSpec, cluster_from_dict, load_preset, read_preset


def _finish_times(cores: int, jobs: list[tuple[float, float]]) -> list[float]:
    """Run (arrival s, work s) jobs on a pool; return each job's finish time."""
    env = simpy.Environment()
    pool = ProcessorPool(env, cores)
    out = [0.0] * len(jobs)

    def job(i: int, at: float, work: float):
        yield env.timeout(at)
        yield pool.run(work)
        out[i] = env.now

    for i, (at, work) in enumerate(jobs):
        env.process(job(i, at, work))
    env.run()
    return out


def test_alone_on_a_free_core_a_job_takes_its_work():
    assert _finish_times(2, [(0.0, 1.0)]) == [1.0]
    assert _finish_times(2, [(0.0, 1.0), (0.0, 3.0)]) == [1.0, 3.0]  # one core each


def test_more_jobs_than_cores_share_them_fairly():
    assert _finish_times(2, [(0.0, 1.0)] * 4) == pytest.approx([2.0] * 4)
    # One core: A alone for 0.5 s, then A and B at half speed; A ends at 1.5, B alone then.
    assert _finish_times(1, [(0.0, 1.0), (0.5, 1.0)]) == pytest.approx([1.5, 2.0])


def test_processor_sharing_by_hand():
    # 4 jobs on 2 cores: rate 1/2 until the 0.2 s job ends (t 0.4); 3 jobs at 2/3 until the
    # 0.3 s job ends (t 0.55); then one core each: 0.4 s and 0.8 s of work left.
    assert _finish_times(2, [(0, 0.3), (0, 0.7), (0, 0.2), (0, 1.1)]) == pytest.approx([0.55, 0.95, 0.4, 1.35])


def test_excess_time_integrates_oversubscription():
    env = simpy.Environment()
    pool = ProcessorPool(env, 2)
    for _ in range(4):
        pool.run(1.0)  # 4 jobs on 2 cores: excess 1 for 2 s
    env.run()
    assert env.now == pytest.approx(2.0)
    assert pool.excess_time() == pytest.approx(2.0)


def test_busy_delay_is_owed_in_proportion_and_ends_when_the_host_frees_up():
    env = simpy.Environment()
    pool = ProcessorPool(env, 1)
    ends = {}

    def collective(name: str, transfer_s: float, delay_s: float):
        since = (env.now, pool.excess_time())
        yield env.timeout(transfer_s)
        yield env.process(pool.pay(pool.owed(delay_s, 1.0, since), 1.0))
        ends[name] = env.now

    pool.run(1.0), pool.run(1.0)  # 2 jobs on 1 core: excess 1 until t = 2
    env.process(collective("during", 0.5, 0.25))  # owes 0.25 s, paid at pace 1 -> ends 0.75
    env.process(collective("long", 1.0, 5.0))  # owes 5 s but the host frees up at t = 2
    env.run()
    assert ends["during"] == pytest.approx(0.75)
    assert ends["long"] == pytest.approx(2.0)


def _testbed_cluster(cores: int | None):
    data, _ = read_preset("paper-testbed")
    data = dict(data, nodes=1)
    if cores is not None:
        data["host"] = {"cores": cores}
    return cluster_from_dict(data)


def test_engine_shares_host_cores_among_ranks():
    from lina_sim.hardware.compute import RooflineComputeModel
    from lina_sim.policies.registry import make_training_policy
    from lina_sim.training.engine import TrainingEngine
    from lina_sim.workload.graph import build_training_graph
    from lina_sim.workload.model import model_from_dict

    spec = model_from_dict(
        dict(
            layers=2,
            d_model=64,
            d_ff=128,
            heads=2,
            seq_len=16,
            micro_batch=2,
            vocab=64,
            experts=4,
            top_k=1,
            dtype="fp32",
        ),
        world_size=4,
    )
    times = {}
    for cores in (None, 4, 2, 1):
        cluster = _testbed_cluster(cores)
        graph = build_training_graph(spec, cluster)
        model = RooflineComputeModel.from_cluster(cluster, "fp32")
        res = TrainingEngine(graph, make_training_policy("deepspeed"), cluster, model.op_time).run()
        tl = res.timeline
        comp = tl[tl["kind"] == "compute"]
        times[cores] = float((comp["end"] - comp["start"]).sum())
    assert times[4] == pytest.approx(times[None])  # as many cores as ranks: nothing shared
    # SPMD ranks compute in lockstep, so halving the cores doubles each op's duration.
    assert times[2] == pytest.approx(2 * times[None], rel=0.05)
    assert times[1] == pytest.approx(4 * times[None], rel=0.05)


def test_host_block_is_validated_by_name():
    with pytest.raises(ConfigError, match=r"cluster\.host\.cores"):
        _testbed_cluster(0)
    data, _ = read_preset("paper-testbed")
    with pytest.raises(ConfigError, match=r"cluster\.host\.step_delay_s\.broadcast.*allowed"):
        cluster_from_dict(dict(data, host={"cores": 2, "step_delay_s": {"broadcast": 0.01}}))
    with pytest.raises(ConfigError, match=r"cluster\.host\.speed"):
        cluster_from_dict(dict(data, host={"cores": 2, "speed": 1}))
    spec = cluster_from_dict(dict(data, host={"cores": 2, "step_delay_s": {"allreduce": 0.01}}))
    assert spec.host == HostSpec(2, {"allreduce": 0.01}, 1.0) and spec.shares_cores
    assert not load_preset("paper-testbed").shares_cores
    assert not dataclasses.replace(spec, host=HostSpec(64)).shares_cores


def test_shared_finish_times_match_the_pool():
    import numpy as np

    from lina_sim.hardware.processors import shared_finish_times

    work = [0.3, 0.7, 0.2, 1.1]
    assert shared_finish_times(np.array(work), 2) == pytest.approx(_finish_times(2, [(0.0, w) for w in work]))
    assert shared_finish_times(np.array(work), None).tolist() == work  # a device per rank
    assert shared_finish_times(np.array(work), 4).tolist() == work
