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

**One replica per class.** The step is SPMD and every data-parallel replica (a group of
the ``ep`` communicator) runs the same program, so when the replicas sit alike on the
cluster the engine cuts the ranks into blocks of ``u`` (:func:`replica_size`: one
replica, ``u = ep``, or the replicas of one node where a replica is part of a node),
sorts the blocks into classes of blocks that also *live* alike (:class:`ReplicaClasses`),
and simulates the first block of each class, each of its ranks ``r`` standing in for
its copies ``r + (i - j) x u`` in the class's other blocks ``i``:

- a collective on a group inside a block (``ep``) starts once that group has
  rendezvoused, and runs on the network together with its copy in every other block of
  the class (:meth:`Collectives.all_to_all_groups`), so those replicas' traffic still
  contends for the links;
- a collective on a group that spans blocks (``dp``, ``expert_dp``) rendezvouses when its
  simulated members (one block of every class) have it at the head of their stream (the
  other blocks' ranks arrive when their class's first block does) and runs on the whole
  group; every group of such a communicator holds a simulated rank, so every group is
  issued.

The timeline, the launches and so the per-rank tables (:mod:`lina_sim.training.breakdown`,
Chrome traces) then hold the simulated ranks only (``StepResult.ranks`` of
``world_size``, the blocks ``StepResult.classes``); a record of a collective on ``ep``
stands for ``copies`` identical collectives, one per block of its class
(``StepResult.collective_count`` counts them as simulating every rank would), and
:meth:`StepResult.mean_breakdown` weighs each simulated rank by its class's size.
``TrainingEngine(all_ranks=True)`` forces the every-rank simulation. The engine's cost
falls from O(world size) to O(u x classes) simulated ranks; the network still holds
every rank's flows, as per-path-class counts.

Where it is exact, and why there are classes: the blocks of a class run their
all-to-alls as one flow group per path class, whose flows move at one rate, so each
block of the class must see the same loads on its links at every instant. Collectives
across blocks break that where they load blocks unlike: NCCL's double binary tree over
a group's nodes (:mod:`lina_sim.network.nccl`; ``dp``) gives root, inner and leaf nodes
other NIC loads, and its ring over ``expert_dp`` (one rank per replica) crosses the
spines from some replicas only; in the every-rank engine the replicas so loaded end
their all-to-alls earlier or later and drift until the next rendezvous across replicas.
:class:`ReplicaClasses` refines the blocks by colour refinement over blocks and links
against the flow groups of every collective the step runs (the algorithm NCCL's model
picks for each size); in its classes every block of a class sees the same loads, so the
step is the every-rank step, to float rounding. It does so only where needed:
:meth:`TrainingEngine.run` first tries the classes that leave the collectives across
blocks out (one class on the presets), and switches to the refined ones only if a
collective across blocks that tells blocks apart runs while a block's own collective
runs on its network (Lina's policies keep allreduces apart from all-to-alls, and the
no-contention bound puts them on their own links: one class; DeepSpeed and Tutel
overlap them: refined). Measured against every-rank simulation (dgx-h100-superpod,
deepseek-moe-16b, EP 64; ``tests/test_replica_engine.py``):

- 64 to 256 GPUs: every policy's step time, every collective's [start, end) and the
  breakdown identical to float rounding (1e-12); one class, bit for bit, for the policies
  without overlap; DeepSpeed and Tutel every replica its own class (4 of 4), or 5
  classes of 8 replicas at 128 GPUs;
- 2048 GPUs (32 replicas), 28 layers: identical for every policy (DeepSpeed and Tutel
  24 classes, the others one; ``-m slow``);
- 16,384 GPUs (256 replicas): DeepSpeed and Tutel 24 classes (1536 simulated ranks), the
  others one (``benchmarks/bench_frontier.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection
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
from lina_sim.training.breakdown import CATEGORIES, TOTALS, mean_breakdown, rank_breakdown
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
    simulated (the timeline and launches hold those: the first block of ``block`` ranks
    of each class of ``classes``, block indices, standing for the class's blocks; see
    the module docstring)."""

    step_time: float
    timeline: pd.DataFrame
    collectives: list[CollectiveRecord] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    ranks: int = 0
    world_size: int = 0
    block: int = 0
    classes: tuple[tuple[int, ...], ...] = ((0,),)

    @property
    def collective_count(self) -> int:
        """Collectives of the step over every rank: each record counted ``copies`` times."""
        return sum(c.copies for c in self.collectives)

    def mean_breakdown(self) -> dict[str, float]:
        """The per-rank breakdown (s; :func:`~lina_sim.training.breakdown.mean_breakdown`)
        averaged over every rank of the world: each simulated rank weighs as many as the
        blocks of its class."""
        if len(self.classes) == 1:  # all ranks alike: the plain mean, to the bit
            return mean_breakdown(self.timeline, self.step_time)
        b = rank_breakdown(self.timeline, self.step_time)
        size = {c[0]: len(c) for c in self.classes}
        w = np.array([size[r // self.block] for r in b["rank"].tolist()], np.float64)
        return {k: float(np.average(b[k].to_numpy(), weights=w)) for k in CATEGORIES + TOTALS}


class _RankState:
    """One rank's scheduler, stream queues and completion events: ``done[i]`` fires when
    op ``i`` of the step's graph (ops are numbered by position) is done on this rank."""

    def __init__(self, rank: int, policy: TrainingPolicy, env: simpy.Environment, owed: dict[int, int], ops: int):
        self.rank = rank
        self.sched = RankScheduler(policy, validate=False, owed=owed)  # the policy tests check the contract
        self.queues: dict[str, deque[MicroOp]] = {"a2a": deque(), "allreduce": deque()}
        self.busy: dict[str, bool] = {"a2a": False, "allreduce": False}
        # Every op's event is built up front: the hot loops index a list, not get-or-create
        # (an event's place among same-time events is fixed when it fires, not when built).
        self.done: list[simpy.Event] = [env.event() for _ in range(ops)]
        self.env = env
        self.grads_left = 0
        self.grads_done = env.event()
        self.compute_done = 0


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

    Not checked here: that the collectives across blocks load every block's links alike
    (NCCL's trees and rings do not): :class:`ReplicaClasses` sorts the blocks into
    classes that do (the module docstring). Cost: O(ranks + links) per candidate."""
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


class ReplicaClasses:
    """Which blocks of ``u`` ranks (:func:`replica_size`) live alike: :meth:`classes`
    partitions the block indices into classes (each sorted, classes in order of their
    first block), given which communicators across blocks to take into account.

    ``micro_ops``: the step's collectives; all-to-alls run on ``a2a_coll``'s network,
    allreduces on ``ar_coll``'s (the same one, or a copy of every link for the
    no-contention bound).

    Colour refinement (1-dimensional Weisfeiler-Leman) over blocks and links: a link's
    colour is its kind and capacity, the flow groups that cross it of the collectives on
    groups spanning blocks (each such flow group is one entity of the network, shared by
    every block, so it is named, not coloured), and the multiset of (colour of block,
    which of the block's flow groups, multiplicity) of the blocks' own collectives that
    cross it; a block's colour is the multiset of (which flow group, colour of link,
    multiplicity) over its own collectives' flows. A block's own collectives are those of
    its groups of the communicators inside blocks (``ep``). A collective is taken as its
    flow groups: an all-to-all's even split's path classes, an allreduce's steps under
    each algorithm NCCL's model picks for one of the step's sizes on that group
    (:meth:`Collectives.allreduce_patterns`; on ``dp`` and ``expert_dp``: ring, tree or
    both). Refinement stops when a round splits nothing. In the stable partition the
    links of one colour carry equal loads whenever the blocks of each class are in one
    state, so the network's max-min rates are equal for the blocks of a class, and they
    run in lockstep: one of them, its flows standing for the class's, gives the step.

    Multisets are hashed (sums of 64-bit mixes of their elements; a collision, of odds
    about (blocks + links)^2 / 2^64, would merge two classes). Cost: O(link entries of
    the flow groups) to build, the same per round, a few rounds; the collectives' flow
    steps land in the topology's caches, where the step then finds them."""

    def __init__(
        self,
        graph: Any,
        topology: Topology,
        a2a_coll: Collectives,
        ar_coll: Collectives,
        algos: CollectiveAlgos,
        u: int,
        micro_ops: list[MicroOp],
    ):
        self.blocks = graph.world_size // u
        self.spanning: dict[str, np.ndarray] = {}  # per communicator across blocks: its flow groups' hashed loads
        self.local = False
        if self.blocks == 1:  # every rank simulated: nothing to sort
            return
        n_links = len(topology.links)
        # The allreduce network's links follow the all-to-all network's when it is a copy.
        ar_off = n_links if ar_coll is not a2a_coll else 0
        self.total_links = total = n_links + ar_off
        copies = 2 if ar_off else 1
        caps = np.tile(topology.links.capacity, copies)
        kind_code = np.unique(np.tile(topology.links.kind, copies), return_inverse=True)[1].ravel()
        self.base = _mix(kind_code, caps.view(np.uint64), np.repeat(np.arange(copies), n_links))
        inc_block: list[np.ndarray] = []
        inc_label: list[np.ndarray] = []
        inc_link: list[np.ndarray] = []
        inc_mult: list[np.ndarray] = []
        a2a_comms = {m.communicator for m in micro_ops if m.is_a2a}
        sizes: dict[str, set[float]] = {}
        for m in micro_ops:
            if not m.is_a2a:
                sizes.setdefault(m.communicator, set()).add(m.nbytes)
        named = 0
        for ci, (name, comm) in enumerate(sorted(graph.communicators.items())):
            a2a, nbytes = name in a2a_comms, sorted(sizes.get(name, ()))
            if not a2a and not nbytes:
                continue
            for grp in comm.groups:
                if len(grp) < 2:
                    continue
                b0 = min(grp) // u
                inside = b0 == max(grp) // u
                flows = _flow_groups(grp, a2a, nbytes, a2a_coll, ar_coll, algos, ar_off)
                for label, (links, mult) in enumerate(flows):
                    if inside:
                        # Translates of a group in every block share a label: (communicator, position, flow group).
                        inc_block.append(np.full(links.size, b0))
                        inc_label.append(np.full(links.size, _mix([ci], [grp[0] % u], [label])[0]))
                        inc_link.append(links)
                        inc_mult.append(mult)
                    else:
                        named += 1
                        sig = self.spanning.setdefault(name, np.zeros(total, np.uint64))
                        np.add.at(sig, links, _mix(np.full(links.size, named), mult.view(np.uint64)))
        self.local = bool(inc_block)
        if self.local:
            self.inc_block = np.concatenate(inc_block).astype(np.int64)
            self.inc_link = np.concatenate(inc_link).astype(np.int64)
            self.inc_label = np.concatenate(inc_label)
            self.inc_mult = np.concatenate(inc_mult).astype(np.float64).view(np.uint64)

    def classes(self, spanning: Collection[str]) -> tuple[tuple[int, ...], ...]:
        """The classes of blocks that live alike when the collectives on the communicators
        ``spanning`` (of those across blocks; the others left out) share the network
        with the blocks' own."""
        if self.blocks == 1 or not self.local:
            return (tuple(range(self.blocks)),)
        link_sig = self.base.copy()
        with np.errstate(over="ignore"):  # sums of hashes wrap around, as meant
            for name in sorted(spanning):
                link_sig += self.spanning.get(name, 0)
        ib, il, lab, mb = self.inc_block, self.inc_link, self.inc_label, self.inc_mult
        link_col = _relabel(link_sig)
        block_col = np.zeros(self.blocks, np.int64)
        while True:
            sig = np.zeros(self.total_links, np.uint64)
            np.add.at(sig, il, _mix(block_col[ib], lab, mb))
            new_link = _relabel(_mix(link_col, sig))
            sig = np.zeros(self.blocks, np.uint64)
            np.add.at(sig, ib, _mix(new_link[il], lab, mb))
            new_block = _relabel(_mix(block_col, sig))
            # Each colour holds its old one, so equal counts mean nothing split.
            stable = new_block.max() == block_col.max() and new_link.max() == link_col.max()
            link_col, block_col = new_link, new_block
            if stable:
                break
        classes: dict[int, list[int]] = {}
        for b, c in enumerate(block_col.tolist()):
            classes.setdefault(c, []).append(b)
        return tuple(tuple(c) for c in classes.values())


def _flow_groups(
    grp: tuple[int, ...],
    a2a: bool,
    nbytes: list[float],
    a2a_coll: Collectives,
    ar_coll: Collectives,
    algos: CollectiveAlgos,
    off: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(links, multiplicities) of each flow group the step's collectives on ``grp`` put on
    the network: an all-to-all's path classes (with ``a2a``), and every step of each
    allreduce algorithm run for one of the sizes ``nbytes`` (bytes), its links shifted by
    ``off`` (the no-contention bound's copy of the network)."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    if a2a:
        ranks = np.asarray(grp)
        out += [(c.links, c.mult) for c in a2a_coll.topo.block_pairs(ranks, np.zeros(ranks.size, np.int64))]
    # What each size runs (NCCL's pick, or the forced algorithm), in a fixed order.
    picked = dict.fromkeys(ar_coll.allreduce_choice(grp, b, algos.algo, algos.proto)[0] for b in nbytes)
    for algo in picked:
        if algo == "-":  # nothing to move
            continue
        for pat in ar_coll.allreduce_patterns(grp, algo):
            out += [(np.asarray(g[0]) + off, np.asarray(g[1], np.float64)) for g in pat.groups]
    return out


def _mix(*cols: Any) -> np.ndarray:
    """A 64-bit hash of each row of the given integer columns (splitmix64's finaliser,
    chained): the elements of the multisets :class:`ReplicaClasses` sums."""
    h = np.full(len(cols[0]), 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            z = h ^ np.asarray(c).astype(np.uint64)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = z ^ (z >> np.uint64(31))
    return h


def _relabel(sig: np.ndarray) -> np.ndarray:
    """Colours 0, 1, ... for equal signatures (in order of first appearance)."""
    _, first, inv = np.unique(sig, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inv.ravel()]


class TrainingEngine:
    """Simulates one training step of ``graph`` under ``policy`` on ``cluster``.

    ``op_time(op) -> seconds`` is the compute model (roofline or measured profile);
    ``alone`` (collective times alone on the network) feeds a policy's launch plan.
    ``all_ranks=True`` simulates every rank even where one data-parallel replica stands
    for all (:func:`replica_size`; the reference the replica reduction is tested against).
    ``check_ranks(n)``, if given, is called with the number of ranks a run will simulate
    before that run builds them, so a caller can refuse a step whose classes of replicas
    (:class:`ReplicaClasses`) would not fit in memory (:func:`lina_sim.training.run.run_policy`).
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
        check_ranks: Callable[[int], None] | None = None,
    ):
        self.record_launches = record_launches
        self.check_ranks = check_ranks
        self.graph = graph
        self.policy = policy
        self.cluster = cluster
        self.op_time = op_time
        self.algos = algos
        self.topology = topology or Topology(cluster)
        self.alone = alone or AloneTimes(cluster, algos, self.topology)
        if graph.world_size != self.topology.world_size:
            raise ValueError(f"graph is for {graph.world_size} ranks, cluster has {self.topology.world_size}")
        # Blocks of ranks: one data-parallel replica where replicas sit alike, else one block
        # of every rank; each class of blocks that also live alike is simulated as its first
        # block (:meth:`run` settles the classes).
        self.block = graph.world_size if all_ranks else replica_size(graph, cluster, self.topology)
        self.plan: _ClassPlan | None = None
        self.classes: tuple[tuple[int, ...], ...] | None = None

    def run(self) -> StepResult:
        """Simulates the step once, from a fresh simulated clock, and returns its result.

        The first run tries the classes of blocks that the collectives across blocks
        leave alike when they never run beside a block's own (:class:`_ClassPlan`); if
        one of those that tell blocks apart starts while a block's own collective runs
        on its network, or the other way round, that run stops and the step runs on
        the classes that take every collective into account. Later runs reuse what the
        first settled."""
        # Building a run allocates per-rank events by the hundred thousand: collect less
        # from there on, not only while the clock runs.
        with fewer_collections():
            try:
                res = _StepRun(self).run()
            except _Unalike:
                assert self.plan is not None
                self.classes = self.plan.full
                return _StepRun(self).run()
        self.classes = res.classes
        return res


class _Unalike(Exception):
    """A collective that loads blocks of one class unlike each other ran beside a block's
    own: the class must split (raised to stop the run, :meth:`TrainingEngine.run`)."""


@dataclass(frozen=True)
class _ClassPlan:
    """The classes of blocks of one step (:class:`ReplicaClasses`): ``coarse`` leaves out
    every collective across blocks, ``full`` takes them all in, and ``watch`` names the
    communicators across blocks to watch: those whose collectives split ``coarse``, and
    as few more as keep the others, all together, from splitting it. ``coarse`` gives
    the step exactly when no collective on ``watch`` runs while a block's own collective
    runs on the same network (then the blocks of a class see the same loads at every
    instant)."""

    coarse: tuple[tuple[int, ...], ...]
    full: tuple[tuple[int, ...], ...]
    watch: frozenset[str]

    @classmethod
    def of(cls, rc: ReplicaClasses) -> _ClassPlan:
        coarse, full = rc.classes(()), rc.classes(rc.spanning)
        # The communicators left unwatched must keep ``coarse`` together, not only each alone.
        free = [c for c in sorted(rc.spanning) if rc.classes((c,)) == coarse]
        while free and rc.classes(free) != coarse:
            free.pop()
        return cls(coarse, full, frozenset(rc.spanning) - set(free))


class _StepRun:
    """One simulation of one training step: the simpy environment, the network(s), every
    rank's state, the timeline and the records of collectives and launches.

    Each simulated rank (every rank, or the first block of each class of alike replicas,
    see the module docstring) runs three simpy processes (:meth:`compute_stream`,
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
        # (communicator, first rank of a group) -> the group's simulated ranks.
        self._members: dict[tuple[str, int], tuple[int, ...]] = {}
        self._translates: dict[tuple[str, int], tuple[tuple[int, ...], ...]] = {}
        self.a2a_mops = [m for m in micro_ops if m.is_a2a]
        # Blocks of ``u`` ranks; each class of alike blocks is simulated as its first block,
        # whose ranks stand in for their copies in the class's other blocks.
        self.u = u = engine.block
        self.blocks = g.world_size // u
        if engine.plan is None:
            rc = ReplicaClasses(g, engine.topology, self.a2a_coll, self.ar_coll, engine.algos, u, micro_ops)
            engine.plan = _ClassPlan.of(rc)
        # Until a run settles them: the coarse classes, stopping if a watched collective
        # meets a block's own (:meth:`TrainingEngine.run`).
        self.classes = engine.plan.coarse if engine.classes is None else engine.classes
        self.watch = engine.plan.watch if engine.classes is None else frozenset()
        # Per network: block-local collectives running, and watched ones across blocks.
        self.running: dict[int, list[int]] = {}
        self._local: dict[tuple[str, int], bool] = {}
        self.class_of = {b: c for c in self.classes for b in c}
        self.reps = frozenset(c[0] for c in self.classes)
        sim = [c[0] * u + i for c in self.classes for i in range(u)]
        self.sim = len(sim)
        if engine.check_ranks is not None:
            engine.check_ranks(self.sim)
        self.ranks = [_RankState(r, engine.policy, env, owed, len(g.ops)) for r in sim]
        self.state = {st.rank: st for st in self.ranks}
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
        env.run()
        unfinished = [st.rank for st in self.ranks if st.compute_done < len(self.compute_ops) or st.grads_left]
        if unfinished:
            raise RuntimeError(
                f"step did not finish on ranks {unfinished[:8]}: a collective never rendezvoused "
                f"(open: {sorted(k[0] for k in self.arrivals)[:4]})"
            )
        df = self.timeline.to_frame()
        step = float(df["end"].max()) if len(df) else 0.0
        return StepResult(step, df, self.records, self.launches, self.sim, self.graph.world_size, self.u, self.classes)

    def group_of(self, m: MicroOp, rank: int) -> tuple[int, ...]:
        """The ranks of ``m``'s communicator group that contains ``rank``."""
        return self.graph.communicators[m.communicator].group_of(rank)

    def members(self, m: MicroOp, grp: tuple[int, ...]) -> tuple[int, ...]:
        """The simulated ranks of ``grp`` (a group of ``m``'s communicator): all of them,
        or in one-replica mode those in the first block of a class."""
        if self.blocks == 1:
            return grp
        key = (m.communicator, grp[0])
        got = self._members.get(key)
        if got is None:
            u, reps = self.u, self.reps
            got = self._members[key] = tuple(r for r in grp if r // u in reps)
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
        watched = self.watch_start(m, grp) if self.watch else None
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
        if watched is not None:
            counts, slot = watched
            counts[slot] -= 1
        self.complete_collective(m, grp, kind, start, env.now, copies)

    def watch_start(self, m: MicroOp, grp: tuple[int, ...]) -> tuple[list[int], int] | None:
        """Counts ``m`` (starting now on ``grp``) among its network's running collectives
        if it is a block's own or on a watched communicator across blocks, and raises
        :class:`_Unalike` if both kinds now run there; returns its network's counts and
        its slot in them (decremented when it ends), or None if not counted."""
        key = (m.communicator, grp[0])
        local = self._local.get(key)
        if local is None:
            local = self._local[key] = min(grp) // self.u == max(grp) // self.u
        if len(grp) < 2 or not (local or m.communicator in self.watch):
            return None
        net = self.a2a_coll.net if m.is_a2a else self.ar_coll.net
        counts = self.running.setdefault(id(net), [0, 0])
        slot = int(local)
        counts[slot] += 1
        if counts[0] and counts[1]:
            raise _Unalike(m.id)
        return counts, slot

    def translates(self, m: MicroOp, grp: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """``grp`` (inside block j, the first of its class) and its copy in every block i of
        that class: the groups of ``m``'s communicator that rank ``r + (i - j) x u`` holds
        (:func:`replica_size` checked they exist), kept once built."""
        key = (m.communicator, grp[0])
        got = self._translates.get(key)
        if got is None:
            a, j = np.asarray(grp), grp[0] // self.u
            got = self._translates[key] = tuple(tuple((a + (i - j) * self.u).tolist()) for i in self.class_of[j])
        return got

    def copies(self, m: MicroOp, grp: tuple[int, ...]) -> int:
        """How many identical collectives ``m`` on ``grp`` stands for: one per block of its
        class when blocks are simulated and ``grp`` lies inside one (``ep``), else 1. (A
        group of one rank moves nothing, so its copies are counted but not run.)"""
        if self.blocks > 1 and len(self.members(m, grp)) == len(grp):
            return len(self.class_of[grp[0] // self.u])
        return 1

    def complete_collective(
        self, m: MicroOp, grp: tuple[int, ...], kind: str, start: float, end: float, copies: int = 1
    ) -> None:
        """Records ``m`` as having run over [start, end) s on every rank of ``grp`` (and on
        its ``copies - 1`` translates), frees the simulated ranks' stream, tells their
        schedulers and fires the completion events; only then lets each of them launch
        and rendezvous again."""
        self.records.append(CollectiveRecord(m, grp, start, end, copies))
        ranks, tl = self.state, self.timeline
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
                st.done[m.op_id].succeed()
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
                ev = st.done[d]
                if not ev.processed:
                    yield ev
            if op.waits_for_gradients and not st.grads_done.processed:
                yield st.grads_done
            start = env.now
            if dur > 0:
                yield cores.run(dur) if cores is not None else env.timeout(dur)
            tl.add(Event(st.rank, "compute", op.name, "compute", start, env.now, op.layer, op.chunk, 0.0))
            st.done[op.id].succeed()
            st.compute_done += 1

    def submit_all_to_alls(self, st: _RankState):
        """Process: submits each all-to-all micro-op to the rank's scheduler, in order,
        as soon as the dependencies of its op are done."""
        ops = self.ops
        for m in self.a2a_mops:
            for d in ops[m.op_id].deps:
                ev = st.done[d]
                if not ev.processed:
                    yield ev
            st.sched.submit(m)
            self.launch_selected(st)

    def submit_gradients(self, st: _RankState):
        """Process: submits each gradient micro-op to the rank's scheduler, in submission
        order, as soon as the compute op producing its tensors is done."""
        for m in self.grad_mops:
            ev = st.done[m.ready_after]
            if not ev.processed:
                yield ev
            st.sched.submit(m)
            self.launch_selected(st)
