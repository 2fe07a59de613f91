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

**One replica for all.** The step is SPMD and every data-parallel replica (a group of the
``ep`` communicator) runs the same program, so when the replicas sit alike on the
cluster the engine simulates only the first ``u`` ranks (:func:`replica_size`: one
replica, ``u = ep``, or the replicas of one node where a replica is part of a node) and
stands each rank ``r < u`` in for its copies ``r + i x u``:

- a collective on a group inside the simulated block (``ep``) starts once that group has
  rendezvoused, and runs on the network together with its copy in every other block
  (:meth:`Collectives.all_to_all_groups`), so the other replicas' traffic still contends
  for the links;
- a collective on a group that spans blocks (``dp``, ``expert_dp``) rendezvouses when its
  simulated members have it at the head of their stream (the other replicas' ranks are
  taken to arrive at that same instant) and runs on the whole group, as before; every
  group of such a communicator holds a simulated rank, so every group is issued.

The timeline, the launches and so the per-rank tables (:mod:`lina_sim.training.breakdown`,
Chrome traces) then hold ranks ``0 .. u-1`` only (``StepResult.ranks`` of
``world_size``); a record of a collective on ``ep`` stands for ``copies`` identical
collectives, one per block (``StepResult.collective_count`` counts them as simulating
every rank would). ``TrainingEngine(all_ranks=True)`` forces the every-rank simulation.
The engine's cost falls from O(world size) to O(u) simulated ranks; the network still
holds every rank's flows, as per-path-class counts.

The approximation, and where it is exact: the replicas' all-to-alls run as one step
whose flows of a path class move at one rate, so every replica's all-to-all ends when
the slowest would; the every-rank engine runs one per replica, and they end together
only where whatever runs beside them loads every replica's links alike. NCCL's tree
allreduce on a group across replicas (``expert_dp``: one rank per replica) does not:
its double binary tree over the group's nodes (:mod:`lina_sim.network.nccl`) gives the
root and inner nodes other loads than the leaves, so an all-to-all that overlaps such an
allreduce ends about a millisecond earlier in some replicas than in others,
and in the every-rank engine those run ahead until the next rendezvous across replicas.
Measured against every-rank simulation (dgx-h100-superpod, deepseek-moe-16b, EP 64,
every policy; ``tests/test_replica_engine.py`` checks the first two, bit for bit or to
float rounding, the third under ``-m slow``):

- 64 and 256 GPUs (one scalable unit): step time and every collective's [start, end)
  identical (bit for bit on the non-blocking fabric);
- 2048 GPUs (8 units), 28 layers: step time identical for 5 of 6 policies, tutel 0.17%
  shorter; deepspeed's and tutel's collectives start and end up to 16 ms later in
  replica 0 than the every-rank engine's replica 0, which runs ahead of the slowest
  replica between rendezvous;
- 16,384 GPUs, 28 layers: deepspeed's step time identical, tutel's 0.034% shorter
  (collectives shifted by up to 15 ms, as above).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import simpy

from lina_sim.gc_tuning import fewer_collections
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
    """One collective as it ran on the network: [start, end) in s, its group and bytes;
    ``copies``: how many identical collectives it stands for (one per block for a
    collective on ``ep`` when the engine simulates one block of replicas, else 1)."""

    mop: MicroOp
    group: tuple[int, ...]
    start: float
    end: float
    copies: int = 1

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
    as it ran, and every launch decision; ``ranks`` of the ``world_size`` ranks were
    simulated (the timeline and launches hold ranks ``0 .. ranks-1``: one block of
    data-parallel replicas standing for all, see the module docstring)."""

    step_time: float
    timeline: pd.DataFrame
    collectives: list[CollectiveRecord] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    ranks: int = 0
    world_size: int = 0

    @property
    def collective_count(self) -> int:
        """Collectives of the step over every rank: each record counted ``copies`` times."""
        return sum(c.copies for c in self.collectives)


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


def replica_size(graph: Any, cluster: ClusterSpec, topology: Topology) -> int:
    """How many ranks the engine must simulate, ``u``: ranks ``0 .. u-1`` stand for every
    rank when each rank ``r + i x u`` lives exactly as rank ``r`` does. ``u`` is ``ep``
    (one data-parallel replica, a group of the ``ep`` communicator) where that holds, else
    ``lcm(ep, gpus_per_node)`` (the replicas sharing one node, where a replica is part of
    a node), else the world size (every rank). A block of ``u`` ranks qualifies when:

    1. ranks do not share host cores (``cluster.shares_cores``: there every rank's compute
       slows every other's, so every rank counts);
    2. ``u`` is a multiple of ``ep`` that divides the world size into more than one block,
       and the ``ep`` groups are the consecutive blocks ``[j x ep, (j+1) x ep)``;
    3. every communicator maps onto itself under the shift by ``u``: a group inside one
       block has its translate in every block, and a group across blocks holds whole
       residue classes mod ``u`` (``dp``: every rank; ``expert_dp``: rank ``r`` and all its
       copies), so a copy shares every spanning group with the rank it copies;
    4. the blocks are interchangeable on the network: each rank sits at the same local GPU
       index (the same NIC rail, PCIe switch and intra-node links) as the rank it copies,
       and its ``ep`` group's all-to-all has the same path classes (intra-node; across
       nodes under one leaf; across the spines) with the same peer counts at every
       position (:meth:`Topology.block_pairs`), so its flows move as those of the block
       it copies do. Presets with whole nodes per block pass; a replica that straddles a
       leaf boundary where replica 0 does not fails.

    Not checked: that the collectives across blocks load every block's links alike
    (NCCL's trees do not; the module docstring says what that changes and how much).
    Cost: O(ranks + links) per candidate."""
    n = graph.world_size
    comms = graph.communicators
    if cluster.shares_cores or "ep" not in comms:
        return n
    ep = comms["ep"].size
    if comms["ep"].groups != tuple(tuple(range(j * ep, (j + 1) * ep)) for j in range(n // ep)):
        return n
    for u in dict.fromkeys((ep, math.lcm(ep, topology.gpus_per_node))):
        if u < n and n % u == 0 and _blocks_alike(comms, topology, ep, u):
            return u
    return n


def replica_size_estimate(cluster: ClusterSpec, ep: int) -> int:
    """What :func:`replica_size` picks for a step whose ``ep`` groups are the consecutive
    blocks of ``ep`` ranks (as :func:`~lina_sim.workload.graph.build_training_graph` builds
    them), from the layout's numbers alone, so the size guards answer in microseconds at
    any scale: ``u = ep`` when it is whole nodes, else ``lcm(ep, gpus_per_node)``, where
    ``u`` splits the world into more than one block, the ranks do not share host cores and,
    on a leaf/spine fabric, every block sits alike under the leaves (whole blocks per leaf,
    whole leaves per block, or a single leaf); else the world size. Where the layout is
    outside these rules it answers the world size, never less than :func:`replica_size`
    (``tests/test_replica_engine.py`` compares the two)."""
    n, gpn = cluster.world_size, cluster.gpus_per_node
    u = ep if ep % gpn == 0 else math.lcm(ep, gpn)
    if cluster.shares_cores or u >= n or n % u:
        return n
    per_leaf, nodes = cluster.nodes_per_leaf, u // gpn
    if per_leaf > 0 and cluster.nodes > per_leaf and per_leaf % nodes and nodes % per_leaf:
        return n
    return u


def _blocks_alike(comms: Any, topology: Topology, ep: int, u: int) -> bool:
    """Conditions 3 and 4 of :func:`replica_size` for blocks of ``u`` ranks."""
    n = topology.world_size
    blocks = n // u
    for comm in comms.values():
        inside = [grp for grp in comm.groups if min(grp) // u == max(grp) // u]
        # Each group inside a block is a translate of one in block 0, and block 0 has as
        # many as each block (groups are disjoint, so these are bijections).
        first = {grp for grp in inside if grp[0] < u}
        if len(inside) != len(first) * blocks or any(tuple(r % u for r in grp) not in first for grp in inside):
            return False
        for grp in comm.groups:  # across blocks: whole residue classes
            if min(grp) // u != max(grp) // u and len(grp) != len({r % u for r in grp}) * blocks:
                return False
    ranks = np.arange(n)
    local = topology.local_of(ranks).reshape(-1, u)
    if np.any(local != local[0]):
        return False
    for c in topology.block_pairs(ranks, ranks // ep):
        per = c.per_src.reshape(-1, u)
        if np.any(per != per[0]):
            return False
    return True


class TrainingEngine:
    """Simulates one training step of ``graph`` under ``policy`` on ``cluster``.

    ``op_time(op) -> seconds`` is the compute model (roofline or measured profile);
    ``alone`` (collective times alone on the network) feeds a policy's launch plan.
    ``all_ranks=True`` simulates every rank even where one data-parallel replica stands
    for all (:func:`replica_size`; the reference the replica reduction is tested against).
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
        all_ranks: bool = False,
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
        # Ranks simulated: one data-parallel replica where replicas are interchangeable.
        self.sim_ranks = graph.world_size if all_ranks else replica_size(graph, cluster, self.topology)

    def run(self) -> StepResult:
        """Simulates the step once, from a fresh simulated clock, and returns its result."""
        return _StepRun(self).run()


class _StepRun:
    """One simulation of one training step: the simpy environment, the network(s), every
    rank's state, the timeline and the records of collectives and launches.

    Each simulated rank (``engine.sim_ranks`` of them: every rank, or one replica, see
    the module docstring) runs three simpy processes (:meth:`compute_stream`,
    :meth:`submit_all_to_alls`, :meth:`submit_gradients`); a collective runs as its own
    process (:meth:`run_collective`) once the simulated ranks of its group have
    rendezvoused (:meth:`try_rendezvous`). Times are simulated seconds, sizes bytes.
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
        # Ranks 0 .. sim-1: every rank (one block), or the first block of replicas standing
        # in for the ``blocks`` - 1 others.
        self.sim = sim = engine.sim_ranks
        self.blocks = g.world_size // sim
        self.ranks = [_RankState(r, engine.policy, env, owed) for r in range(sim)]
        # (communicator, first rank of a group) -> the group's simulated ranks.
        self._members: dict[tuple[str, int], tuple[int, ...]] = {}
        self._translates: dict[tuple[str, int], tuple[tuple[int, ...], ...]] = {}
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
        # (micro-op id, first rank of its group) -> ranks whose stream has that collective
        # at its head (a group's first rank names it: a communicator's groups are disjoint).
        self.arrivals: dict[tuple[str, int], list[int]] = {}

    def run(self) -> StepResult:
        """Starts every rank's processes, runs the clock until nothing is left to happen,
        and returns the step; raises if some rank never finished."""
        env = self.env
        # Process creation order fixes simpy's tie-breaking between same-time events.
        for st in self.ranks:
            env.process(self.compute_stream(st))
            env.process(self.submit_all_to_alls(st))
            env.process(self.submit_gradients(st))
        with fewer_collections():
            env.run()
        unfinished = [st.rank for st in self.ranks if st.compute_done < len(self.compute_ops) or st.grads_left]
        if unfinished:
            raise RuntimeError(
                f"step did not finish on ranks {unfinished[:8]}: a collective never rendezvoused "
                f"(open: {sorted(k[0] for k in self.arrivals)[:4]})"
            )
        df = self.timeline.to_frame()
        step = float(df["end"].max()) if len(df) else 0.0
        return StepResult(step, df, self.records, self.launches, self.sim, self.graph.world_size)

    def group_of(self, m: MicroOp, rank: int) -> tuple[int, ...]:
        """The ranks of ``m``'s communicator group that contains ``rank``."""
        return self.graph.communicators[m.communicator].group_of(rank)

    def members(self, m: MicroOp, grp: tuple[int, ...]) -> tuple[int, ...]:
        """The simulated ranks of ``grp`` (a group of ``m``'s communicator): all of them,
        or in one-replica mode those of replica 0 (ranks below ``self.sim``)."""
        if self.blocks == 1:
            return grp
        key = (m.communicator, grp[0])
        got = self._members.get(key)
        if got is None:
            got = self._members[key] = tuple(r for r in grp if r < self.sim)
        return got

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
        key = (m.id, grp[0])
        arrived = self.arrivals.setdefault(key, [])
        arrived.append(st.rank)
        if len(arrived) == len(self.members(m, grp)):
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
        copies = self.copies(m, grp)
        if copies > 1 and len(grp) > 1:  # one replica's group stands for its translates: run them all
            groups = self.translates(m, grp)
            if m.is_a2a:
                yield self.a2a_coll.all_to_all_groups(groups, m.nbytes, self.algos.all_to_all, tag=m.id)
            else:
                ar, algo, proto = self.ar_coll, self.algos.algo, self.algos.proto
                yield env.all_of([ar.allreduce(g, m.nbytes, algo, tag=m.id, proto=proto) for g in groups])
        elif m.is_a2a:
            yield self.a2a_coll.all_to_all(grp, m.nbytes, self.algos.all_to_all, tag=m.id)
        else:
            yield self.ar_coll.allreduce(grp, m.nbytes, self.algos.algo, tag=m.id, proto=self.algos.proto)
        if since is not None:
            owed = cores.owed(delay, host.reference_excess, since)
            if owed > 0:
                yield env.process(cores.pay(owed, host.reference_excess))
        self.complete_collective(m, grp, kind, start, env.now, copies)

    def translates(self, m: MicroOp, grp: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """``grp`` (inside replica 0) and its copy in every other replica: the groups of
        ``m``'s communicator that rank ``r + i x sim`` of replica i holds (:func:`replica_size`
        checked they exist), kept once built."""
        key = (m.communicator, grp[0])
        got = self._translates.get(key)
        if got is None:
            a = np.asarray(grp)
            got = self._translates[key] = tuple(tuple((a + i * self.sim).tolist()) for i in range(self.blocks))
        return got

    def copies(self, m: MicroOp, grp: tuple[int, ...]) -> int:
        """How many identical collectives ``m`` on ``grp`` stands for: one per replica
        when one replica is simulated and ``grp`` lies inside it (``ep``), else 1. (A
        group of one rank moves nothing, so its copies are counted but not run.)"""
        return self.blocks if self.blocks > 1 and len(self.members(m, grp)) == len(grp) else 1

    def complete_collective(
        self, m: MicroOp, grp: tuple[int, ...], kind: str, start: float, end: float, copies: int = 1
    ) -> None:
        """Records ``m`` as having run over [start, end) s on every rank of ``grp`` (and on
        its ``copies - 1`` translates), frees the simulated ranks' stream, tells their
        schedulers and fires the completion events; only then lets each of them launch
        and rendezvous again."""
        self.records.append(CollectiveRecord(m, grp, start, end, copies))
        ranks, tl = self.ranks, self.timeline
        grp = self.members(m, grp)
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
