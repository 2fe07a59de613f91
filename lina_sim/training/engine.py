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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import simpy

from lina_sim.hardware.processors import ProcessorPool
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network.alone import AloneTimes
from lina_sim.network.collectives import CollectiveAlgos, Collectives
from lina_sim.network.fluid import FluidNetwork
from lina_sim.policies.training.base import RankScheduler, TrainingPolicy, owed_per_gap, submission_order
from lina_sim.results.timeline import Event, Timeline
from lina_sim.training.launch_plan import planned_micro_ops
from lina_sim.workload.comm import MicroOp

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

    def __init__(
        self,
        graph: Any,
        policy: TrainingPolicy,
        cluster: ClusterSpec,
        op_time: Callable[[Any], float],
        algos: CollectiveAlgos = CollectiveAlgos(),
        topology: Topology | None = None,
        record_launches: bool = False,
        alone: AloneTimes | None = None,
    ):
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
        """Simulates the step once, from a fresh simulated clock, and returns its result."""
        return _StepRun(self).run()


class _StepRun:
    """One simulation of one training step: the simpy environment, the network(s), every
    rank's state, the timeline and the records of collectives and launches.

    Each rank runs three simpy processes (:meth:`compute_stream`,
    :meth:`submit_all_to_alls`, :meth:`submit_gradients`); a collective runs as its own
    process (:meth:`run_collective`) once its group has rendezvoused
    (:meth:`try_rendezvous`). Times are simulated seconds, sizes bytes.
    """

    def __init__(self, engine: TrainingEngine):
        self.engine = engine
        self.graph = g = engine.graph
        self.op_time = engine.op_time
        self.algos = engine.algos
        self.env = env = simpy.Environment()
        self.a2a_coll = Collectives(FluidNetwork(env, engine.topology))
        # The no-contention bound: allreduce flows get their own copy of every link.
        self.ar_coll = (
            Collectives(FluidNetwork(env, engine.topology)) if engine.policy.isolated_allreduce else self.a2a_coll
        )
        self.host = engine.cluster.host
        self.cores = ProcessorPool(env, self.host.cores) if engine.cluster.shares_cores else None
        self.timeline = Timeline()
        self.records: list[CollectiveRecord] = []
        self.launches: list[Launch] = []
        self.record_launches = engine.record_launches
        micro_ops = planned_micro_ops(g, engine.policy, engine.cluster, engine.op_time, engine.alone)
        owed = owed_per_gap(micro_ops)
        self.ranks = [_RankState(r, engine.policy, env, owed) for r in range(g.world_size)]
        self.a2a_mops = [m for m in micro_ops if m.is_a2a]
        self.grad_mops = submission_order(micro_ops)
        for st in self.ranks:
            st.grads_left = len(self.grad_mops)
            if not self.grad_mops:
                st.grads_done.succeed()
        self.ops = g.ops
        self.compute_ops = [o for o in self.ops if o.kind == "compute"]
        # Every rank runs the same op for the same time: price each op once, not per rank.
        self.compute_times = [self.op_time(o) for o in self.compute_ops]
        # (micro-op id, group) -> ranks whose stream has that collective at its head.
        self.arrivals: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def run(self) -> StepResult:
        """Starts every rank's processes, runs the clock until nothing is left to happen,
        and returns the step; raises if some rank never finished."""
        env = self.env
        # Process creation order fixes simpy's tie-breaking between same-time events.
        for st in self.ranks:
            env.process(self.compute_stream(st))
            env.process(self.submit_all_to_alls(st))
            env.process(self.submit_gradients(st))
        env.run()
        unfinished = [st.rank for st in self.ranks if st.compute_done < len(self.compute_ops) or st.grads_left]
        if unfinished:
            raise RuntimeError(
                f"step did not finish on ranks {unfinished[:8]}: a collective never rendezvoused "
                f"(open: {sorted(k[0] for k in self.arrivals)[:4]})"
            )
        df = self.timeline.to_frame()
        return StepResult(float(df["end"].max()) if len(df) else 0.0, df, self.records, self.launches)

    def group_of(self, m: MicroOp, rank: int) -> tuple[int, ...]:
        """The ranks of ``m``'s communicator group that contains ``rank``."""
        return self.graph.communicators[m.communicator].group_of(rank)

    def launch_selected(self, st: _RankState) -> None:
        """Asks the rank's policy which submitted micro-ops to launch now, queues each on
        its stream (recording the decision if asked) and tries to start it."""
        before = st.sched.view() if self.record_launches else None
        for m in st.sched.poll():
            if before is not None:
                running = sum(1 for x in before.in_flight if x.is_a2a)
                self.launches.append(Launch(self.env.now, st.rank, m, len(before.pending_a2a), running))
            st.queues[m.stream].append(m)
            self.try_rendezvous(st, m.stream)

    def try_rendezvous(self, st: _RankState, stream: str) -> None:
        """If the rank's ``stream`` is idle and has a queued collective, makes that its
        running head and records the rank's arrival; the last rank of the group to
        arrive starts the collective (the NCCL rendezvous)."""
        if st.busy[stream] or not st.queues[stream]:
            return
        st.busy[stream] = True
        m = st.queues[stream][0]
        grp = self.group_of(m, st.rank)
        key = (m.id, grp)
        arrived = self.arrivals.setdefault(key, [])
        arrived.append(st.rank)
        if len(arrived) == len(grp):
            del self.arrivals[key]
            self.env.process(self.run_collective(m, grp))

    def run_collective(self, m: MicroOp, grp: tuple[int, ...]):
        """Process: moves ``m.nbytes`` bytes over the network for group ``grp`` (plus,
        on a shared-core host, the calibrated delay owed to oversubscription), then
        completes ``m`` on every rank of the group."""
        env, cores, host = self.env, self.cores, self.host
        start = env.now
        kind = "all_to_all" if m.is_a2a else "allreduce"
        delay = host.collective_delay_s(kind, len(grp)) if cores is not None else 0.0
        since = (start, cores.excess_time()) if delay > 0 else None
        if m.is_a2a:
            yield self.a2a_coll.all_to_all(grp, m.nbytes, self.algos.all_to_all, tag=m.id)
        else:
            yield self.ar_coll.allreduce(grp, m.nbytes, self.algos.algo, tag=m.id, proto=self.algos.proto)
        if since is not None:
            owed = cores.owed(delay, host.reference_excess, since)
            if owed > 0:
                yield env.process(cores.pay(owed, host.reference_excess))
        self.complete_collective(m, grp, kind, start, env.now)

    def complete_collective(self, m: MicroOp, grp: tuple[int, ...], kind: str, start: float, end: float) -> None:
        """Records ``m`` as having run over [start, end) s on every rank of ``grp``, frees
        their stream, tells their schedulers and fires the completion events; only then
        lets each rank launch and rendezvous again."""
        self.records.append(CollectiveRecord(m, grp, start, end))
        ranks, tl = self.ranks, self.timeline
        # Read once: both are properties and the group can be every rank.
        stream, is_a2a = m.stream, m.is_a2a
        for r in grp:
            st = ranks[r]
            tl.add(Event(r, stream, m.id, kind, start, end, m.layer, m.chunk, m.nbytes))
            st.queues[stream].popleft()
            st.busy[stream] = False
            st.sched.complete(m)
            if is_a2a:
                st.done_event(m.op_id).succeed()
            else:
                st.grads_left -= 1
                if st.grads_left == 0:
                    st.grads_done.succeed()
        # Two passes, kept apart: the order of these calls fixes the order of same-time events.
        launch_selected, try_rendezvous = self.launch_selected, self.try_rendezvous
        for r in grp:
            st = ranks[r]
            launch_selected(st)
            try_rendezvous(st, stream)

    def compute_stream(self, st: _RankState):
        """Process: the rank's compute stream, running every compute op in program order
        once its dependencies (and, for the optimizer step, every gradient) are done;
        an op takes ``op_time(op)`` s, on the shared host cores if there are any."""
        env, cores, tl = self.env, self.cores, self.timeline
        for op, dur in zip(self.compute_ops, self.compute_times):
            for d in op.deps:
                ev = st.done_event(d)
                if not ev.processed:
                    yield ev
            if op.waits_for_gradients and not st.grads_done.processed:
                yield st.grads_done
            start = env.now
            if dur > 0:
                yield cores.run(dur) if cores is not None else env.timeout(dur)
            tl.add(Event(st.rank, "compute", op.name, "compute", start, env.now, op.layer, op.chunk, 0.0))
            st.done_event(op.id).succeed()
            st.compute_done += 1

    def submit_all_to_alls(self, st: _RankState):
        """Process: submits each all-to-all micro-op to the rank's scheduler, in order,
        as soon as the dependencies of its op are done."""
        ops = self.ops
        for m in self.a2a_mops:
            for d in ops[m.op_id].deps:
                ev = st.done_event(d)
                if not ev.processed:
                    yield ev
            st.sched.submit(m)
            self.launch_selected(st)

    def submit_gradients(self, st: _RankState):
        """Process: submits each gradient micro-op to the rank's scheduler, in submission
        order, as soon as the compute op producing its tensors is done."""
        for m in self.grad_mops:
            ev = st.done_event(m.ready_after)
            if not ev.processed:
                yield ev
            st.sched.submit(m)
            self.launch_selected(st)
