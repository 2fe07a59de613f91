"""Alone-times of uneven all-to-alls, many at once: the serving simulator's network.

A single-model server runs its batches one after another, and within a batch every
all-to-all is a barrier between compute phases, so each all-to-all runs alone on the
network. Its time is what :class:`~lina_sim.network.collectives.Collectives` gives on a fresh
:class:`~lina_sim.network.fluid.FluidNetwork`: a per-step latency plus the fluid phase in
which every flow shares every link weighted max-min fairly (weight ``1 / flows of its
source``), rates being recomputed each time a flow ends.

The latency and the bytes are NCCL's grouped p2p model, the same as ``Collectives``'
``direct`` all-to-all (:mod:`lina_sim.network.nccl_p2p`): the step latency is the model's
(base and per-hop latencies by link class and protocol, work batches, network peers),
and each flow carries its bytes times its inflation (LL's flags, the connection's channel
cap against the rate it gets when all the matrix's flows run), computed here per matrix
with this module's max-min solver (which gives the rates ``Collectives`` gets from
:func:`lina_sim.network.fluid.max_min_rates`). ``flat`` (and ``direct`` on a GPU NCCL's
model cannot place) keeps the pre-NCCL terms: the largest path latency, the bytes as sent.

:class:`AllToAllTimer` computes exactly that for a whole stack of send matrices at once,
because simpy with one event per flow end costs about 0.2 s per 16-GPU uneven all-to-all
and a serving run needs tens of thousands.

Why it is exact, not an approximation (``tests/test_serving.py`` checks it against the
simpy network):

- **Dominated links are dropped.** Link ``l`` is dropped when some kept link ``m`` carries
  every flow that can cross ``l`` and has no more capacity: ``l`` then saturates no
  earlier than ``m``, and ``m`` freezes a superset of its flows. (A GPU's PCIe link behind
  a slower NIC is such a link.)
- **Flows with the same remaining link set form one aggregate.** Progressive filling
  freezes them in the same round, so each one's rate is its weight times a common level.
- **Independent components are solved apart.** Aggregates that share no link do not
  interact; an aggregate alone in its component always uses its bottleneck's full
  capacity, so its flows end at ``total bytes / bottleneck capacity``.

The remaining components run the network's own algorithm (progressive filling with the
same saturation tolerance, retiring flows that end within the same ``1e-12`` relative
window), one flow end after another. That event loop, and the filling that gives each
flow's rate with all of its matrix's flows running (for the NCCL inflation), are compiled
with numba (:mod:`lina_sim.network.serving_a2a_kernels`), one matrix at a time: a
16-GPU component has a dozen aggregates and eight links, so as numpy array operations
(vectorised over the stack, one event loop for all of it) each step cost its per-call
overhead, microseconds for a few dozen numbers, and the loop cost about as much for one
matrix as for two hundred. The per-flow terms are compiled too, flow by flow with
:class:`~lina_sim.network.nccl_p2p.P2pComm`'s operations (fair-share weights, NCCL's
channels, protocol, latency and inflation), and so is the lower bound's busiest link:
as some fifty array passes over ``[matrices, flows]`` per call they cost as much as the
event loop. What stays in numpy is the gathering of the flows and the isolated
components.

The kernels repeat the numpy formulation they replace operation for operation (the same
sums in the same order, the same divisions and minima, the same tolerance and retirement
window), so the times are the same to the last bit where numpy's matrix products summed
in index order, as they do for the 16-GPU serving topologies; where BLAS summed a wider
product in another order (32 GPUs over four DGX H100 nodes) they differ by a few units in
the last place (measured <= 4e-15 relative). A matrix's time no longer
depends on the stack it is solved in, not even in the last bit (numpy's did, by the width
of its matrix products).

Two helpers let a caller time fewer matrices, exactly: :meth:`AllToAllTimer.lower_bounds`
(the step latency plus the busiest link's bytes over its capacity, never above the time
and on serving matrices within about 2% of it, usually equal), with which the oracle
skips candidates that cannot be cheapest, and :meth:`AllToAllTimer.prefetch`, which
queues matrices to be solved with the next call's and cached.

Units: bytes, seconds, bytes/s.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network import nccl, nccl_p2p
from lina_sim.network.collectives import check_algo
from lina_sim.network.fluid import _REL_TOL
from lina_sim.network.serving_a2a_kernels import (
    P2pTerms,
    Plan,
    flow_terms,
    fluid_times,
    inflate,
    link_bounds,
    start_rates,
)


@dataclass(frozen=True)
class _Component:
    """Aggregates that share links: ``flows`` (indices into the potential flows), ``agg``
    (aggregate of each of those flows, 0..K-1), incidence ``A [K, links]`` and ``cap``."""

    flows: np.ndarray
    agg: np.ndarray
    A: np.ndarray
    cap: np.ndarray

    @property
    def isolated(self) -> bool:
        return self.A.shape[0] == 1


class _StepModel:
    """The flow structure of one all-to-all step over ranks ``0..n-1``: the ``n(n-1)``
    potential flows, their path latencies, and their components (see module docstring)."""

    def __init__(
        self,
        topology: Topology,
        ranks: np.ndarray,
        pairs: np.ndarray | None = None,
        p2p: nccl_p2p.P2pComm | None = None,
    ):
        n = ranks.size
        if pairs is None:
            src, dst = np.nonzero(~np.eye(n, dtype=bool))
        else:
            src, dst = pairs
        self.n, self.src, self.dst = n, src, dst
        paths = topology.paths(ranks[src], ranks[dst])
        self.latency = topology.latency_of_paths(paths)
        self.p2p = p2p
        self.kinds = nccl_p2p.kind_codes(topology, ranks[src], ranks[dst])
        self.p2p_terms = None if p2p is None else self._p2p_terms(p2p)
        capacity = topology.links.capacity
        links = np.unique(paths[paths >= 0])
        col = {int(l): i for i, l in enumerate(links)}
        inc = np.zeros((src.size, links.size), dtype=bool)
        for f, row in enumerate(paths):
            for l in row[row >= 0]:
                inc[f, col[int(l)]] = True
        cap = capacity[links]
        keep = self._undominated(inc, cap)
        inc, cap = inc[:, keep], cap[keep]
        # Aggregates: flows with identical kept-link sets.
        sets, agg = np.unique(inc, axis=0, return_inverse=True)
        agg = agg.ravel()
        # Components: aggregates connected through shared links (union-find on links).
        parent = list(range(sets.shape[0]))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for l in range(sets.shape[1]):
            members = np.flatnonzero(sets[:, l])
            for a in members[1:]:
                parent[root(int(a))] = root(int(members[0]))
        roots = np.array([root(i) for i in range(sets.shape[0])])
        self.components: list[_Component] = []
        for r in np.unique(roots):
            aggs = np.flatnonzero(roots == r)
            used = sets[aggs].any(axis=0)
            flows = np.flatnonzero(np.isin(agg, aggs))
            local = {int(a): i for i, a in enumerate(aggs)}
            self.components.append(
                _Component(
                    flows,
                    np.array([local[int(a)] for a in agg[flows]]),
                    sets[np.ix_(aggs, used)].astype(np.float64),
                    cap[used],
                )
            )
        self.plan = self._plan(src.size)
        self.joint = np.array([c for c, comp in enumerate(self.components) if not comp.isolated], dtype=np.int64)
        # Isolated components with the same number of flows are summed in one call; the
        # sum runs over each one's flows in the same order as a per-component sum.
        by_size: dict[int, list[_Component]] = {}
        for comp in self.components:
            if comp.isolated:
                by_size.setdefault(comp.flows.size, []).append(comp)
        self.isolated = [
            (np.array([c.flows for c in comps]), np.array([c.cap.min() for c in comps])) for comps in by_size.values()
        ]

    @staticmethod
    def _p2p_terms(comm: nccl_p2p.P2pComm) -> P2pTerms:
        """``comm``'s numbers as the kernels read them (:class:`P2pTerms`): latency terms
        as :meth:`P2pComm.latency` forms them, channel parts as ``channels_for``, channel
        bandwidths as ``channel_bw``."""
        terms = np.zeros((2 * len(nccl_p2p.KIND_NAMES), 3))
        for kind, row in nccl_p2p.HW_OF_KIND.items():
            hw = nccl.HW_LAT_US[row]["ring"]
            for ll in (True, False):
                p = 0 if ll else 2
                local = comm.intra_scale * (comm.simple_scale if p == 2 else 1.0)
                hw_scale = comm.net_scale if kind == nccl_p2p.NIC else local
                terms[kind * 2 + ll] = nccl.BASE_LAT_US["ring"][p] * local, hw[p], hw_scale
        if comm.nodes > 1:
            parts = (comm.chunk // 2, comm.chunk)
        else:
            parts = (comm.chunk // 8, comm.chunk * 32)
        return P2pTerms(
            np.array(parts, dtype=np.float64),
            comm.per_peer,
            comm.channels_min,
            comm.channels,
            terms,
            nccl.NET_OVERHEAD_US["amd" if comm.amd_host else "intel"] * comm.net_scale,
            comm.channel_bw(np.arange(len(nccl_p2p.KIND_NAMES))),
            comm.ll_max_bw(),
        )

    def _plan(self, n_flows: int) -> Plan:
        """The components as the kernels' flat arrays: aggregates and links numbered
        globally, component after component, each in its component's own order."""
        kofs = np.cumsum([0] + [c.A.shape[0] for c in self.components]).astype(np.int64)
        lofs = np.cumsum([0] + [c.A.shape[1] for c in self.components]).astype(np.int64)
        inc = np.zeros((kofs[-1], lofs[-1]), dtype=bool)  # block-diagonal incidence
        flow_agg = np.empty(n_flows, dtype=np.int64)
        for c, comp in enumerate(self.components):
            inc[kofs[c] : kofs[c + 1], lofs[c] : lofs[c + 1]] = comp.A > 0
            flow_agg[comp.flows] = kofs[c] + comp.agg

        def csr(rows: np.ndarray, cols: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            # row offsets of pairs sorted by row (np.nonzero order: cols ascending per row)
            return np.searchsorted(rows, np.arange(n + 1)).astype(np.int64), cols.astype(np.int64)

        agg, link = np.nonzero(inc)
        link_t, agg_t = np.nonzero(inc.T)
        agg_flows = np.argsort(flow_agg, kind="stable")  # flows ascending per aggregate
        cap = np.concatenate([c.cap for c in self.components]).astype(np.float64)
        return Plan(
            kofs,
            lofs,
            *csr(agg, link, kofs[-1]),
            *csr(link_t, agg_t, lofs[-1]),
            *csr(flow_agg[agg_flows], agg_flows, kofs[-1]),
            cap,
            _REL_TOL * cap,
        )

    def _isolated_fluid(self, nbytes: np.ndarray) -> np.ndarray:
        """``[I]`` s: per matrix, when the last flow of the isolated components ends (each
        one's bytes over its bottleneck's capacity)."""
        fluid = np.zeros(nbytes.shape[0])
        for flows, cap in self.isolated:
            fluid = np.maximum(fluid, (nbytes[:, flows].sum(axis=2) / cap).max(axis=1))
        return fluid

    @staticmethod
    def _undominated(inc: np.ndarray, cap: np.ndarray) -> np.ndarray:
        """Links that no other link dominates (module docstring). ``m`` dominates ``l``
        when every flow of ``l`` crosses ``m`` and ``m`` has less capacity, or as much
        and strictly more flows, or the same flows and a lower index. Dominance chains
        end at an undominated link, which is kept."""
        f = inc.astype(np.float64)
        subset = (f.T @ (1.0 - f)) == 0  # [l, m]: flows(l) within flows(m)
        less = cap[None, :] < cap[:, None]
        equal = cap[None, :] == cap[:, None]
        idx = np.arange(cap.size)
        tie = equal & (~subset.T | (idx[None, :] < idx[:, None]))
        dominated = subset & (less | tie)
        np.fill_diagonal(dominated, False)
        return ~dominated.any(axis=1)

    def _flows(self, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per matrix, for its flows' payloads ``nbytes [I, F]`` (bytes): each flow's bytes
        as sent (inflated), whether it is active, its fair-share weight, and the step
        latency."""
        active = nbytes > 0
        # Collectives weight a flow by its share of the step's largest flow; its fair-share
        # weight is 1 / (flows its source has): both are per-matrix constants per flow.
        terms = flow_terms(nbytes, self.src, self.kinds, self.latency, self.n, self.p2p_terms)
        weight, lat = terms[0], terms[1]
        if self.p2p_terms is not None:
            # Each flow's rate with every flow of its matrix running: weight x its aggregate's level.
            nbytes = inflate(nbytes, terms, self.kinds, start_rates(weight, self.plan), self.p2p_terms)
        return nbytes, active, weight, lat

    def lower_bounds(self, matrices: np.ndarray) -> np.ndarray:
        """``[I]`` s, never above :meth:`times`: the step latency plus, per component, the
        exact time of an isolated aggregate or else its busiest link's bytes over its
        capacity (no link carries more than its capacity), shaved by a relative 1e-9 for
        the network's saturation tolerance. On serving matrices it is within about 2%
        of the exact time, which lets a caller skip timing candidates that cannot win."""
        nbytes, active, _, lat = self._flows(matrices[:, self.src, self.dst])
        fluid = self._isolated_fluid(nbytes)
        if self.joint.size:
            fluid = np.maximum(fluid, link_bounds(nbytes, self.joint, self.plan))
        return np.where(active.any(axis=1), lat + fluid * (1.0 - 1e-9), 0.0)

    def times(self, matrices: np.ndarray) -> np.ndarray:
        """Duration (s) of this step for each send matrix ``[I, n, n]`` (bytes), as one
        :meth:`Collectives._matrix_step` on a fresh network: 0 when nothing crosses the
        network, else the step latency plus the fluid time of its last flow."""
        sent = matrices[:, self.src, self.dst]  # [I, F]
        if not (sent > 0).any():
            return np.zeros(matrices.shape[0])
        nbytes, active, weight, lat = self._flows(sent)
        fluid = self._isolated_fluid(nbytes)
        if self.joint.size:
            fluid = np.maximum(fluid, fluid_times(nbytes, weight, lat, self.joint, self.plan))
        return np.where(active.any(axis=1), lat + fluid, 0.0)


class AllToAllTimer:
    """Alone-times (s) of all-to-alls with uneven ``[n, n]`` byte matrices over ranks
    ``0..n-1`` of ``cluster``, as :meth:`Collectives.all_to_all` with ``algo`` gives them
    on a fresh network (``direct``: one NCCL grouped p2p step; ``flat``: the pre-NCCL
    step; ``hierarchical``: an intra-node gather step then an inter-node step, as
    Tutel/DeepSpeed's 2D all-to-all, each a p2p step). Exact repeats of a matrix are
    answered from a cache."""

    def __init__(
        self,
        cluster: ClusterSpec,
        ranks: int | None = None,
        algo: str = "direct",
        topology: Topology | None = None,
        cache_size: int = 4096,
    ):
        check_algo("all_to_all", algo)
        self.topology = topology or Topology(cluster)
        n = cluster.world_size if ranks is None else int(ranks)
        self.ranks = self.topology.check_ranks(np.arange(n))
        self.n = n
        self.algo = algo
        p2p = None
        if algo != "flat" and nccl.knows_gpu(self.topology.cluster):
            nodes = self.topology.node_of(self.ranks)
            by_node = [self.ranks[nodes == k] for k in np.unique(nodes)]
            p2p = nccl_p2p.P2pComm.of(self.topology, by_node)
        self._direct = _StepModel(self.topology, self.ranks, p2p=p2p)
        self._hier: tuple[_StepModel, _StepModel] | None = None
        if algo == "hierarchical":
            nodes = self.topology.node_of(self.ranks)
            if np.unique(np.bincount(nodes)[np.unique(nodes)]).size != 1:
                raise ConfigError("collectives.all_to_all", "hierarchical all-to-all needs the same GPUs on every node")
            if np.unique(nodes).size > 1:
                # Ranks 0..n-1 are node-major, so the collectives' node grouping keeps rank order.
                g = n // np.unique(nodes).size
                same_node = nodes[:, None] == nodes[None, :]
                same_local = (self.ranks[:, None] % g) == (self.ranks[None, :] % g)
                off = ~np.eye(n, dtype=bool)
                self._g = g
                self._hier = (
                    _StepModel(self.topology, self.ranks, np.nonzero(same_node & off), p2p),
                    _StepModel(self.topology, self.ranks, np.nonzero(same_local & ~same_node), p2p),
                )
        # First in, first out: an OrderedDict pops its oldest in O(1), where a dict's
        # next(iter()) scans the slots its earlier pops left empty.
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._cache_size = cache_size
        self.hits = 0
        self._pending: list[np.ndarray] = []

    def prefetch(self, matrices: np.ndarray) -> None:
        """Time ``matrices [I, n, n]`` along with whatever the next :meth:`times` call
        must solve (or in it, if nothing is asked before), and keep them in the cache:
        the numpy part of a call (flows, NCCL terms) costs about as much for a few
        matrices as for a few dozen, so one call that solves both is cheaper than two. Results are the same either way
        (a matrix's time does not depend on the others solved with it)."""
        m = np.asarray(matrices, dtype=np.float64)
        if m.ndim == 2:
            m = m[None]
        if m.shape[1:] != (self.n, self.n):
            raise ValueError(f"send matrices have shape {m.shape[1:]}, expected ({self.n}, {self.n})")
        self._pending.append(m)

    def times(self, matrices: np.ndarray) -> np.ndarray:
        """``[I]`` seconds for a stack of byte matrices ``[I, n, n]`` (or one ``[n, n]``)."""
        m = np.asarray(matrices, dtype=np.float64)
        single = m.ndim == 2
        if single:
            m = m[None]
        if m.shape[1:] != (self.n, self.n):
            raise ValueError(f"send matrices have shape {m.shape[1:]}, expected ({self.n}, {self.n})")
        asked = m.shape[0]
        if self._pending:
            m = np.concatenate([m, *self._pending])
            self._pending = []
        out = np.empty(m.shape[0])
        keys = [row.tobytes() for row in m]
        todo = []
        for i, k in enumerate(keys):
            hit = self._cache.get(k)
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
                self.hits += 1
        if todo:
            # Identical matrices in one stack are solved once.
            uniq: dict[bytes, list[int]] = {}
            for i in todo:
                uniq.setdefault(keys[i], []).append(i)
            first = [v[0] for v in uniq.values()]
            t = self._solve(m[first])
            for (k, idx), v in zip(uniq.items(), t):
                out[idx] = v
                if len(self._cache) >= self._cache_size:
                    self._cache.popitem(last=False)
                self._cache[k] = float(v)
        return out[0] if single else out[:asked]

    def lower_bounds(self, matrices: np.ndarray) -> np.ndarray:
        """``[I]`` s, each at most what :meth:`times` gives (``_StepModel.lower_bounds``;
        exact repeats answered from the cache); cheap next to the event loop."""
        m = np.asarray(matrices, dtype=np.float64)
        if m.ndim == 2:
            m = m[None]
        if m.shape[1:] != (self.n, self.n):
            raise ValueError(f"send matrices have shape {m.shape[1:]}, expected ({self.n}, {self.n})")
        if self._hier is None:
            out = self._direct.lower_bounds(m)
        else:
            p1, p2 = self._hier_steps(m)
            out = self._hier[0].lower_bounds(p1) + self._hier[1].lower_bounds(p2)
        for i, row in enumerate(m):
            hit = self._cache.get(row.tobytes())
            if hit is not None:
                out[i] = hit
        return out

    def _hier_steps(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The intra-node and inter-node step matrices of hierarchical all-to-alls."""
        I, n, g = m.shape[0], self.n, self._g
        nodes = n // g
        q = m.reshape(I, nodes, g, nodes, g)  # [src node, src local, dst node, dst local]
        # Phase 1 inside node a: (a, l) -> (a, l') carries all (a, l) sends to local l'.
        p1 = np.zeros((I, nodes, g, nodes, g))
        within = q.sum(axis=3)  # [I, a, l, l']
        for a in range(nodes):
            p1[:, a, :, a, :] = within[:, a]
        # Phase 2 across nodes: (a, l') -> (b, l') carries what node a sends to (b, l').
        p2 = np.zeros((I, nodes, g, nodes, g))
        across = q.sum(axis=2)  # [I, a, b, l']
        for l in range(g):
            p2[:, :, l, :, l] = across[:, :, :, l]
        return p1.reshape(I, n, n), p2.reshape(I, n, n)

    def _solve(self, m: np.ndarray) -> np.ndarray:
        if self._hier is None:
            return self._direct.times(m)
        p1, p2 = self._hier_steps(m)
        intra, inter = self._hier
        return intra.times(p1) + inter.times(p2)


__all__ = ["AllToAllTimer"]
