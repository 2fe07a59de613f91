"""Runs one training step's op graph on the simulated cluster under a training policy.

Every rank has three streams: ``compute`` (runs compute ops in program order once their
data dependencies are done), ``a2a`` and ``allreduce`` (each runs the collectives
launched on it, in launch order, one at a time, as a CUDA stream runs NCCL kernels).
Communication goes through the policy: a micro-op is *submitted* to the rank's
scheduler when it is ready (an all-to-all when its op's dependencies are done, a
gradient micro-op when the compute op producing its tensors is done); the policy's
``select`` decides when it is *launched* onto its stream; it *starts* moving bytes when
every rank of its communicator group has it at the head of that stream (the NCCL
rendezvous), and it completes for all of them together.

With ``policy.isolated_allreduce`` (the ``no-contention`` bound) allreduce flows run on
their own copy of every link. On a cluster whose ranks share a host's CPU cores
(``cluster.host``, an emulated testbed) compute ops of all ranks share those cores
through a :class:`~lina_sim.hardware.processors.ProcessorPool`, and a collective that lived while
compute oversubscribed them waits the host's calibrated per-step delay on top of its
transfer; otherwise each rank computes on its own device. Output: the one timeline (docs/ARCHITECTURE.md, contract 6)
(seconds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import simpy

from lina_sim.network.collectives import CollectiveAlgos, Collectives
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.training.launch_plan import planned_micro_ops
from lina_sim.network.alone import AloneTimes
from lina_sim.network.fluid import FluidNetwork
from lina_sim.policies.training.base import RankScheduler, TrainingPolicy, owed_per_gap, submission_order
from lina_sim.workload.comm import MicroOp
from lina_sim.hardware.processors import ProcessorPool
from lina_sim.results.timeline import Event, Timeline
from lina_sim.hardware.topology import Topology

STREAMS = ("compute", "a2a", "allreduce")


@dataclass
class CollectiveRecord:
    """One collective as it ran on the network: [start, end) in s, its group and bytes."""

    mop: MicroOp
    group: tuple[int, ...]
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Launch:
    """A policy decision: at ``time`` (s) rank ``rank`` launched ``mop``, while
    ``pending_a2a`` all-to-alls were pending and ``running_a2a`` launched and unfinished."""

    time: float
    rank: int
    mop: MicroOp
    pending_a2a: int
    running_a2a: int


@dataclass
class StepResult:
    """The outcome of one simulated step: step time (s), the timeline, every collective
    as it ran, and every launch decision."""

    step_time: float
    timeline: pd.DataFrame
    collectives: list[CollectiveRecord] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)


class _RankState:
    """One rank's scheduler, stream queues and completion events."""

    def __init__(self, rank: int, policy: TrainingPolicy, env: simpy.Environment, owed: dict[int, int]):
        self.rank = rank
        self.sched = RankScheduler(policy, validate=False, owed=owed)  # the policy tests check the contract
        self.queues: dict[str, deque[MicroOp]] = {"a2a": deque(), "allreduce": deque()}
        self.busy: dict[str, bool] = {"a2a": False, "allreduce": False}
        self.done: dict[int, simpy.Event] = {}
        self.env = env
        self.grads_left = 0
        self.grads_done = env.event()
        self.compute_done = 0

    def done_event(self, op_id: int) -> simpy.Event:
        ev = self.done.get(op_id)
        if ev is None:
            ev = self.done[op_id] = self.env.event()
        return ev


class TrainingEngine:
    """Simulates one training step of ``graph`` under ``policy`` on ``cluster``.

    ``op_time(op) -> seconds`` is the compute model (roofline or measured profile);
    ``alone`` (collective times alone on the network) feeds a policy's launch plan.
    """

    def __init__(self, graph: Any, policy: TrainingPolicy, cluster: ClusterSpec,
                 op_time: Callable[[Any], float], algos: CollectiveAlgos = CollectiveAlgos(),
                 topology: Topology | None = None, record_launches: bool = False, alone: AloneTimes | None = None):
        self.record_launches = record_launches
        self.graph = graph
        self.policy = policy
        self.cluster = cluster
        self.op_time = op_time
        self.algos = algos
        self.topology = topology or Topology(cluster)
        self.alone = alone or AloneTimes(cluster, algos, self.topology)
        if graph.world_size != self.topology.world_size:
            raise ValueError(f"graph is for {graph.world_size} ranks, cluster has {self.topology.world_size}")

    def run(self) -> StepResult:
        env = simpy.Environment()
        net = FluidNetwork(env, self.topology)
        a2a_coll = Collectives(net)
        ar_coll = Collectives(FluidNetwork(env, self.topology)) if self.policy.isolated_allreduce else a2a_coll
        host = self.cluster.host
        cores = ProcessorPool(env, host.cores) if self.cluster.shares_cores else None
        g = self.graph
        n = g.world_size
        tl = Timeline()
        records: list[CollectiveRecord] = []
        micro_ops = planned_micro_ops(g, self.policy, self.cluster, self.op_time, self.alone)
        owed = owed_per_gap(micro_ops)
        ranks = [_RankState(r, self.policy, env, owed) for r in range(n)]
        a2a_mops = [m for m in micro_ops if m.is_a2a]
        grad_mops = submission_order(micro_ops)
        for st in ranks:
            st.grads_left = len(grad_mops)
            if not grad_mops:
                st.grads_done.succeed()
        ops = g.ops
        compute_ops = [o for o in ops if o.kind == "compute"]
        arrivals: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        launches: list[Launch] = []
        record_launches = self.record_launches

        def group_of(m: MicroOp, rank: int) -> tuple[int, ...]:
            return g.communicators[m.communicator].group_of(rank)

        def poll(st: _RankState) -> None:
            before = st.sched.view() if record_launches else None
            for m in st.sched.poll():
                if before is not None:
                    running = sum(1 for x in before.in_flight if x.is_a2a)
                    launches.append(Launch(env.now, st.rank, m, len(before.pending_a2a), running))
                st.queues[m.stream].append(m)
                kick(st, m.stream)

        def kick(st: _RankState, stream: str) -> None:
            if st.busy[stream] or not st.queues[stream]:
                return
            st.busy[stream] = True
            m = st.queues[stream][0]
            grp = group_of(m, st.rank)
            key = (m.id, grp)
            arrived = arrivals.setdefault(key, [])
            arrived.append(st.rank)
            if len(arrived) == len(grp):
                del arrivals[key]
                env.process(run_collective(m, grp))

        def run_collective(m: MicroOp, grp: tuple[int, ...]):
            start = env.now
            kind = "all_to_all" if m.is_a2a else "allreduce"
            delay = host.collective_delay_s(kind, len(grp)) if cores is not None else 0.0
            since = (start, cores.excess_time()) if delay > 0 else None
            if m.is_a2a:
                yield a2a_coll.all_to_all(grp, m.nbytes, self.algos.all_to_all, tag=m.id)
            else:
                yield ar_coll.allreduce(grp, m.nbytes, self.algos.allreduce, tag=m.id)
            if since is not None:
                owed = cores.owed(delay, host.reference_excess, since)
                if owed > 0:
                    yield env.process(cores.pay(owed, host.reference_excess))
            end = env.now
            records.append(CollectiveRecord(m, grp, start, end))
            for r in grp:
                st = ranks[r]
                tl.add(Event(r, m.stream, m.id, kind, start, end, m.layer, m.chunk, m.nbytes))
                st.queues[m.stream].popleft()
                st.busy[m.stream] = False
                st.sched.complete(m)
                if m.is_a2a:
                    st.done_event(m.op_id).succeed()
                else:
                    st.grads_left -= 1
                    if st.grads_left == 0:
                        st.grads_done.succeed()
            for r in grp:
                st = ranks[r]
                poll(st)
                kick(st, m.stream)

        def compute_stream(st: _RankState):
            for op in compute_ops:
                for d in op.deps:
                    ev = st.done_event(d)
                    if not ev.processed:
                        yield ev
                if op.waits_for_gradients and not st.grads_done.processed:
                    yield st.grads_done
                start = env.now
                dur = self.op_time(op)
                if dur > 0:
                    yield cores.run(dur) if cores is not None else env.timeout(dur)
                tl.add(Event(st.rank, "compute", op.name, "compute", start, env.now, op.layer, op.chunk, 0.0))
                st.done_event(op.id).succeed()
                st.compute_done += 1

        def a2a_submitter(st: _RankState):
            for m in a2a_mops:
                for d in ops[m.op_id].deps:
                    ev = st.done_event(d)
                    if not ev.processed:
                        yield ev
                st.sched.submit(m)
                poll(st)

        def grad_submitter(st: _RankState):
            for m in grad_mops:
                ev = st.done_event(m.ready_after)
                if not ev.processed:
                    yield ev
                st.sched.submit(m)
                poll(st)

        for st in ranks:
            env.process(compute_stream(st))
            env.process(a2a_submitter(st))
            env.process(grad_submitter(st))
        env.run()
        unfinished = [st.rank for st in ranks if st.compute_done < len(compute_ops) or st.grads_left]
        if unfinished:
            raise RuntimeError(f"step did not finish on ranks {unfinished[:8]}: a collective never rendezvoused "
                               f"(open: {sorted(k[0] for k in arrivals)[:4]})")
        df = tl.to_frame()
        return StepResult(float(df["end"].max()) if len(df) else 0.0, df, records, launches)
