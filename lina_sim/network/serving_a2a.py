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

:class:`AllToAllTimer` computes exactly that, but for a whole stack of send matrices in
one vectorised event loop, because simpy with one event per flow end costs about 0.2 s
per 16-GPU uneven all-to-all and a serving run needs tens of thousands.

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
window) over every matrix of the stack at once. That loop does one max-min solve per
flow end and costs about the same per event for one matrix or two hundred (numpy's
per-call overhead dominates), so it is written for few array operations per event:
finished matrices stay as idle columns, pointers step past ended flows instead of
recounting them, and the NCCL inflation is one elementwise call for the whole stack. A
matrix's time can differ from one solved in a stack of another size in the last bit
(BLAS sums a matrix product's terms in an order that depends on its width; measured
<= 4e-16 relative), never by an event.

Two helpers let a caller time fewer matrices, exactly: :meth:`AllToAllTimer.lower_bounds`
(the step latency plus the busiest link's bytes over its capacity, never above the time
and on serving matrices within about 2% of it, usually equal), with which the oracle
skips candidates that cannot be cheapest, and :meth:`AllToAllTimer.prefetch`, which
queues matrices to be solved in the next call's event loop and cached.

Units: bytes, seconds, bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network import nccl, nccl_p2p
from lina_sim.network.collectives import check_algo
from lina_sim.network.fluid import _REL_TOL

# Stands in for a solved column's +inf step in progressive filling: multiplied only by
# zeros (its frozen aggregates, its links' zero rising weight), so it adds nothing.
_SOLVED = 1e300
# np.minimum.reduce: the array method's Python wrapper costs as much as the reduction on
# these small arrays, and the event loop calls it tens of thousands of times.
_min = np.minimum.reduce


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
        self.onehot = np.zeros((src.size, n))  # [flows, ranks]: 1 at each flow's source
        self.onehot[np.arange(src.size), src] = 1.0
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

    def _flows(self, matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per matrix of ``[I, n, n]``: each flow's bytes as sent (inflated), whether it is
        active, its fair-share weight, and the step latency."""
        nbytes = matrices[:, self.src, self.dst]  # [I, F]
        active = nbytes > 0
        per_src = active @ self.onehot  # flows per source, per matrix (whole numbers: exact)
        # Collectives weight a flow by its share of the step's largest flow; its fair-share
        # weight is 1 / (flows its source has): both are per-matrix constants per flow.
        weight = np.where(active, 1.0 / np.maximum(per_src[:, self.src], 1.0), 0.0)
        if self.p2p is None:
            lat = np.where(active, self.latency[None, :], 0.0).max(axis=1)
        else:
            lat, nbytes = self._p2p(nbytes, active, weight)
        return nbytes, active, weight, lat

    def lower_bounds(self, matrices: np.ndarray) -> np.ndarray:
        """``[I]`` s, never above :meth:`times`: the step latency plus, per component, the
        exact time of an isolated aggregate or else its busiest link's bytes over its
        capacity (no link carries more than its capacity), shaved by a relative 1e-9 for
        the network's saturation tolerance. On serving matrices it is within about 2%
        of the exact time, which lets a caller skip timing candidates that cannot win."""
        I = matrices.shape[0]
        nbytes, active, _, lat = self._flows(matrices)
        fluid = np.zeros(I)
        for comp in self.components:
            b = nbytes[:, comp.flows]
            if comp.isolated:
                fluid = np.maximum(fluid, b.sum(axis=1) / comp.cap.min())
            else:
                per_agg = np.zeros((comp.A.shape[0], I))
                np.add.at(per_agg, comp.agg, b.T)
                fluid = np.maximum(fluid, ((comp.A.T @ per_agg) / comp.cap[:, None]).max(axis=0))
        return np.where(active.any(axis=1), lat + fluid * (1.0 - 1e-9), 0.0)

    def times(self, matrices: np.ndarray) -> np.ndarray:
        """Duration (s) of this step for each send matrix ``[I, n, n]`` (bytes), as one
        :meth:`Collectives._matrix_step` on a fresh network: 0 when nothing crosses the
        network, else the step latency plus the fluid time of its last flow."""
        I = matrices.shape[0]
        if not (matrices[:, self.src, self.dst] > 0).any():
            return np.zeros(I)
        nbytes, active, weight, lat = self._flows(matrices)
        fluid = np.zeros(I)
        for comp in self.components:
            b = nbytes[:, comp.flows]
            if comp.isolated:
                fluid = np.maximum(fluid, b.sum(axis=1) / comp.cap.min())
            else:
                fluid = np.maximum(fluid, _fluid_component(b, weight[:, comp.flows], comp, lat))
        return np.where(active.any(axis=1), lat + fluid, 0.0)

    def _p2p(self, nbytes: np.ndarray, active: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NCCL p2p latency per matrix and inflated bytes per flow, vectorised
        :meth:`lina_sim.network.nccl_p2p.P2pComm.latency` / ``share`` / ``inflation``."""
        comm, kinds = self.p2p, self.kinds
        I = nbytes.shape[0]
        nch = np.where(active, comm.channels_for(nbytes), 0.0)  # [I, F]
        onehot = self.onehot
        slots = (nch @ onehot).max(axis=1)  # [I] most channel slots of a rank
        share = np.minimum(float(nccl_p2p.P2P_PER_BATCH), np.maximum(1.0, slots / comm.channels))
        ops = np.ceil(slots / comm.channels - 1e-9)
        batches = np.maximum(1.0, np.ceil(ops / nccl_p2p.P2P_PER_BATCH))
        ll = comm.is_ll(nbytes, nch, kinds[None, :]) & active
        p = np.where(ll, 0, 2)
        local = comm.intra_scale * np.where(p == 2, comm.simple_scale, 1.0)  # per flow, as P2pComm.latency
        base = np.array(nccl.BASE_LAT_US["ring"])[p] * local
        hw = np.zeros((4, 3))
        for code, row in nccl_p2p.HW_OF_KIND.items():
            hw[code] = nccl.HW_LAT_US[row]["ring"]
        hw_scale = np.where((kinds == nccl_p2p.NIC)[None, :], comm.net_scale, local)
        per_flow = base + batches[:, None] * hw[kinds[None, :], p] * hw_scale
        remote = ((active & (kinds == nccl_p2p.NIC)[None, :]) @ onehot).max(axis=1)
        overhead = nccl.NET_OVERHEAD_US["amd" if comm.amd_host else "intel"] * comm.net_scale
        lat = (np.where(active, per_flow, 0.0).max(axis=1) + remote * overhead) * nccl_p2p.US
        # Each flow's rate with every flow of its matrix running: weight x its aggregate's level.
        rate0 = np.zeros(nbytes.shape)
        for comp in self.components:
            w = weight[:, comp.flows]  # [I, Fc]
            W = np.zeros((comp.A.shape[0], I))
            np.add.at(W, comp.agg, w.T)
            if comp.isolated:
                with np.errstate(divide="ignore", invalid="ignore"):
                    level = np.where(W > 0, comp.cap.min() / W, 0.0)
            else:
                level = _max_min_levels(W, comp.A, np.ascontiguousarray(comp.A.T), comp.cap)
            rate0[:, comp.flows] = w * level[comp.agg].T
        # P2pComm.inflation elementwise, with each matrix's share as a column.
        infl = np.where(active, comm.inflation(nbytes, kinds[None, :], share[:, None], rate0), 1.0)
        return lat, nbytes * infl


def _fluid_component(nbytes: np.ndarray, weight: np.ndarray, comp: _Component, t0: np.ndarray) -> np.ndarray:
    """Fluid time until the last flow of ``comp`` ends, for each matrix (rows of ``nbytes``).

    Flows of one aggregate share a fair level, so each advances by ``level * dt`` in
    units of bytes per unit weight; a flow ends when its aggregate's progress reaches its
    ``bytes / weight``. Sorting those per aggregate turns the event loop into pointer
    moves on ``[aggregates, matrices]`` arrays instead of per-flow updates. (Matrices are
    the last axis throughout: numpy reduces short leading axes much faster.)

    The loop costs about the same per event whatever the number of matrices (numpy's
    per-call overhead dominates), so it keeps a matrix whose flows have all ended as a
    column that no longer advances (``dt = 0``) rather than compacting the arrays, and
    reads each aggregate's pending weight and next end through one flat index.
    """
    I, F = nbytes.shape
    K = comp.A.shape[0]
    counts = np.bincount(comp.agg, minlength=K)
    M = int(counts.max())
    # Slot of each flow inside its aggregate's row of the [K, M] layout.
    order = np.argsort(comp.agg, kind="stable")
    slot = np.empty(F, dtype=np.int64)
    slot[order] = np.arange(F) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.zeros(I)
    rows = np.flatnonzero((nbytes > 0).any(axis=1))  # matrices with traffic here
    if not rows.size:
        return out
    R = rows.size
    b, w = nbytes[rows].T, weight[rows].T  # [F, R]
    active = b > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(active, b / w, np.inf)
    U = np.full((K, M + 1, R), np.inf)
    Wt = np.zeros((K, M, R))
    U[comp.agg, slot] = u
    Wt[comp.agg, slot] = np.where(active, w, 0.0)
    srt = np.argsort(U[:, :M], axis=1, kind="stable")
    U[:, :M] = np.take_along_axis(U[:, :M], srt, axis=1)
    Wt = np.take_along_axis(Wt, srt, axis=1)
    # Wsuf[k, j]: weight of aggregate k's flows from sorted position j on (still running).
    Wsuf = np.concatenate([np.cumsum(Wt[:, ::-1], axis=1)[:, ::-1], np.zeros((K, 1, R))], axis=1)
    u_flat, w_flat = U.ravel(), Wsuf.ravel()
    # Flat index of (k, ptr[k, r], r) is k * (M + 1) * R + ptr[k, r] * R + r.
    idx = np.arange(K)[:, None] * ((M + 1) * R) + np.arange(R)[None, :]
    prog = np.zeros((K, R))
    t = np.zeros(R)
    t0 = t0[rows]
    A = comp.A
    AT = np.ascontiguousarray(A.T)
    cap = comp.cap[:, None]
    floor = _REL_TOL * cap
    with np.errstate(divide="ignore", invalid="ignore"):
        while True:
            W = w_flat[idx]
            live = W.any(axis=0)
            if not live.any():
                break
            level = _filled_levels(W, A, AT, cap, floor)
            nxt = u_flat[idx]
            # Aggregates with nothing left have next end +inf and level 0: never the minimum.
            dt = _min((nxt - prog) / level, axis=0)
            np.putmask(dt, ~live, 0.0)
            t += dt
            prog += level * dt
            # The network retires every group that ends within 1e-12 of the current time
            # (relative, with a 1 ms floor); t0 + t is the time on a fresh network's clock.
            # Ends are sorted per aggregate and the threshold only grows, so pointers
            # step forward past every end at or below it (usually one step, in one row).
            thr = prog + level * (1e-12 * np.maximum(t0 + t, 1e-3))
            ended = nxt <= thr
            while ended.any():
                idx += ended * R
                ended = u_flat[idx] <= thr
    out[rows] = t
    return out


def _max_min_levels(W: np.ndarray, A: np.ndarray, AT: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Weighted progressive filling, columns independent: the fair level of each
    aggregate (its flows' rate per unit of weight) for aggregate weights ``W [K, I]``;
    ``A [K, links]`` is the incidence, ``AT`` its transpose, ``cap [links]``."""
    c = cap[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return _filled_levels(W, A, AT, c, _REL_TOL * c)


def _filled_levels(W: np.ndarray, A: np.ndarray, AT: np.ndarray, cap: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """:func:`_max_min_levels` for ``cap`` and its saturation ``floor`` as ``[links, 1]``
    columns, under the caller's ``np.errstate`` (it is called once per event).

    A saturated link's leftover is set to +inf rather than 0: all its flows are frozen,
    so it carries no more weight, and ``inf / 0`` keeps it out of the minimum."""
    level = np.zeros(W.shape)
    unf = (W > 0).astype(np.float64)  # 1.0 while an aggregate's level still rises
    left = np.repeat(cap, W.shape[1], axis=1)
    Wu = W  # W * unf while nothing is frozen (weights are >= 0)
    while True:
        wl = np.dot(AT, Wu)  # [links, I] weight still rising on each link
        delta = _min(left / wl, axis=0)
        # Solved columns have delta +inf; any finite cap times their zero weights is 0.
        np.minimum(delta, _SOLVED, out=delta)
        level += unf * delta
        wl *= delta
        left -= wl
        sat = left <= floor
        np.putmask(left, sat, np.inf)
        np.putmask(unf, np.dot(A, sat) > 0, 0.0)
        if not unf.any():
            return level
        Wu = W * unf


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
        self._cache: dict[bytes, float] = {}
        self._cache_size = cache_size
        self.hits = 0
        self._pending: list[np.ndarray] = []

    def prefetch(self, matrices: np.ndarray) -> None:
        """Time ``matrices [I, n, n]`` along with whatever the next :meth:`times` call
        must solve (or in it, if nothing is asked before), and keep them in the cache:
        the event loop costs about as much for a few matrices as for a few hundred, so
        one call that solves both is cheaper than two. Results are the same either way
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
                    self._cache.pop(next(iter(self._cache)))
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
