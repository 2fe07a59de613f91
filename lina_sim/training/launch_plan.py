"""The step's micro-ops as a policy plans them, from one estimate every rank shares.

A policy may plan its launches once per step (:meth:`TrainingPolicy.plan`), e.g. Lina
deciding between which two all-to-alls each allreduce micro-op runs. For that it needs
the step's program as it would run without allreduce traffic: :func:`estimate_program`
list-schedules one rank's compute and all-to-all streams with the compute model's op
times and each all-to-all alone on the network. The program is SPMD, so one rank's
estimate is every rank's, and every rank derives the same plan from it: what keeps
collectives that wait on each other from deadlocking.

The simulator's engine and the real executor both call :func:`planned_micro_ops`, so a
measured run executes the very plan the simulator predicts. Pure: no simpy, no torch.
Times in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lina_sim.policies.training.base import ProgramEstimate, TrainingPolicy
from lina_sim.workload.comm import ALL_TO_ALL, MicroOp


def estimate_program(
    graph: Any, op_time: Callable[[Any], float], a2a_time: Callable[[Any], float], compute_scale: float = 1.0
) -> ProgramEstimate:
    """One rank's step with no allreduce: compute ops in program order on one stream,
    each ``op_time(op) * compute_scale`` long once its dependencies are done, and
    all-to-alls in program order on another, each ``a2a_time(op)`` long."""
    end: dict[int, float] = {}
    a2a_seq: dict[int, int] = {}
    a2a_start: list[float] = []
    a2a_end: list[float] = []
    op_end: dict[int, float] = {}
    min_gap: dict[int, int] = {}
    t_compute = t_a2a = 0.0
    need = 0  # all-to-alls the compute stream has waited for so far
    for op in graph.ops:
        deps_done = max((end[d] for d in op.deps), default=0.0)
        if op.kind == ALL_TO_ALL:
            start = max(deps_done, t_a2a)
            t_a2a = end[op.id] = start + a2a_time(op)
            a2a_seq[op.id] = len(a2a_start)
            a2a_start.append(start)
            a2a_end.append(t_a2a)
            continue
        need = max([need] + [a2a_seq[d] + 1 for d in op.deps if d in a2a_seq])
        start = max(deps_done, t_compute)
        t_compute = end[op.id] = op_end[op.id] = start + op_time(op) * compute_scale
        min_gap[op.id] = need
    return ProgramEstimate(tuple(a2a_start), tuple(a2a_end), op_end, min_gap)


def planned_micro_ops(
    graph: Any,
    policy: TrainingPolicy,
    cluster: Any,
    op_time: Callable[[Any], float],
    alone: Callable[[str, float, tuple[int, ...]], float],
) -> tuple[MicroOp, ...]:
    """``graph.micro_ops(policy)`` with the policy's launch plan applied.

    ``alone(kind, bytes, group)`` is a collective's time alone on the cluster's network
    (:class:`~lina_sim.experiments.microbench.AloneTimes`). On a cluster whose ranks share a host's
    cores (an emulated testbed) all ranks compute at once, so compute is estimated
    ``ranks / cores`` times slower.
    """
    micro = graph.micro_ops(policy)
    if not policy.plans_launches:
        return micro
    comms = graph.communicators
    scale = max(1.0, graph.world_size / cluster.host.cores) if cluster.shares_cores else 1.0

    def a2a_time(op: Any) -> float:
        return alone("all_to_all", op.bytes, comms[op.communicator].groups[0])

    def allreduce_s(m: MicroOp) -> float:
        return alone("allreduce", m.nbytes, comms[m.communicator].groups[0])

    program = estimate_program(graph, op_time, a2a_time, scale)
    return policy.plan(micro, program, allreduce_s)
