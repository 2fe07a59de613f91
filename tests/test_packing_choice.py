"""Lina's default packing on real scenarios: its estimated step is never above one
expert per device's, and bad packing values are one error naming the field."""

from __future__ import annotations

import pytest

from lina_sim.config.scenario import expand
from lina_sim.errors import ConfigError
from lina_sim.network.alone import AloneTimes
from lina_sim.policies.registry import make_training_policy
from lina_sim.training.run import choose_shape, resolve_training
from lina_sim.workload.graph import micro_op_estimates


@pytest.mark.parametrize("model", ["transformer-xl-24", "gpt2-moe", "bert2gpt2-moe"])
@pytest.mark.parametrize(
    "cluster", [{"preset": "paper-testbed", "nodes": 4}, {"preset": "dgx-a100", "nodes": 2}], ids=["testbed", "dgx"]
)
def test_default_packing_is_never_estimated_slower_than_one_expert_per_device(model, cluster):
    setup = resolve_training(expand({"cluster": cluster, "model": {"preset": model}, "policies": ["lina"]})[0])
    alone = AloneTimes(setup.cluster, setup.algos)
    policy, k, r = choose_shape(setup, setup.policies[0], alone)
    est = micro_op_estimates(
        setup.model,
        setup.cluster,
        r,
        ffn_time=setup.compute.op_time,
        a2a_time=lambda op, comm: alone("all_to_all", op.bytes, comm.groups[0]),
        allreduce_time=lambda nbytes, comm: alone.concurrent("allreduce", nbytes, comm.groups),
        dispatch_kernels=policy.dispatch_kernels,
    )
    assert est[k].step_s <= est[1].step_s


@pytest.mark.parametrize("value", ["fast", "Cost", 2, None])
def test_a_packing_value_not_allowed_is_one_error(value):
    with pytest.raises(ConfigError) as e:
        make_training_policy("lina", packing=value)
    assert e.value.field == "policies.lina.packing" and "cost, paper, off" in str(e.value)
