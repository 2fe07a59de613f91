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
from lina_sim.hardware.machine import NETWORK_BYTES_PER_RANK, available_memory, gigabytes
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.network.alone import AloneTimes
from lina_sim.network.collectives import (
    ALGORITHMS,
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
from lina_sim.training.engine import StepResult, TrainingEngine, replica_size_estimate
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
    """Validate every field of a training scenario, naming the YAML path of any error:
    each block, then what ties them together before anything runs (the collectives on
    every communicator a step may use, the model in the GPU's memory, the simulation in
    this machine's memory)."""
    d = sc.data
    cluster, model = resolve_cluster_and_model(d, sc.source)
    policies = parse_policies(d.get("policies"))
    steps = STEPS.get(d, "steps", "")
    for key in ("serving",):
        if key in d:
            raise ConfigError(key, "only allowed in an inference scenario (kind: inference)")
    algos = _algos(d.get("collectives"), cluster)
    check_layouts(cluster, model, algos)
    check_gpu_memory(cluster, model)
    check_host_memory(cluster, model, policies)
    return TrainingSetup(
        sc,
        cluster,
        model,
        policies,
        algos,
        _compute_model(d.get("compute"), cluster, model.dtype),
        steps,
    )


# -- what the blocks must satisfy together ------------------------------------------------
def _groups(n: int, ep: int, strided: bool, period: int) -> list[np.ndarray]:
    """The first groups of a step's ``ep`` (``strided=False``: ``ep`` consecutive ranks) or
    ``expert_dp`` (rank i, i + ep, ...) communicator, as built by
    :func:`lina_sim.workload.graph.build_training_graph`. Only the first ``period`` are
    listed: shifting a group by a whole node (``period`` = GPUs per node) moves every rank
    to the next node, so the later groups have the same ranks-per-node counts."""
    if strided:
        return [np.arange(i, n, ep) for i in range(min(ep, period))]
    return [np.arange(g * ep, (g + 1) * ep) for g in range(min(n // ep, period))]


def _per_node(group: np.ndarray, gpus_per_node: int) -> list[int]:
    """Ranks of ``group`` on each node it spans (ranks ascending, so nodes are too)."""
    return np.unique(group // gpus_per_node, return_counts=True)[1].tolist()


def check_layouts(cluster: ClusterSpec, model: ModelSpec, algos: CollectiveAlgos) -> None:
    """Every communicator a training step may use runs the scenario's collectives.

    ``hierarchical`` (all-to-all, allreduce) needs the same number of ranks on every node
    a group spans. Every policy's shape is chosen from estimates of *every* packing k
    (:func:`choose_shape`), so every k's expert-parallel groups (``experts / k``
    consecutive ranks) and expert replicas (stride ``experts / k``) must pass; else the
    run would fail for every policy. A ConfigError on ``collectives.<field>`` naming the
    group, its ranks per node and what runs here."""
    n, gpn = cluster.world_size, cluster.gpus_per_node
    wanted = [("all_to_all", algos.all_to_all, (False,)), ("algo", algos.algo, (False, True))]
    for fld, algo, kinds in wanted:
        if algo != "hierarchical" or cluster.nodes == 1:
            continue
        op = "all_to_all" if fld == "all_to_all" else "allreduce"
        for k in packing_candidates(model, n):
            ep = model.experts // k
            for strided in kinds if op == "allreduce" else (False,):
                size = n // ep if strided else ep
                for grp in _groups(n, ep, strided, gpn) if size > 1 else ():
                    counts = _per_node(grp, gpn)
                    if len(set(counts)) > 1:
                        what = "expert replicas" if strided else "expert-parallel group"
                        ranks = f"{grp[0]}, {grp[1]}, ..., {grp[-1]}" if strided else f"{grp[0]}..{grp[-1]}"
                        others = [a for a in ALGORITHMS[op] if a != "hierarchical" and _runs(cluster, op, a)]
                        raise ConfigError(
                            f"collectives.{fld}",
                            f"hierarchical {op} needs the same number of ranks on every node of a group, but "
                            f"with {gpn} GPUs per node the {what} of {size} ranks at {k} experts per device "
                            f"(ranks {ranks}) sit {counts} per node",
                            f"{', '.join(others)}; or hierarchical on a layout whose groups of "
                            f"{', '.join(map(str, _group_sizes(model, n, op)))} ranks sit evenly on nodes of "
                            f"gpus_per_node GPUs (each size a divisor or a multiple of it)",
                        )


def _runs(cluster: ClusterSpec, op: str, algo: str) -> bool:
    """Whether ``algo`` exists for ``op`` on this hardware (``nvls`` needs NVSwitch and Hopper)."""
    if op != "allreduce":
        return True
    try:
        check_nccl_hardware(cluster, algo)
    except ConfigError:
        return False
    return True


def _group_sizes(model: ModelSpec, n: int, op: str) -> list[int]:
    """The group sizes a hierarchical ``op`` runs on over every packing, largest first."""
    eps = {model.experts // k for k in packing_candidates(model, n)}
    sizes = eps | ({n // ep for ep in eps} if op == "allreduce" else set())
    return sorted((s for s in sizes if s > 1), reverse=True)


def check_gpu_memory(cluster: ClusterSpec, model: ModelSpec) -> None:
    """The model's training memory per GPU (:meth:`ModelSpec.training_memory` at the
    smallest packing, what every policy but a packing one runs) fits the GPU's
    ``memory_bytes``; else a ConfigError on ``model.micro_batch`` (with the largest that
    fits) or, when even the parameters' state does not fit, on ``model``. A scenario that
    sets ``model.check_memory: false`` is not checked (e.g. to study a step that would
    need activation recomputation or ZeRO)."""
    if not model.check_memory:
        return
    k = packing_candidates(model, cluster.world_size)[0]
    mem = model.training_memory(k)
    have = cluster.gpu.memory_bytes
    if mem.total <= have:
        return
    need = (
        f"{gigabytes(mem.total)} per GPU ({gigabytes(mem.states)} of weights, gradients and Adam state: 16 B x "
        f"{mem.params / 1e6:.1f}M local parameters; {gigabytes(mem.activations)} of activations for micro_batch "
        f"{model.micro_batch}) but {cluster.gpu.name} has {gigabytes(have)} (cluster.gpu.memory_bytes)"
    )
    per_sequence = mem.activations / model.micro_batch
    fits = int((have - mem.states) // per_sequence) if have > mem.states else 0
    if fits >= 1:
        raise ConfigError(
            "model.micro_batch", f"training needs {need}", f"micro_batch <= {fits}, or model.check_memory: false"
        )
    raise ConfigError(
        "model",
        f"training needs {need}",
        "a smaller model (layers, d_model, d_ff, vocab), or model.check_memory: false",
    )


# What one simulated training step holds in host memory, measured with ru_maxrss (above
# the interpreter with lina_sim imported) and tracemalloc, one policy. The engine holds
# its simulated ranks' rank-ops (a compute op, all-to-all or gradient tensor of the step
# on one rank: its simpy events, scheduler entries and timeline row); since it simulates
# one block of data-parallel replicas where they sit alike on the cluster
# (lina_sim.training.engine.replica_size), that is often far fewer ranks than GPUs:
#
#   preset / model                       GPUs  simulated  rank-ops  peak RSS  tracemalloc
#   dgx-a100 / transformer-xl-12            8       8        1784   10.8 MB        -
#   dgx-a100 / transformer-xl-12          128     128       28544   27.3 MB      9.9 MB
#   dgx-a100 / transformer-xl-12          256     256       57088   37.2 MB     26.2 MB
#   dgx-h100-superpod / deepseek-moe-16b  512     512      244224    147 MB        -
#   dgx-h100-superpod / deepseek-moe-16b 2048    2048      976896    547 MB        -
#   dgx-h100-superpod / deepseek-moe-16b 2048      64       30528     48 MB        -
#   dgx-h100-superpod / deepseek-moe-16b 16384     64       30528    179 MB        -
#   dgx-h100-superpod / deepseek-moe-16b 16384      8 (k=8)  5112    167 MB        -
#
# A rank-op costs 350-600 B (560-600 B on deepseek-moe-16b). Beyond them the step holds,
# per GPU of the cluster, what the network keeps of every rank (the topology's links, the
# per-path-class steps and NCCL tables of the collectives over all ranks, the
# communicators' groups): 9.8-10.5 KB per GPU at 16,384 GPUs (the last two rows), as
# ``lina-sim collective`` and ``contention`` hold (machine.NETWORK_BYTES_PER_RANK). No
# per-flow state is left: an even all-to-all's flows are counted per path class
# (Topology.block_pairs), never listed. The constants round up.
HOST_FIXED_BYTES = 20e6
HOST_BYTES_PER_RANK_OP = 600.0
# What a finished policy's run keeps (its timeline) until the scenario's table prints.
HOST_KEPT_PER_RANK_OP = 60.0


@dataclass(frozen=True)
class HostMemory:
    """The host memory one training scenario point needs to simulate, from the sizes of
    what it builds: ``rank_ops`` (the simulated ranks x the step's ops and gradient
    tensors per rank), the network state of every one of the ``gpus``, and the
    ``policies`` run one after another. ``simulated``: the ranks the engine runs (one
    block of data-parallel replicas, or every GPU)."""

    gpus: int
    simulated: int
    rank_ops: int
    policies: int

    @property
    def total(self) -> float:
        """Bytes: fixed + per rank-op (one policy's peak, plus what the others keep) + per GPU."""
        kept = HOST_KEPT_PER_RANK_OP * (self.policies - 1)
        return HOST_FIXED_BYTES + self.rank_ops * (HOST_BYTES_PER_RANK_OP + kept) + self.gpus * NETWORK_BYTES_PER_RANK


def packings(model: ModelSpec, n: int, policies: list[PolicyEntry]) -> list[int]:
    """The experts per device any of ``policies`` may run ``model`` (experts resolved) at
    on ``n`` GPUs: the smallest valid packing, and for a packing policy (``packing_rule``
    other than ``off``) every valid one up to its ``max_experts_per_device``."""
    cands = packing_candidates(model, n)
    out = {cands[0]}
    for e in policies:
        policy = make_training_policy(e.name, **e.params)
        if getattr(policy, "packing_rule", "off") != "off":
            out.update(k for k in cands if k <= policy.max_experts_per_device)
    return sorted(out)


def host_memory(cluster: ClusterSpec, model: ModelSpec, policies: list[PolicyEntry], per_rank: int) -> HostMemory:
    """:class:`HostMemory` of simulating ``model`` (experts resolved) on ``cluster`` with
    ``policies`` and ``per_rank`` ops and gradient tensors per rank, at the packing of
    those policies that simulates the most ranks (:func:`replica_size_estimate`); counts
    only, so it answers in microseconds at any scale. It counts one block of replicas:
    where collectives across replicas load them unlike beside the all-to-alls (DeepSpeed,
    Tutel), the engine simulates one block per class of replicas
    (:class:`~lina_sim.training.engine.ReplicaClasses`; up to 24 on the presets measured),
    known only once the step's collectives are laid out, and :func:`check_simulated_ranks`
    holds those to the same budget before the engine builds them."""
    n = cluster.world_size
    sim = max(replica_size_estimate(cluster, model.experts // k) for k in packings(model, n, policies))
    return HostMemory(n, sim, sim * per_rank, len(policies))


# One core's CPU time per policy: per simulated rank-op (benchmarks/bench_training.py: 21
# us at 16 GPUs, 11 us at 1024 GPUs; the larger) and, for the network's collectives over
# every rank, per GPU and rank-op (benchmarks/bench_frontier.py, 16,384 GPUs simulated
# as one replica: 0.4-0.8 us; rounded up). Upper estimates.
CPU_S_PER_RANK_OP = 20e-6
CPU_S_PER_GPU_OP = 1e-6


def ops_per_rank(model: ModelSpec, world_size: int, policies: list[PolicyEntry]) -> int:
    """The ops and gradient tensors of one rank's step, the same on every rank: at the
    smallest packing (the largest expert-parallel group) and the deepest pipelining of
    ``policies``, the largest program any of them runs."""
    r = max((make_training_policy(e.name, **e.params).pipeline_degree for e in policies), default=1)
    g = build_training_graph(model, world_size, None, r)
    return len(g.ops) + len(g.grad_requests)


def expected_cpu_s(setup: TrainingSetup) -> float:
    """About how long simulating ``setup``'s policies takes on one core (s), from the size
    of the step's program, the ranks simulated and the GPUs; what ``lina-sim run`` warns
    with before a long point."""
    n = setup.cluster.world_size
    per_rank = ops_per_rank(setup.model, n, setup.policies)
    mem = host_memory(setup.cluster, setup.model, setup.policies, per_rank)
    return (mem.simulated * CPU_S_PER_RANK_OP + n * CPU_S_PER_GPU_OP) * per_rank * len(setup.policies)


def check_host_memory(cluster: ClusterSpec, model: ModelSpec, policies: list[PolicyEntry]) -> None:
    """Refuse, before anything is built, a point whose simulation would not fit in this
    machine's available memory (:func:`host_memory`): a ConfigError on ``cluster.nodes``
    saying how big it would be and how many nodes of this model would fit."""
    have = available_memory()
    if have is None:
        return
    per_rank = ops_per_rank(model, cluster.world_size, policies)

    def need(nodes: int) -> HostMemory:
        n = nodes * cluster.gpus_per_node
        # One expert per GPU (experts unset) grows with the cluster; a fixed count stays.
        experts = n if model.experts == cluster.world_size else model.experts
        if experts % n and n % experts:
            experts = model.experts
        m = dataclasses.replace(model, experts=experts)
        return host_memory(cluster.with_nodes(nodes) if nodes != cluster.nodes else cluster, m, policies, per_rank)

    est = need(cluster.nodes)
    if est.total <= have:
        return
    lo, hi = 0, cluster.nodes  # the largest node count that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid).total <= have else (lo, mid - 1)
    fits = f"cluster.nodes <= {lo} ({lo * cluster.gpus_per_node} GPUs) for this model" if lo else "none"
    raise ConfigError(
        "cluster.nodes",
        f"simulating {est.gpus} GPUs ({model.experts} experts, {len(policies)} "
        f"{'policy' if len(policies) == 1 else 'policies'}) needs about "
        f"{gigabytes(est.total)} of memory ({est.rank_ops:,} rank-ops on {est.simulated:,} simulated ranks, "
        f"the network state of {est.gpus:,} GPUs); "
        f"this machine has {gigabytes(have)} available",
        fits,
    )


def check_simulated_ranks(
    cluster: ClusterSpec, model: ModelSpec, policies: list[PolicyEntry], graph: Any, simulated: int
) -> None:
    """Refuse, before the engine builds them, ``simulated`` ranks of ``graph`` that would not
    fit in this machine's available memory: :func:`check_host_memory` counts one block of
    replicas, and where the step's collectives across replicas load them unlike, the engine
    simulates one block per class of replicas (:class:`~lina_sim.training.engine.ReplicaClasses`),
    known only once the step's collectives are laid out. The same :class:`HostMemory`
    rule, at the ranks the engine is about to simulate; a ConfigError on ``cluster.nodes``."""
    have = available_memory()
    if have is None:
        return
    per_rank = len(graph.ops) + len(graph.grad_requests)
    est = HostMemory(cluster.world_size, simulated, simulated * per_rank, len(policies))
    if est.total <= have:
        return
    raise ConfigError(
        "cluster.nodes",
        f"simulating {est.gpus} GPUs ({model.experts} experts) needs about {gigabytes(est.total)} of memory: "
        f"its data-parallel replicas fall in classes that run unlike ({est.rank_ops:,} rank-ops on "
        f"{est.simulated:,} simulated ranks, the network state of {est.gpus:,} GPUs); "
        f"this machine has {gigabytes(have)} available",
        "fewer nodes",
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
        dispatch_kernels=policy.dispatch_kernels,
    )
    return policy, policy.experts_per_device(cands, estimates), r


def run_policy(
    setup: TrainingSetup, entry: PolicyEntry, alone: AloneTimes | None = None, all_ranks: bool = False
) -> PolicyRun:
    """One policy's step (``all_ranks``: simulate every rank, not one replica for all;
    :class:`~lina_sim.training.engine.TrainingEngine`)."""
    t0 = time.perf_counter()
    cluster, model = setup.cluster, setup.model
    alone = alone or AloneTimes(cluster, setup.algos)
    try:
        policy, k, r = choose_shape(setup, entry, alone)
        graph = build_training_graph(
            model, cluster, experts_per_device=k, pipeline_degree=r, dispatch_kernels=policy.dispatch_kernels
        )
        engine = TrainingEngine(
            graph,
            policy,
            cluster,
            setup.compute.op_time,
            setup.algos,
            alone.topology,
            alone=alone,
            all_ranks=all_ranks,
            check_ranks=lambda sim: check_simulated_ranks(cluster, setup.model, setup.policies, graph, sim),
        )
        res = engine.run()
    except ConfigError as e:  # an allreduce NCCL cannot run on one of the step's communicators
        if e.field not in ("algo", "proto"):
            raise
        raise ConfigError(f"collectives.{e.field}", e.problem, e.allowed) from None
    # Rank 0's backward all-to-alls; a one-rank group moves nothing, so it has no slowdown.
    bwd = [c for c in res.collectives if c.mop.is_a2a and c.mop.phase == "bwd" and c.group[0] == 0]
    base = [(c.duration, alone("all_to_all", c.mop.nbytes, c.group)) for c in bwd if len(c.group) > 1]
    slow = np.array([d / a for d, a in base if a > 0])
    return PolicyRun(entry, k, r, res, res.mean_breakdown(), slow, time.perf_counter() - t0)


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
                "collectives": run.result.collective_count,
                "sim_wall_s": run.wall_s,
                **{k: v for k, v in setup.scenario.swept.items()},
            }
        )
    return pd.DataFrame(rows), runs
