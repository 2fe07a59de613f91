"""Collectives decomposed into steps of flows on the fluid network.

Each collective is a simpy process: a sequence of steps, each waiting a per-step
latency (the largest path latency among the step's flows: the alpha of alpha-beta)
and then moving its flows (the beta part, at whatever rate fair sharing gives them).
A step ends when its last flow ends. All work on any subset of ranks (a communicator).

- ``allreduce``, in NCCL's vocabulary (``algo`` like NCCL_ALGO, ``proto`` like NCCL_PROTO):
  - ``auto`` (the default): NCCL 2.30's tuning model (:mod:`lina_sim.network.nccl`)
    picks, per call size, the algorithm (ring, tree or NVLS) and the protocol (LL,
    LL128, Simple), and the pair runs as one step of its flows. On a cluster whose GPU
    the model cannot place (a CPU testbed, where the runtime uses gloo, not NCCL) it
    runs ``flat-ring``.
  - ``ring``, ``tree``, ``nvls``: the same model with NCCL's algorithm forced (NVLS only
    on one node of NVSwitch with Hopper or later); ``proto`` forces the protocol too.
  - ``hierarchical``: intra-node reduce-scatter, inter-node ring allreduce among the
    GPUs of equal local index, intra-node all-gather (lina-sim's 2D allreduce).
  - ``flat-ring``: lina-sim's pre-NCCL alpha-beta ring, kept for before/after
    comparisons: 2(n-1) latency-bound steps of S/(C·n) bytes per flow over C channels.
    As NCCL does, channel c enters and leaves each node through a different GPU, so a
    multi-node ring uses every NIC the communicator owns.
  ``proto`` other than ``auto`` needs ``auto``, ``ring``, ``tree`` or ``nvls``.
- ``all_to_all`` with a send matrix (bytes from rank i to rank j, in communicator order):
  - ``direct`` (the default): NCCL's grouped send/recv (``ncclGroupStart``; a send and
    a receive per peer; ``ncclGroupEnd``) priced by :mod:`lina_sim.network.nccl_p2p`: one
    step whose latency is the p2p model's (NCCL base and per-hop latencies by link
    class, work batches per channel, network peers), whose flows share links max-min
    fairly and carry their bytes inflated by the protocol (LL's flags) and by the
    connection's channel cap (NCCL's p2p channels per peer x per-channel bandwidth).
    On a GPU NCCL's model cannot place (a CPU testbed) it runs ``flat``;
  - ``flat``: lina-sim's pre-NCCL model, kept for before/after comparisons: every pair
    at once after the largest path latency, bytes as sent;
  - ``hierarchical`` (2D, Tutel/DeepSpeed): intra-node all-to-all that gathers, on the
    GPU of local index l, everything its node sends to local index l anywhere; then an
    inter-node all-to-all among GPUs of equal local index. Each phase is one grouped
    p2p call priced like ``direct`` (with the whole communicator's NCCL channels), or
    like ``flat`` where ``direct`` falls back to it.
- ``send_recv`` (``p2p``), as nccl-tests' ``sendrecv_perf``: every rank sends to the next
  rank of the communicator and receives from the previous one, all pairs at once, one
  grouped p2p call priced like ``direct`` (``algo="flat"``: the pre-NCCL model).
- ``all_to_all_groups``: the even all-to-alls of many communicators of one shape at once
  (a step's expert-parallel groups across every data-parallel replica), as one process.

Cost at frontier scale (issue 17). An even all-to-all (a number, or a matrix whose
off-diagonal entries are all equal) never builds its n x n pairs: its steps are blocks
of ranks that all exchange (the communicator; per node and per local index for the two
hierarchical phases), and ``Topology.block_pairs`` counts each path class's link
multiplicities from the ranks per node, rail and leaf, O(ranks + links). NCCL's p2p
model prices the call from per-rank message counts. The per-pair construction is kept
(``Collectives(exact_paths=True)``) as the reference these counts must match exactly
(``tests/test_frontier_scale.py``). An uneven all-to-all of more than
:data:`EXACT_FLOW_LIMIT` flows is aggregated per node pair, or per source node and
span of destination nodes where node pairs would exceed :data:`AGGREGATE_LIMIT`
(:meth:`Collectives._aggregate`: link loads exact, pacing within an aggregate
proportional); on a skewed 256-GPU dispatch it lands within 0.4% of exact per-flow
sharing (``benchmarks/bench_network.py --uneven``).

Units: bytes, seconds.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import simpy

from lina_sim.config.fields import Field
from lina_sim.errors import ConfigError
from lina_sim.network import nccl, nccl_p2p
from lina_sim.network.fluid import FluidNetwork, links_of_paths, max_min_rates

# Allreduce names that run NCCL's tuning model -> the NCCL algorithm they force (None:
# NCCL's own choice per size). The others are lina-sim's own algorithms.
NCCL_ALLREDUCE: dict[str, str | None] = {"auto": None, "ring": "ring", "tree": "tree", "nvls": "nvls"}
ALGORITHMS = {
    "allreduce": (*NCCL_ALLREDUCE, "hierarchical", "flat-ring"),
    "all_to_all": ("direct", "hierarchical", "flat"),
}
# Allreduce protocols (NCCL_PROTO), ``auto`` first: only with the NCCL_ALLREDUCE names.
PROTOCOLS = ("auto", *nccl.PROTOS)
# Point-to-point patterns the micro-benchmarks time beside the collectives. They are kept
# out of ALGORITHMS, from which a scenario's ``collectives:`` block is built: no training
# or serving step chooses an algorithm for them.
POINT_TO_POINT = {"sendrecv": ("p2p",)}
# Everything the micro-benchmarks time, with its algorithms (the first is the default).
TIMED_OPS: dict[str, tuple[str, ...]] = {**ALGORITHMS, **POINT_TO_POINT}
# Uneven all-to-alls up to this many flows get one group per flow (exact max-min).
EXACT_FLOW_LIMIT = 4096
# Above it, at most this many aggregates (flow groups) per uneven step: node pairs, or
# coarser (Collectives._cells). The fluid network's cost grows with the square of them.
AGGREGATE_LIMIT = 256


@dataclass(frozen=True)
class CollectiveAlgos:
    """Which collective algorithms the cluster's communication library uses (the
    scenario's ``collectives:`` block): the allreduce ``algo`` and ``proto`` and the
    ``all_to_all`` algorithm."""

    algo: str = "auto"
    proto: str = "auto"
    all_to_all: str = "direct"


@dataclass(frozen=True)
class StepPattern:
    """The flows of one step, pre-grouped: per group (links, mult, n_flows, fraction of
    the step's per-flow size, fair-share weight per flow), and the step latency alpha (s).

    A flow's weight is 1 / (flows its source rank has in the step): each rank drives its
    part of a collective step with the same total weight (see ``lina_sim.network.fluid``)."""

    groups: tuple[tuple[np.ndarray, np.ndarray, int, float, float], ...]
    latency: float


@dataclass
class CollectiveResult:
    """What one collective did: its ranks, bytes per rank, and [start, end) in s."""

    op: str
    algo: str
    ranks: np.ndarray
    bytes_per_rank: float
    start: float
    end: float = float("nan")
    steps: int = 0
    tag: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start


def algorithm_field(op: str) -> Field:
    """The scenario field that picks ``op``'s algorithm (``collectives.algo`` for the
    allreduce, ``collectives.all_to_all``): one of :data:`ALGORITHMS`, the first by default."""
    return Field(str, ALGORITHMS[op][0], choices=ALGORITHMS[op], help=f"the {op} algorithm")


def protocol_field() -> Field:
    """The scenario field ``collectives.proto``: the allreduce protocol, ``auto`` by default."""
    return Field(str, PROTOCOLS[0], choices=PROTOCOLS, help="the allreduce protocol (NCCL_PROTO)")


def check_algo(op: str, algo: str, field: str = "algo") -> None:
    if op not in ALGORITHMS:
        raise ConfigError("op", f"unknown collective {op!r}", ALGORITHMS)
    if algo not in ALGORITHMS[op]:
        raise ConfigError(field, f"unknown {op} algorithm {algo!r}", ALGORITHMS[op])


def check_proto(algo: str, proto: str, field: str = "proto") -> None:
    """``proto`` is an allreduce protocol that ``algo`` takes: a forced protocol needs one
    of the NCCL names (:data:`NCCL_ALLREDUCE`); else a ConfigError naming ``field``."""
    if proto not in PROTOCOLS:
        raise ConfigError(field, f"unknown allreduce protocol {proto!r}", PROTOCOLS)
    if proto != "auto" and algo not in NCCL_ALLREDUCE:
        raise ConfigError(
            field,
            f"protocol {proto!r} needs one of NCCL's algorithms; allreduce {algo!r} has none to choose",
            f"auto, or {proto} with algo {'|'.join(NCCL_ALLREDUCE)}",
        )


def _in_our_names(e: ConfigError, where: str = "") -> ConfigError:
    """NCCL's "not available here" error on ``algo`` / ``proto`` with the allowed values in
    lina-sim's names (``auto``, NCCL's algorithms available here, lina-sim's own) and the
    field under ``where`` (``collectives``); other errors unchanged."""
    if e.field not in ("algo", "proto"):
        return e
    have = (e.allowed or "").split(", ")
    if e.field == "algo":
        allowed = [a for a in ALGORITHMS["allreduce"] if a not in NCCL_ALLREDUCE or NCCL_ALLREDUCE[a] in have]
        allowed = ["auto", *(a for a in allowed if a != "auto")]
    else:
        allowed = ["auto", *(p for p in have if p)]
    return ConfigError(f"{where}.{e.field}" if where else e.field, e.problem, allowed)


# What a scenario's collectives: block may hold, for its error messages.
COLLECTIVES_ALLOWED = (
    f"{{algo: {'|'.join(ALGORITHMS['allreduce'])}, proto: {'|'.join(PROTOCOLS)}, "
    f"all_to_all: {'|'.join(ALGORITHMS['all_to_all'])}}}"
)


def renamed_allreduce(block, where: str = "collectives") -> None:
    """An old-style ``collectives.allreduce:`` key is one ConfigError saying it is now
    ``collectives.algo`` (in NCCL's vocabulary), with the allowed values."""
    if "allreduce" in block:
        old = block["allreduce"]
        hint = {"ring": "flat-ring", "nccl": "auto", "nccl-ring": "ring", "nccl-tree": "tree"}.get(str(old))
        raise ConfigError(
            f"{where}.allreduce",
            f"renamed to {where}.algo (NCCL's names; with {where}.proto for the protocol)"
            + (f": the old {old!r} is now {where}.algo: {hint}" if hint else ""),
            ALGORITHMS["allreduce"],
        )


def check_nccl_hardware(cluster, algo: str, proto: str = "auto", where: str = "") -> None:
    """A forced NCCL algorithm or protocol (``algo`` ring / tree / nvls, ``proto`` not
    ``auto``) exists on an allreduce over the whole ``cluster``; else a ConfigError on
    ``<where>.algo`` / ``<where>.proto`` naming what is available (``nvls`` needs one node
    of NVSwitch with Hopper or later)."""
    check_algo("allreduce", algo, f"{where}.algo" if where else "algo")
    check_proto(algo, proto, f"{where}.proto" if where else "proto")
    forced = NCCL_ALLREDUCE.get(algo, "")
    if forced == "" or (forced is None and proto == "auto") or cluster.world_size < 2:
        return
    try:
        nccl.predict(cluster, 1 << 20, algo=forced, proto=None if proto == "auto" else proto)
    except ConfigError as e:
        raise _in_our_names(e, where) from None


class Collectives:
    """Runs collectives as simpy processes on a :class:`FluidNetwork`.

    ``pipelined=True`` (the default) runs the identical consecutive steps of a phase
    (the 2(n-1) steps of a ring, the g-1 steps of an intra-node reduce-scatter) as one
    step carrying all their bytes after all their latencies, as NCCL's pipelined ring
    keeps every ring link busy at once. Alone it gives the same time as the step-by-step
    form (``pipelined=False``, one barrier per step) and it costs two network events per
    phase instead of two per step.
    """

    def __init__(self, net: FluidNetwork, pipelined: bool = True, exact_paths: bool = False):
        self.net = net
        self.pipelined = pipelined
        # True: build every flow's path even for symmetric steps (O(flows)), the reference
        # that the structural counting (Topology.block_pairs, O(ranks + links)) must match.
        self.exact_paths = exact_paths
        self.env: simpy.Environment = net.env
        self.topo = net.topology
        # Everything below depends on the topology alone, so every Collectives on one
        # Topology (each policy's step, each alone-time measurement) shares it: a 1024-rank
        # all-to-all's routes are worked out once, not once per simulation.
        c = _shared_caches(self.topo)
        self._pattern_cache: dict[tuple, StepPattern] = c["patterns"]
        self._rings: dict[bytes, tuple[StepPattern, int]] = c["rings"]  # ranks -> (step pattern, channels)
        self._checked: dict[tuple, np.ndarray] = c["checked"]
        # ranks -> NCCL's cost table, and per algorithm its flow step and bytes per payload byte
        self._nccl: dict[bytes, tuple[nccl.NcclModel, dict[str, tuple[StepPattern, float]]]] = c["nccl"]
        # Whether NCCL's models apply (else ``auto`` and ``direct`` run the flat models),
        # NCCL's p2p parameters per communicator, and each p2p call's step, by its shape.
        self._nccl_gpu = nccl.knows_gpu(self.topo.cluster)
        self._p2p_comms: dict[bytes, nccl_p2p.P2pComm] = c["p2p_comms"]
        self._p2p_steps: dict[tuple, StepPattern] = c["p2p_steps"]
        self._choices: dict[tuple, tuple[str, str]] = c["choices"]  # (ranks, bytes, forced) -> NCCL's pair
        self._group_sets: dict[tuple, tuple[list[np.ndarray], np.ndarray, np.ndarray]] = c["group_sets"]

    # -- public API ----------------------------------------------------------------------
    def allreduce(
        self,
        ranks: Sequence[int],
        nbytes: float,
        algo: str = "auto",
        tag: str = "allreduce",
        *,
        proto: str = "auto",
    ):
        """Allreduce ``nbytes`` per rank over ``ranks``; returns the simpy process, whose
        value is a :class:`CollectiveResult`. ``algo`` is one of ``ALGORITHMS["allreduce"]``
        and ``proto`` one of :data:`PROTOCOLS`, as NCCL_ALGO / NCCL_PROTO (see the module
        docstring). A bad name, or an algorithm or protocol this hardware lacks, is a
        ConfigError on ``algo`` / ``proto`` raised here, before the process runs."""
        r, pair = self._allreduce_plan(ranks, nbytes, algo, proto)
        res = CollectiveResult("allreduce", algo, r, float(nbytes), self.env.now, tag=tag)
        if pair is not None:
            body = self._nccl_allreduce(r, nbytes, res, pair)
        elif algo == "hierarchical":
            body = self._hier_allreduce(r, nbytes, res)
        else:  # flat-ring, an NCCL name with nothing to move, or auto on a GPU NCCL cannot place
            body = self._ring_allreduce(r, nbytes, res)
        return self.env.process(self._run(body, res))

    def allreduce_choice(
        self, ranks: Sequence[int], nbytes: float, algo: str = "auto", proto: str = "auto"
    ) -> tuple[str, str]:
        """What :meth:`allreduce` runs for this call, as NCCL_DEBUG=INFO reports it:
        NCCL's (algorithm, protocol), e.g. ``("tree", "LL")``; ``(algo, "-")`` for
        ``hierarchical`` and ``flat-ring`` (and ``flat-ring`` for ``auto`` on a GPU the NCCL
        model cannot place); ``("-", "-")`` when there is nothing to move. Checks as
        :meth:`allreduce` does, and starts nothing."""
        r, pair = self._allreduce_plan(ranks, nbytes, algo, proto)
        if pair is not None:
            return pair
        if algo in NCCL_ALLREDUCE and (r.size == 1 or nbytes == 0):
            return ("-", "-")
        return (algo if algo not in NCCL_ALLREDUCE else "flat-ring", "-")

    def allreduce_patterns(self, ranks: Sequence[int], algo: str = "auto") -> list[StepPattern]:
        """The flow steps an allreduce over ``ranks`` may run under ``algo``, whatever its
        size: every algorithm NCCL's model has for the communicator where ``algo`` leaves
        the choice to it (``auto``), else the forced algorithm's; ``hierarchical``'s two
        phases; the flat ring's. Their groups are the flow groups the network would
        carry (links, multiplicities; bytes are left out: they scale with the size). For
        callers that must know which links a communicator's allreduces can load (the
        training engine's replica classes); caches as :meth:`allreduce` does."""
        r = self._ranks(ranks)
        if r.size == 1:
            return []
        by_node = _group_by_node(self.topo, r) if algo == "hierarchical" else []
        if len(by_node) > 1:
            return [p for p in self._hier_patterns(r, by_node) if p is not None]
        if algo in NCCL_ALLREDUCE and (NCCL_ALLREDUCE[algo] is not None or self._nccl_gpu):
            steps = self._nccl_tables(r)[1]
            forced = NCCL_ALLREDUCE[algo]
            return [pat for name, (pat, _) in steps.items() if forced is None or name == forced]
        return [self._ring_pattern(r)[0]]

    def _allreduce_plan(self, ranks, nbytes: float, algo: str, proto: str) -> tuple[np.ndarray, tuple[str, str] | None]:
        """The checked ranks and NCCL's (algorithm, protocol) for the call, ``None`` where
        NCCL's model does not run it."""
        check_algo("allreduce", algo)
        check_proto(algo, proto)
        r = self._ranks(ranks)
        if not nbytes >= 0:
            raise ConfigError("size", f"must be >= 0 bytes, got {nbytes}")
        if algo == "hierarchical":
            _equal_per_node(_group_by_node(self.topo, r), "hierarchical allreduce")
        if algo not in NCCL_ALLREDUCE:
            return r, None
        forced = NCCL_ALLREDUCE[algo]
        if forced is None and proto == "auto" and not self._nccl_gpu:
            return r, None  # auto on a GPU NCCL's model cannot place: the flat ring
        return r, self._nccl_choice(r, nbytes, forced, None if proto == "auto" else proto)

    def all_to_all(self, ranks: Sequence[int], send, algo: str = "direct", tag: str = "all_to_all"):
        """All-to-all over ``ranks``. ``send`` is either a number (bytes each rank sends
        in total, split evenly over all ranks of the communicator including itself, as
        in ``all_to_all_single``) or an [n, n] matrix of bytes from rank i to rank j."""
        check_algo("all_to_all", algo)
        r = self._ranks(ranks)
        if np.isscalar(send) and not self.exact_paths:
            # Even split: per-class counts, never an [n, n] matrix or per-pair paths.
            total = float(send)
            if not total >= 0:
                raise ConfigError("size", f"must be >= 0 bytes, got {send}")
            if algo == "hierarchical":
                _equal_per_node(_group_by_node(self.topo, r), "hierarchical all_to_all")
            unit = total / r.size
            # What the matrix form reports (a row's sum), to the last bit.
            per_rank = total if algo == "direct" and self._nccl_gpu else float(np.full(r.size, unit).sum())
            res = CollectiveResult("all_to_all", algo, r, per_rank, self.env.now, tag=tag)
            return self.env.process(self._run(self._uniform_a2a(r, unit, algo, res), res))
        if algo == "direct" and self._nccl_gpu and np.isscalar(send):
            # Even split, the training step's case: no [n, n] matrix (8 MB at 1024 ranks).
            total = float(send)
            if not total >= 0:
                raise ConfigError("size", f"must be >= 0 bytes, got {send}")
            res = CollectiveResult("all_to_all", algo, r, total, self.env.now, tag=tag)
            return self.env.process(self._run(self._p2p_step(("a2a-p2p",), r, None, None, total / r.size, res), res))
        matrix = send_matrix(send, r.size)
        if algo == "hierarchical":
            _equal_per_node(_group_by_node(self.topo, r), "hierarchical all_to_all")
        res = CollectiveResult("all_to_all", algo, r, float(matrix.sum(axis=1).max()), self.env.now, tag=tag)
        unit = _uniform_off_diagonal(matrix)
        if unit is not None and not self.exact_paths:
            # Equal bytes between every pair: the even split's per-class path (a rank's
            # bytes to itself move nowhere, whatever the diagonal holds).
            return self.env.process(self._run(self._uniform_a2a(r, unit, algo, res), res))
        if algo == "flat":
            body = self._flat_a2a(r, matrix, res)
        elif algo == "direct":
            body = self._direct_a2a(r, matrix, res)
        else:
            body = self._hier_a2a(r, matrix, res)
        return self.env.process(self._run(body, res))

    def send_recv(self, ranks: Sequence[int], nbytes: float, tag: str = "sendrecv", algo: str = "p2p"):
        """nccl-tests' ``sendrecv``: every rank of ``ranks`` sends ``nbytes`` to the next
        rank in the given order and receives ``nbytes`` from the previous one (the last
        sends to the first), all at once, as one grouped p2p call priced by
        :mod:`lina_sim.network.nccl_p2p` (``algo="flat"``: one step whose latency is its
        longest path's, the pre-NCCL model). Two ranks exchange ``nbytes`` each way; one
        rank sends to itself, which crosses no link and takes no time. Returns the simpy
        process, whose value is a :class:`CollectiveResult` (op ``sendrecv``, algo ``p2p``
        or ``flat``)."""
        if algo not in ("p2p", "flat"):
            raise ConfigError("algo", f"unknown sendrecv algorithm {algo!r}", ("p2p", "flat"))
        r = self._ranks(ranks)
        if not nbytes >= 0:
            raise ConfigError("size", f"must be >= 0 bytes, got {nbytes}")
        res = CollectiveResult("sendrecv", algo, r, float(nbytes), self.env.now, tag=tag)
        return self.env.process(self._run(self._send_recv(r, nbytes, res, flat=algo == "flat"), res))

    # -- plumbing ------------------------------------------------------------------------
    def _ranks(self, ranks) -> np.ndarray:
        key = tuple(ranks) if isinstance(ranks, (tuple, list, range)) else None
        if key is not None and key in self._checked:
            return self._checked[key]
        r = self.topo.check_ranks(ranks)
        if key is not None:
            self._checked[key] = r
        return r

    def _run(self, body: Generator, res: CollectiveResult):
        yield from body
        res.end = self.env.now
        return res

    def _pattern(self, key: tuple, src: np.ndarray, dst: np.ndarray, weight: np.ndarray | None = None) -> StepPattern:
        """Group a step's flows by path class (which kinds of link they cross) and by
        relative size; with ``weight`` None every flow carries the same bytes."""
        if key in self._pattern_cache:
            return self._pattern_cache[key]
        keep = src != dst
        src, dst = src[keep], dst[keep]
        w = np.ones(src.size) if weight is None else np.asarray(weight, np.float64)[keep]
        pos = w > 0
        src, dst, w = src[pos], dst[pos], w[pos]
        if src.size == 0:
            pat = StepPattern((), 0.0)
        else:
            paths = self.topo.paths(src, dst)
            lat = float(self.topo.latency_of_paths(paths).max())
            fair = 1.0 / np.bincount(src)[src]
            if weight is not None and src.size > EXACT_FLOW_LIMIT and not self.exact_paths:
                groups = self._aggregate(src, dst, paths, w, fair)
                self._pattern_cache[key] = pat = StepPattern(tuple(groups), lat)
                return pat
            if weight is not None and src.size <= EXACT_FLOW_LIMIT:
                keys = np.arange(src.size)  # uneven: one group per flow, exact max-min
            else:
                # Flows of a class cross the same kinds of link; with equal sizes and weights
                # they are interchangeable under the topology's symmetry.
                hops = (paths >= 0).sum(axis=1)
                if weight is None and np.all(fair == fair[0]):
                    keys = hops
                else:
                    _, keys = np.unique(
                        np.stack([hops, np.round(w * 1e9), np.round(fair * 1e9)]), axis=1, return_inverse=True
                    )
                    keys = keys.ravel()
            groups = []
            order = np.argsort(keys, kind="stable")
            bounds = np.flatnonzero(np.diff(keys[order])) + 1
            for idx in np.split(order, bounds):
                links, mult = links_of_paths(paths[idx], len(self.net.capacity))
                groups.append((links, mult, int(idx.size), float(w[idx[0]]), float(fair[idx[0]])))
            pat = StepPattern(tuple(groups), lat)
        self._pattern_cache[key] = pat
        return pat

    def _aggregate(self, src, dst, paths, w, fair, wire=None) -> list[tuple]:
        """The flows of an uneven step, too many for one group each, as one aggregate per
        node pair (the flows inside a node: one per node), or coarser (:meth:`_cells`).
        An aggregate moves its flows' bytes together (``w`` summed, relative to the
        step's unit) and loads each link with exactly the bytes its flows put there
        (``w x wire`` summed over the flows crossing it, ``wire``: bytes on the wire per
        payload byte, default 1), as a fractional multiplicity; its fair-share weight is
        its flows' weights summed.

        The approximation: the flows of an aggregate progress in proportion to their
        sizes and finish together, where exact max-min lets the small ones finish early
        and hands their share to the rest. Link loads, and so the bottleneck link's busy
        time, are exact; what can differ is how long a link that is not the bottleneck
        idles. ``benchmarks/bench_network.py --uneven`` measures the error against exact
        per-flow sharing."""
        n_links = len(self.net.capacity)
        cell = self._cells(src, dst)
        hops = (paths >= 0).sum(axis=1)
        flow = np.repeat(np.arange(src.size), hops)
        load = w if wire is None else w * wire
        ukey, inv = np.unique(cell[flow] * n_links + paths[paths >= 0], return_inverse=True)
        link_load = np.bincount(inv.ravel(), weights=load[flow])
        size, weight, count = np.bincount(cell, weights=w), np.bincount(cell, weights=fair), np.bincount(cell)
        bounds = np.searchsorted(ukey // n_links, np.arange(size.size + 1))
        links = ukey % n_links
        return [
            (links[a:b], link_load[a:b] / size[c], int(count[c]), float(size[c]), float(weight[c]))
            for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]

    def _cells(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """The aggregate (0, 1, ...) of each flow ``src[i] -> dst[i]``: its node pair; where
        that makes more than :data:`AGGREGATE_LIMIT` aggregates (an uneven all-to-all over
        thousands of GPUs), its source node and a span of consecutive destination nodes,
        the span as short as keeps them within the limit (a whole step per source node at
        worst)."""
        a, b = self.topo.node_of(src), self.topo.node_of(dst)
        span = 1
        while True:
            _, cell = np.unique(a * self.topo.nodes + b // span, return_inverse=True)
            cell = cell.ravel()
            count = int(cell.max()) + 1
            if count <= AGGREGATE_LIMIT or span >= self.topo.nodes:
                return cell
            span = min(self.topo.nodes, span * max(2, -(-count // AGGREGATE_LIMIT)))

    def _steps(self, pattern: StepPattern, bytes_per_unit: float, count: int, res: CollectiveResult):
        """``count`` identical steps: one merged step when pipelined, else one by one."""
        if self.pipelined:
            yield from self._step(pattern, bytes_per_unit * count, res, count)
        else:
            for _ in range(count):
                yield from self._step(pattern, bytes_per_unit, res)

    def _step(self, pattern: StepPattern, bytes_per_unit: float, res: CollectiveResult, steps: int = 1):
        res.steps += steps
        if pattern.latency > 0:
            yield self.env.timeout(pattern.latency * steps)
        events = [
            self.net.transfer(links, mult, n, frac * bytes_per_unit, res.tag, weight)
            for links, mult, n, frac, weight in pattern.groups
            if frac * bytes_per_unit > 0
        ]
        if len(events) == 1:
            yield events[0]
        elif events:
            yield self.env.all_of(events)

    # -- allreduce -----------------------------------------------------------------------
    def _ring_orders(self, ranks: np.ndarray) -> list[np.ndarray]:
        """One rank order per channel (:func:`lina_sim.network.nccl.ring_orders`)."""
        return nccl.ring_orders(self.topo, _group_by_node(self.topo, ranks))

    def _ring_pattern(self, ranks: np.ndarray) -> tuple[StepPattern, int]:
        """The flat ring's step over ``ranks`` and its channel count (cached)."""
        key = ranks.tobytes()
        if key not in self._rings:
            orders = self._ring_orders(ranks)
            ring = nccl.ring_layout(orders)
            self._rings[key] = (self._pattern(("ring", key), ring.src, ring.dst), len(orders))
        return self._rings[key]

    def _ring_allreduce(self, ranks: np.ndarray, nbytes: float, res: CollectiveResult):
        n = ranks.size
        if n == 1 or nbytes == 0:
            return
        pat, channels = self._ring_pattern(ranks)
        chunk = nbytes / (channels * n)
        yield from self._steps(pat, chunk, 2 * (n - 1), res)

    def _hier_allreduce(self, ranks: np.ndarray, nbytes: float, res: CollectiveResult):
        by_node = _group_by_node(self.topo, ranks)
        if len(by_node) == 1:
            yield from self._ring_allreduce(ranks, nbytes, res)
            return
        intra, inter = self._hier_patterns(ranks, by_node)
        g, nodes = by_node[0].size, len(by_node)
        if intra is not None:
            yield from self._steps(intra, nbytes / g, g - 1, res)  # reduce-scatter
        yield from self._steps(inter, nbytes / (g * nodes), 2 * (nodes - 1), res)
        if intra is not None:
            yield from self._steps(intra, nbytes / g, g - 1, res)  # all-gather

    def _hier_patterns(self, ranks: np.ndarray, by_node: list[np.ndarray]) -> tuple[StepPattern | None, StepPattern]:
        """The hierarchical allreduce's steps over ``ranks`` (on two or more nodes): the
        ring inside each node (``None`` with one rank per node) and the ring across nodes."""
        g = _equal_per_node(by_node, "hierarchical allreduce")
        grid = np.stack(by_node)  # [nodes, g]
        key = ranks.tobytes()
        inter = self._pattern(("h-inter", key), grid.ravel(), np.roll(grid, -1, axis=0).ravel())
        if g == 1:
            return None, inter
        return self._pattern(("h-intra", key), grid.ravel(), np.roll(grid, -1, axis=1).ravel()), inter

    def _nccl_tables(self, ranks: np.ndarray) -> tuple[nccl.NcclModel, dict[str, tuple[StepPattern, float]]]:
        """NCCL's cost table for this communicator and, per algorithm, its flow step (with
        one fair-share weight for every flow, as the table prices the layout) and the
        bytes each flow carries per payload byte."""
        key = ranks.tobytes()
        if key not in self._nccl:
            model, layouts = nccl.model_for(self.topo, _group_by_node(self.topo, ranks))
            steps = {}
            for algo, lay in layouts.items():
                pat = self._pattern(("nccl", algo, key), lay.src, lay.dst)
                weight = 1.0 / np.bincount(lay.src[lay.src != lay.dst]).max()  # each rank's total <= 1
                steps[algo] = (StepPattern(tuple((*g[:4], weight) for g in pat.groups), 0.0), lay.share)
            self._nccl[key] = (model, steps)
        return self._nccl[key]

    def _nccl_choice(self, ranks: np.ndarray, nbytes: float, algo: str | None, proto: str | None):
        """NCCL's (algorithm, protocol) for this call, checked before the process starts;
        ``None`` when there is nothing to move (one rank or no bytes). A forced algorithm
        or protocol this communicator lacks is a ConfigError on ``algo`` / ``proto`` whose
        allowed values are in lina-sim's names (``auto``, what NCCL has here, and lina-sim's
        own algorithms)."""
        if ranks.size == 1 or nbytes == 0:
            nccl.check_names(algo, proto)
            return None
        key = (ranks.tobytes(), nbytes, algo, proto)
        if key not in self._choices:  # a step asks again for every micro-op of a size
            try:
                self._choices[key] = self._nccl_tables(ranks)[0].choose(nbytes, algo, proto)
            except ConfigError as e:
                raise _in_our_names(e) from None
        return self._choices[key]

    def _nccl_allreduce(self, ranks: np.ndarray, nbytes: float, res: CollectiveResult, pair):
        """One step: the pair's modelled latency, then its layout's flows, each carrying
        ``share x S x inflation`` bytes (the protocol's overheads as extra bytes)."""
        if pair is None:
            return
        model, steps = self._nccl_tables(ranks)
        pattern, share = steps[pair[0]]
        step = StepPattern(pattern.groups, model.latency(*pair, nbytes))
        yield from self._step(step, share * nbytes * model.inflation(*pair, nbytes), res)

    # -- point to point ------------------------------------------------------------------
    def _send_recv(self, ranks: np.ndarray, nbytes: float, res: CollectiveResult, flat: bool = False):
        if nbytes == 0:
            return
        if flat or not self._nccl_gpu:
            pat = self._pattern(("sendrecv", ranks.tobytes()), ranks, np.roll(ranks, -1))
            yield from self._step(pat, nbytes, res)
            return
        n = ranks.size
        src_i = np.arange(n)
        dst_i = np.roll(src_i, -1)
        keep = src_i != dst_i
        src_i, dst_i = src_i[keep], dst_i[keep]
        yield from self._p2p_step(("sendrecv",), ranks, src_i, dst_i, np.full(src_i.size, float(nbytes)), res)

    def _p2p_comm(self, ranks: np.ndarray) -> nccl_p2p.P2pComm:
        """NCCL's p2p parameters of this communicator (cached)."""
        key = ranks.tobytes()
        if key not in self._p2p_comms:
            self._p2p_comms[key] = nccl_p2p.P2pComm.of(self.topo, _group_by_node(self.topo, ranks))
        return self._p2p_comms[key]

    def _p2p_step(self, key: tuple, ranks: np.ndarray, src_i, dst_i, nbytes, res: CollectiveResult, full=False):
        """One grouped NCCL p2p call: messages ``ranks[src_i] -> ranks[dst_i]`` of ``nbytes``
        (``full``: every ordered pair, in ``np.nonzero(~eye)`` order). One step with the
        p2p model's latency; each flow group carries its bytes times its inflation
        (:func:`lina_sim.network.nccl_p2p.P2pComm.inflation`, with the rate the group gets
        when every flow of the call runs)."""
        if src_i is None:  # every ordered pair, each ``nbytes`` (a number)
            unit, uniform, full = float(nbytes), True, True
            if not unit > 0 or ranks.size < 2:
                return
        else:
            nbytes = np.asarray(nbytes, dtype=np.float64)
            on = nbytes > 0
            if not on.any():
                return
            unit = float(nbytes.max())
            uniform = bool(on.all()) and bool(np.all(nbytes == unit))
        pairs = b"full" if full else np.stack([src_i, dst_i]).tobytes()
        wkey = b"" if uniform else np.round(nbytes / unit, 9).tobytes()
        cache = self._p2p_steps
        ckey = key + (ranks.tobytes(), pairs, wkey, unit)
        if ckey not in cache:
            if src_i is None:
                src_i, dst_i = _off_diagonal(ranks.size)
                nbytes = np.full(src_i.size, unit)
            if not uniform:
                src_i, dst_i, nbytes = src_i[on], dst_i[on], nbytes[on]
            weight = None if uniform else nbytes / unit
            pat = self._pattern(key + ("p2p", ranks.tobytes(), pairs, wkey), ranks[src_i], ranks[dst_i], weight)
            comm = self._p2p_comm(ranks)
            kinds = nccl_p2p.kind_codes(self.topo, ranks[src_i], ranks[dst_i])
            latency = comm.latency(src_i, nbytes, kinds)
            share = comm.share(src_i, nbytes)
            if not uniform and src_i.size > EXACT_FLOW_LIMIT and not self.exact_paths:
                groups = self._inflated_aggregates(pat, comm, ranks[src_i], ranks[dst_i], nbytes / unit, unit, share)
                cache[ckey] = StepPattern(groups, latency)
            else:
                cache[ckey] = self._inflated(pat, comm, unit, share, latency)
        yield from self._step(cache[ckey], unit, res)

    def _block_step(self, key: tuple, ranks: np.ndarray, block: np.ndarray, unit: float, res, p2p: bool, comm=None):
        """One step in which every rank sends ``unit`` bytes to every other rank of its
        block (``block[i]`` labels ``ranks[i]``; blocks of equal size), as the per-pair
        forms (:meth:`_p2p_step` with ``p2p``, else :meth:`_matrix_step`) would run it,
        built from :meth:`Topology.block_pairs`' per-class counts: O(ranks + links), not
        O(pairs). With ``p2p``, NCCL's p2p model of communicator ``comm`` (default
        ``ranks``) prices the call."""
        if not unit > 0:
            return
        comm_ranks = ranks if comm is None else comm
        ckey = ("blocks", p2p, *key, ranks.tobytes(), block.tobytes(), unit if p2p else 0.0, comm_ranks.tobytes())
        cache = self._p2p_steps if p2p else self._pattern_cache
        if ckey not in cache:
            classes = self.topo.block_pairs(ranks, block)
            if not classes:  # blocks of one rank: nothing moves, and no step is counted
                cache[ckey] = StepPattern((), 0.0)
                return
            sent = sum(c.per_src for c in classes)
            senders = sent[sent > 0]
            if senders.size and np.any(senders != senders[0]):
                raise ValueError("blocks of one step must have equal sizes")
            fair = 1.0 / senders[0] if senders.size else 1.0
            groups = tuple((c.links, c.mult, c.n_flows, 1.0, fair) for c in classes)
            pat = StepPattern(groups, max((c.latency for c in classes), default=0.0))
            if p2p and groups:
                comm = self._p2p_comm(comm_ranks)
                idx = np.tile(np.arange(ranks.size), len(classes))
                kinds = np.repeat([nccl_p2p.KIND_NAMES.index(c.kind) for c in classes], ranks.size)
                count = np.concatenate([c.per_src for c in classes])
                latency = comm.latency(idx, unit, kinds, count)
                share = comm.share(idx, np.full(idx.size, unit), count)
                pat = self._inflated(pat, comm, unit, share, latency)
            cache[ckey] = pat
        if cache[ckey].groups:
            yield from self._step(cache[ckey], unit, res)

    def _inflated(self, pat: StepPattern, comm: nccl_p2p.P2pComm, unit: float, share: float, latency: float):
        """``pat`` as a grouped p2p call: the model's ``latency`` and each group's bytes
        times its inflation, with the rate the group gets when every flow of the call
        runs (see :meth:`_p2p_step`)."""
        rate0 = max_min_rates([(g[0], g[1], g[4]) for g in pat.groups], self.net.capacity)
        link_kind = self.topo.links.kind
        groups = []
        for g, r0 in zip(pat.groups, rate0):
            kinds_g = set(link_kind[g[0]].tolist())
            kind = nccl_p2p.NIC if "nic" in kinds_g else nccl_p2p.PCIE if "pcie" in kinds_g else nccl_p2p.NVLINK
            infl = float(comm.inflation(g[3] * unit, kind, share, r0))
            groups.append((g[0], g[1], g[2], g[3] * infl, g[4]))
        return StepPattern(tuple(groups), latency)

    def _inflated_aggregates(self, pat: StepPattern, comm, src, dst, w, unit: float, share: float) -> tuple:
        """:meth:`_aggregate`'s groups of a grouped p2p call, each flow's bytes inflated by
        the p2p model (:meth:`_inflated`) at the rate it gets when every aggregate runs:
        its aggregate's rate split in proportion to size."""
        paths = self.topo.paths(src, dst)
        fair = 1.0 / np.bincount(src)[src]
        cell = self._cells(src, dst)
        rate = max_min_rates([(g[0], g[1], g[4]) for g in pat.groups], self.net.capacity)
        rate0 = rate[cell] * w / np.bincount(cell, weights=w)[cell]
        infl = comm.inflation(w * unit, nccl_p2p.kind_codes(self.topo, src, dst), share, rate0)
        return tuple(self._aggregate(src, dst, paths, w, fair, wire=infl))

    def _uniform_a2a(self, ranks: np.ndarray, unit: float, algo: str, res: CollectiveResult, label=None):
        """An all-to-all of ``unit`` bytes per ordered pair (an even split), as ``algo``
        runs it, without a per-pair matrix: ``direct`` and ``flat`` are one block per
        communicator; ``hierarchical`` is a step with a block per node (the gather: each
        GPU collects ``nodes x unit`` from each node-mate) then one with a block per
        local index (the exchange: ``g x unit`` to each peer across nodes). ``label[i]``
        names the communicator of ``ranks[i]`` when several of one shape run at once
        (:meth:`all_to_all_groups`; default: one); NCCL's p2p model prices the first."""
        label = np.zeros(ranks.size, np.int64) if label is None else label
        first = ranks[label == label[0]]
        p2p = algo != "flat" and self._nccl_gpu
        if algo == "hierarchical" and len(_group_by_node(self.topo, first)) > 1:
            node = self.topo.node_of(ranks)
            order = np.lexsort((self.topo.local_of(ranks), node, label))
            r, lab, node = ranks[order], label[order], node[order]
            cell = lab * self.topo.nodes + node
            local = np.arange(r.size) - np.searchsorted(cell, cell)  # position on its node
            g = int(local.max()) + 1
            unit1 = unit * (r.size // g // (int(lab.max()) + 1))  # x nodes per communicator
            comm = r[lab == lab[0]]
            yield from self._block_step(("a2a-h1",), r, cell, unit1, res, self._nccl_gpu, comm)
            yield from self._block_step(("a2a-h2",), r, lab * g + local, unit * g, res, self._nccl_gpu, comm)
            return
        yield from self._block_step(("a2a-p2p",) if p2p else ("a2a",), ranks, label, unit, res, p2p, first)

    def all_to_all_groups(self, groups: Sequence[Sequence[int]], send: float, algo: str = "direct", tag: str = ""):
        """Even all-to-alls of ``send`` bytes per rank (as :meth:`all_to_all` with a number)
        on every communicator of ``groups`` at once, as one process: the expert-parallel
        groups of a step that every data-parallel replica runs together. The groups must
        be disjoint and of one shape (as many ranks on as many nodes, as translates of one
        group are); their flows form one step of per-class counts (O(ranks + links)
        however many groups). The value is one :class:`CollectiveResult` over all their
        ranks, ending when the last group ends. A bad name, an empty or overlapping
        group, or groups of different shapes is a ConfigError."""
        check_algo("all_to_all", algo)
        gs, ranks, label = self._group_set(groups)
        total = float(send)
        if not total >= 0:
            raise ConfigError("size", f"must be >= 0 bytes, got {send}")
        if algo == "hierarchical":
            _equal_per_node(_group_by_node(self.topo, gs[0]), "hierarchical all_to_all")
        res = CollectiveResult("all_to_all", algo, ranks, total, self.env.now, tag=tag or "all_to_all")
        if self.exact_paths:  # the reference: each communicator its own collective
            procs = [self.all_to_all(g, total, algo, tag) for g in gs]
            return self.env.process(self._run(_wait_all(self.env, procs), res))
        return self.env.process(self._run(self._uniform_a2a(ranks, total / gs[0].size, algo, res, label), res))

    def _group_set(self, groups: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """:meth:`all_to_all_groups`' checked groups, all their ranks, and each rank's group
        index; kept per tuple of groups, as a training step asks again for every micro-op
        (the check was ~1.7 s of CPU per policy at 16,384 GPUs)."""
        key = tuple(map(tuple, groups))
        got = self._group_sets.get(key)
        if got is None:
            gs = [self._ranks(g) for g in groups]
            if not gs:
                raise ConfigError("groups", "no communicator given")
            ranks = self.topo.check_ranks(np.concatenate(gs), "groups")
            shapes = {tuple(sorted(np.unique(self.topo.node_of(g), return_counts=True)[1].tolist())) for g in gs}
            if len(shapes) > 1:
                raise ConfigError(
                    "groups", "communicators of different shapes (ranks per node)", "translates of one group"
                )
            got = self._group_sets[key] = (gs, ranks, np.repeat(np.arange(len(gs)), [g.size for g in gs]))
        return got

    # -- all-to-all ----------------------------------------------------------------------
    def _flat_a2a(self, ranks: np.ndarray, matrix: np.ndarray, res: CollectiveResult):
        yield from self._matrix_step(("a2a",), ranks, matrix, res)

    def _direct_a2a(self, ranks: np.ndarray, matrix: np.ndarray, res: CollectiveResult, key: tuple = ("a2a-p2p",)):
        if not self._nccl_gpu:
            yield from self._matrix_step(key, ranks, matrix, res)
            return
        src_i, dst_i = _off_diagonal(ranks.size)
        yield from self._p2p_step(key, ranks, src_i, dst_i, matrix[src_i, dst_i], res, full=True)

    def _matrix_step(self, key: tuple, ranks: np.ndarray, matrix: np.ndarray, res: CollectiveResult):
        n = ranks.size
        off = ~np.eye(n, dtype=bool)
        vals = matrix[off]
        if vals.size == 0 or vals.max() <= 0:
            return
        src_i, dst_i = np.nonzero(off)
        unit = float(vals.max())
        uniform = bool(np.all(vals == unit))
        weight = None if uniform else vals / unit
        wkey = b"" if uniform else np.round(vals / unit, 9).tobytes()
        pat = self._pattern(key + (ranks.tobytes(), wkey), ranks[src_i], ranks[dst_i], weight)
        yield from self._step(pat, unit, res)

    def _hier_a2a(self, ranks: np.ndarray, matrix: np.ndarray, res: CollectiveResult):
        """Tutel/DeepSpeed's 2D all-to-all: two grouped p2p calls (``_direct_a2a``), the
        intra-node gather then the inter-node exchange, both priced with the whole
        communicator's NCCL p2p channels."""
        by_node = _group_by_node(self.topo, ranks)
        if len(by_node) == 1:
            yield from self._direct_a2a(ranks, matrix, res)
            return
        g = _equal_per_node(by_node, "hierarchical all_to_all")
        nodes = len(by_node)
        order = np.concatenate(by_node)
        pos = {int(r): i for i, r in enumerate(ranks)}
        perm = np.array([pos[int(r)] for r in order])
        m = matrix[np.ix_(perm, perm)].reshape(nodes, g, nodes, g)  # [src node, src local, dst node, dst local]
        # Phase 1 (inside node a): (a, l) -> (a, l') carries everything (a, l) sends to local index l'.
        phase1 = np.zeros((nodes * g, nodes * g))
        p1 = m.sum(axis=2)  # [a, l, l']
        for a in range(nodes):
            phase1[a * g : (a + 1) * g, a * g : (a + 1) * g] = p1[a]
        yield from self._direct_a2a(order, phase1, res, ("a2a-h1",))
        # Phase 2 (across nodes): (a, l') -> (b, l') carries what node a sends to (b, l').
        phase2 = np.zeros((nodes * g, nodes * g))
        p2 = m.sum(axis=1)  # [a, b, l']
        for l in range(g):
            phase2[l::g, l::g] = p2[:, :, l]
        yield from self._direct_a2a(order, phase2, res, ("a2a-h2",))


def send_matrix(send, n: int) -> np.ndarray:
    """Normalise an all-to-all size argument to an [n, n] float matrix of bytes."""
    if np.isscalar(send):
        total = float(send)
        if not total >= 0:
            raise ConfigError("size", f"must be >= 0 bytes, got {send}")
        return np.full((n, n), total / n)
    m = np.asarray(send, dtype=np.float64)
    if m.shape != (n, n):
        raise ConfigError("send_matrix", f"shape {m.shape} does not match the communicator", f"({n}, {n})")
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise ConfigError("send_matrix", "entries must be finite and >= 0 bytes")
    return m


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shared_caches(topo) -> dict[str, dict]:
    """The pattern, ring, NCCL and p2p caches of ``topo``, alive as long as it is."""
    if topo not in _CACHES:
        _CACHES[topo] = {
            k: {} for k in ("patterns", "rings", "checked", "nccl", "p2p_comms", "p2p_steps", "choices", "group_sets")
        }
    return _CACHES[topo]


def _wait_all(env: simpy.Environment, procs: list) -> Generator:
    """Wait until every process of ``procs`` has ended."""
    yield env.all_of(procs)


def _uniform_off_diagonal(matrix: np.ndarray) -> float | None:
    """The bytes every ordered pair ``i != j`` of ``matrix`` carries when they are all
    equal, else ``None``."""
    n = matrix.shape[0]
    if n < 2:
        return None
    # The off-diagonal entries are the n - 1 rows of n after dropping the first entry.
    off = matrix.ravel()[1:].reshape(n - 1, n + 1)[:, :n]
    unit = float(off[0, 0])
    return unit if np.all(off == unit) else None


@functools.lru_cache(maxsize=16)
def _off_diagonal(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (i, j), i != j, of ``n`` ranks in ``np.nonzero(~eye)`` order
    (read-only; a 1024-rank all-to-all would otherwise rebuild its million pairs per call)."""
    src, dst = np.nonzero(~np.eye(n, dtype=bool))
    src.flags.writeable = dst.flags.writeable = False
    return src, dst


def _group_by_node(topo, ranks: np.ndarray) -> list[np.ndarray]:
    nodes = topo.node_of(ranks)
    order = np.lexsort((topo.local_of(ranks), nodes))
    r, nd = ranks[order], nodes[order]
    cuts = np.flatnonzero(np.diff(nd)) + 1
    return np.split(r, cuts)


def _equal_per_node(by_node: list[np.ndarray], what: str) -> int:
    sizes = {int(n.size) for n in by_node}
    if len(sizes) != 1:
        raise ConfigError("ranks", f"{what} needs the same number of ranks on every node, got {sorted(sizes)}")
    return sizes.pop()
