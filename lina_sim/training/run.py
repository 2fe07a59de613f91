"""A training scenario end to end: resolve it, simulate one step per policy, summarise.

For each policy: choose the packing (experts per device) and pipelining degree the
policy asks for, build the step's op graph, run it on the engine, and report the step
time, the breakdown (compute, exposed all-to-all, exposed allreduce, idle) and how much
each backward all-to-all was slowed down against the same all-to-all run alone.

The simulator is deterministic and the optimizer step waits for every gradient, so
consecutive steps are identical: one step is simulated per policy. ``steps`` is kept
for the real runtime, which reports medians over steps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lina_sim.config.fields import Field, check_fields, check_mapping
from lina_sim.config.scenario import Scenario
from lina_sim.errors import ConfigError
from lina_sim.hardware.compute import ProfileComputeModel, RooflineComputeModel
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.network.alone import AloneTimes
from lina_sim.network.collectives import (
    COLLECTIVES_ALLOWED,
    CollectiveAlgos,
    algorithm_field,
    check_nccl_hardware,
    check_proto,
    protocol_field,
    renamed_allreduce,
)
from lina_sim.policies.registry import PolicyEntry, make_training_policy, policy_entries
from lina_sim.results.rows import point_columns
from lina_sim.training.breakdown import mean_breakdown
from lina_sim.training.engine import StepResult, TrainingEngine
from lina_sim.workload.graph import build_training_graph, micro_op_estimates, packing_candidates
from lina_sim.workload.model import ModelSpec
from lina_sim.workload.resolve import resolve_cluster_and_model

# The blocks of a training scenario this module reads (the cluster and the model are
# read by lina_sim.workload.resolve, the policies' parameters by their PARAMS).
STEPS = Field(int, 1, minimum=1, help="training steps the real runtime measures (the simulator runs one)")
COMPUTE_FIELDS: dict[str, Field] = {
    "model": Field(str, "roofline", choices=("roofline", "profile"), help="how compute ops are timed"),
    "profile": Field(
        str,
        None,
        allow_none=True,
        help="with model: profile, the path of a measured profile table (.yaml, .yml or .csv)",
    ),
}
# The scenario's collectives: block: the allreduce algo and proto (NCCL_ALGO / NCCL_PROTO
# vocabulary) and the all-to-all algorithm; the fields of CollectiveAlgos.
COLLECTIVES_FIELDS: dict[str, Field] = {
    "algo": algorithm_field("allreduce"),
    "proto": protocol_field(),
    "all_to_all": algorithm_field("all_to_all"),
}


@dataclass
class TrainingSetup:
    """A training scenario with every part resolved and validated."""

    scenario: Scenario
    cluster: ClusterSpec
    model: ModelSpec
    policies: list[PolicyEntry]
    algos: CollectiveAlgos
    compute: Any
    steps: int

    def describe(self) -> dict[str, Any]:
        """The fully resolved scenario as plain data (for caching and result tables)."""
        return {
            "kind": "training",
            "seed": self.scenario.seed,
            "steps": self.steps,
            "cluster": dataclasses.asdict(self.cluster),
            "model": dataclasses.asdict(self.model),
            "policies": [{"name": p.name, "label": p.label, **p.params} for p in self.policies],
            "collectives": dataclasses.asdict(self.algos),
            "compute": getattr(self.compute, "source", "roofline"),
        }


def parse_policies(entries: Any, where: str = "policies") -> list[PolicyEntry]:
    out = policy_entries(entries, "training", where)
    for e in out:
        make_training_policy(e.name, _where=f"{where}[{e.name}]", **e.params)  # checks the parameters
    return out


def _compute_model(block: Any, cluster: ClusterSpec, dtype: str):
    roofline = RooflineComputeModel.from_cluster(cluster, dtype)
    if block is None:
        return roofline
    # Not strict: other keys have always been ignored here, and a sweep over one of them
    # is reported as having no effect rather than as an error.
    c = check_fields(
        check_mapping(block, "compute", ["model: roofline", "model: profile, profile: PATH"]),
        COMPUTE_FIELDS,
        "compute",
        strict=False,
    )
    if c["model"] == "roofline":
        return roofline
    if c["profile"] is None:
        raise ConfigError("compute.profile", "missing: the path of a measured profile table")
    return ProfileComputeModel.load(c["profile"], fallback=roofline)


def _algos(block: Any, cluster: ClusterSpec | None = None) -> CollectiveAlgos:
    """The ``collectives:`` block, checked; with ``cluster``, a forced NCCL algorithm or
    protocol is also checked against its hardware (``nvls`` needs Hopper and NVSwitch)."""
    if block is None:
        return CollectiveAlgos()
    block = check_mapping(block, "collectives", COLLECTIVES_ALLOWED)
    renamed_allreduce(block, "collectives")
    algos = CollectiveAlgos(**check_fields(block, COLLECTIVES_FIELDS, "collectives"))
    check_proto(algos.algo, algos.proto, "collectives.proto")
    if cluster is not None:
        check_nccl_hardware(cluster, algos.algo, algos.proto, "collectives")
    return algos


def resolve_training(sc: Scenario) -> TrainingSetup:
    """Validate every field of a training scenario, naming the YAML path of any error."""
    d = sc.data
    cluster, model = resolve_cluster_and_model(d, sc.source)
    policies = parse_policies(d.get("policies"))
    steps = STEPS.get(d, "steps", "")
    for key in ("serving",):
        if key in d:
            raise ConfigError(key, "only allowed in an inference scenario (kind: inference)")
    return TrainingSetup(
        sc,
        cluster,
        model,
        policies,
        _algos(d.get("collectives"), cluster),
        _compute_model(d.get("compute"), cluster, model.dtype),
        steps,
    )


@dataclass
class PolicyRun:
    """One policy's simulated step."""

    entry: PolicyEntry
    experts_per_device: int
    pipeline_degree: int
    result: StepResult
    breakdown: dict[str, float]
    a2a_slowdown: np.ndarray
    wall_s: float


def choose_shape(setup: TrainingSetup, entry: PolicyEntry, alone: AloneTimes) -> tuple[Any, int, int]:
    """The policy object, its experts per device k (from its packing rule, fed the compute
    model's FFN time and the network's all-to-all time alone) and its pipelining degree r.
    The simulator and the real executor both call this, so they run the same shape."""
    cluster, model = setup.cluster, setup.model
    policy = make_training_policy(entry.name, **entry.params)
    r = policy.pipeline_degree
    cands = packing_candidates(model, cluster.world_size)
    estimates = micro_op_estimates(
        model,
        cluster,
        r,
        ffn_time=setup.compute.op_time,
        a2a_time=lambda op, comm: alone("all_to_all", op.bytes, comm.groups[0]),
        allreduce_time=lambda nbytes, comm: alone.concurrent("allreduce", nbytes, comm.groups),
    )
    return policy, policy.experts_per_device(cands, estimates), r


def run_policy(setup: TrainingSetup, entry: PolicyEntry, alone: AloneTimes | None = None) -> PolicyRun:
    t0 = time.perf_counter()
    cluster, model = setup.cluster, setup.model
    alone = alone or AloneTimes(cluster, setup.algos)
    try:
        policy, k, r = choose_shape(setup, entry, alone)
        graph = build_training_graph(model, cluster, experts_per_device=k, pipeline_degree=r)
        res = TrainingEngine(graph, policy, cluster, setup.compute.op_time, setup.algos, alone.topology, alone=alone)
        res = res.run()
    except ConfigError as e:  # an allreduce NCCL cannot run on one of the step's communicators
        if e.field not in ("algo", "proto"):
            raise
        raise ConfigError(f"collectives.{e.field}", e.problem, e.allowed) from None
    # Rank 0's backward all-to-alls; a one-rank group moves nothing, so it has no slowdown.
    bwd = [c for c in res.collectives if c.mop.is_a2a and c.mop.phase == "bwd" and c.group[0] == 0]
    base = [(c.duration, alone("all_to_all", c.mop.nbytes, c.group)) for c in bwd if len(c.group) > 1]
    slow = np.array([d / a for d, a in base if a > 0])
    return PolicyRun(entry, k, r, res, mean_breakdown(res.timeline, res.step_time), slow, time.perf_counter() - t0)


def run_training(setup: TrainingSetup) -> tuple[pd.DataFrame, list[PolicyRun]]:
    """Every policy of the scenario; one result row per policy."""
    alone = AloneTimes(setup.cluster, setup.algos)
    runs = [run_policy(setup, e, alone) for e in setup.policies]
    base = runs[0].result.step_time
    rows = []
    for run in runs:
        s = run.a2a_slowdown
        rows.append(
            {
                **point_columns(setup, run.entry.label, run.entry.name),
                "experts_per_device": run.experts_per_device,
                "pipeline_degree": run.pipeline_degree,
                "step_time_s": run.result.step_time,
                "speedup": base / run.result.step_time,
                **{f"{k}_s": v for k, v in run.breakdown.items()},
                "bwd_a2a_slowdown_median": float(np.median(s)) if s.size else float("nan"),
                "bwd_a2a_slowdown_p95": float(np.percentile(s, 95)) if s.size else float("nan"),
                "bwd_a2a_slowdown_max": float(s.max()) if s.size else float("nan"),
                "collectives": len(run.result.collectives),
                "sim_wall_s": run.wall_s,
                **{k: v for k, v in setup.scenario.swept.items()},
            }
        )
    return pd.DataFrame(rows), runs
