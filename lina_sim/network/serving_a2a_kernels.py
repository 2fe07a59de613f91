"""Compiled (numba) kernels of :mod:`lina_sim.network.serving_a2a`: the fluid event loop
of uneven all-to-alls (weighted max-min progressive filling at every flow end) and the
filling that gives each flow's rate with all of its matrix's flows running.

The serving simulator times tens of thousands of 16-GPU all-to-alls whose components
have a dozen aggregates and eight links: as numpy array operations each step costs its
per-call overhead, microseconds for a few dozen numbers. Here the numpy formulation runs
as compiled loops, cached on disk (``cache=True``), with its columns (matrices) as SIMD
lanes: a block of matrices advances in lockstep, every step a branch-free loop over the
lanes that the compiler vectorises, and a lane whose matrix has ended takes the next
one. Every argument has the same type whatever the topology (float64 and int64 arrays),
so the kernel is compiled once.

Each lane repeats the numpy formulation's floating-point operations in the same order,
so its results are the same to the last bit: a link's rising weight is the sum over its
aggregates in index order (a matrix product's column with 0/1 entries, whose zero terms
change nothing), levels grow by the same rounds' steps, a saturated link's leftover
becomes +inf, per-aggregate suffix weights are summed from the last flow back (``cumsum``
of the reversed row), and equal flow ends keep flow order (a stable sort).

Beside it, per matrix and flow by flow: the fair-share weights and NCCL's p2p terms
(:func:`flow_terms`, :func:`inflate`, the operations of
:class:`~lina_sim.network.nccl_p2p.P2pComm`'s vectorised methods, whose array passes
cost as much as the event loop), and the busiest link's load of the lower bound
(:func:`link_bounds`).

The component structure is a :class:`Plan` of flat arrays (aggregates, links and flows
of every component, numbered globally, component by component). Units: bytes, seconds,
bytes/s.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from lina_sim.network import nccl_p2p

# Stands in for the +inf step of a filling round in which nothing rises (as the numpy
# formulation clamps it): it only ever multiplies zero weights.
_SOLVED = 1e300
# The network retires every flow that ends within this relative window of the current
# time (with a 1 ms floor on the time it is relative to), as FluidNetwork does.
_END_REL = 1e-12
_END_FLOOR_S = 1e-3
# NCCL p2p's constants, as the kernels read them.
_NIC = nccl_p2p.NIC
_LL_THRESHOLD = float(nccl_p2p.P2P_LL_THRESHOLD)
_PER_BATCH = float(nccl_p2p.P2P_PER_BATCH)
_LL_EFFICIENCY = nccl_p2p.LL_EFFICIENCY
_US = nccl_p2p.US
# Matrices advanced in lockstep (at most): enough for a few AVX-512 vectors per step;
# more lanes wait longer for their slowest one in each filling.
_LANES = 32


class Plan(NamedTuple):
    """Components of one all-to-all step as flat arrays (all int64 but ``cap``/``floor``).

    Component ``c`` owns aggregates ``kofs[c]:kofs[c+1]`` and links ``lofs[c]:lofs[c+1]``.
    ``agg_links[agg_links_ptr[k]:agg_links_ptr[k+1]]``: the links aggregate ``k`` crosses;
    ``link_aggs[link_aggs_ptr[l]:...]``: the aggregates crossing link ``l``, ascending;
    ``agg_flows[agg_flows_ptr[k]:...]``: the potential flows of aggregate ``k``,
    ascending. ``cap`` (bytes/s) and ``floor`` (bytes/s, the saturation tolerance) per
    link."""

    kofs: np.ndarray
    lofs: np.ndarray
    agg_links_ptr: np.ndarray
    agg_links: np.ndarray
    link_aggs_ptr: np.ndarray
    link_aggs: np.ndarray
    agg_flows_ptr: np.ndarray
    agg_flows: np.ndarray
    cap: np.ndarray
    floor: np.ndarray


def _lanes(per_matrix: np.ndarray) -> int:
    """Lanes for a stack of ``I`` matrices: as few as still take them in as many turns as
    ``_LANES`` lanes would (``ceil(I / _LANES)``), rounded up to whole SIMD vectors of
    four, since a step costs in proportion to its lanes and a turn's last matrices would
    otherwise run with most lanes idle."""
    n = per_matrix.shape[0]
    if n <= 4:
        return max(1, n)
    turns = -(-n // _LANES)
    return min(_LANES, 4 * -(-n // (4 * turns)))


def start_rates(weight: np.ndarray, plan: Plan) -> np.ndarray:
    """``[I, flows]`` bytes/s: each flow's max-min rate when every flow of its matrix
    runs, for fair-share weights ``weight [I, flows]`` (0: the flow is not sent)."""
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    rates = np.zeros(weight.shape)
    comps = np.arange(plan.kofs.size - 1, dtype=np.int64)
    order = np.arange(weight.shape[0], dtype=np.int64)
    _solve(weight, weight, np.zeros(weight.shape[0]), comps, plan, rates, True, _lanes(weight), order)
    return rates


def fluid_times(nbytes: np.ndarray, weight: np.ndarray, t0: np.ndarray, comps: np.ndarray, plan: Plan) -> np.ndarray:
    """``[I]`` s: per matrix, the fluid time until the last flow of components ``comps``
    ends, flows carrying ``nbytes [I, flows]`` with weights ``weight [I, flows]``, the
    step starting at ``t0 [I]`` s on the network's clock."""
    nbytes = np.ascontiguousarray(nbytes, dtype=np.float64)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    t0 = np.ascontiguousarray(t0, dtype=np.float64)
    # Matrices with the most flows (the most events) first: lanes that take the short
    # ones last finish nearly together, instead of idling while one long one runs.
    order = np.argsort(-(nbytes > 0.0).sum(axis=1), kind="stable").astype(np.int64)
    return _solve(nbytes, weight, t0, comps.astype(np.int64), plan, np.zeros((0, 0)), False, _lanes(nbytes), order)


class P2pTerms(NamedTuple):
    """What :func:`flow_terms` reads of NCCL's p2p model
    (:class:`~lina_sim.network.nccl_p2p.P2pComm`), as numbers: ``parts`` (bytes) the
    least and most bytes per channel of :meth:`channels_for`, ``per_peer`` and
    ``channels_min`` its channel counts, ``channels`` ``p2pnChannels``, ``lat`` ``[link
    class * 2 + LL, 3]`` a flow's base latency (us), hardware latency per work batch (us)
    and its scale, ``overhead`` (us) per network peer, ``bw`` ``[link class]`` bytes/s a
    channel moves, ``ll_max`` (bytes/s) LL's cap."""

    parts: np.ndarray
    per_peer: int
    channels_min: int
    channels: int
    lat: np.ndarray
    overhead: float
    bw: np.ndarray
    ll_max: float


def flow_terms(
    sent: np.ndarray, src: np.ndarray, kinds: np.ndarray, latency: np.ndarray, n: int, p2p: P2pTerms | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per matrix, for its flows' payloads ``sent [I, F]`` (bytes) from ranks ``src [F]``
    of ``n``: each flow's fair-share weight (1 / flows its source sends, 0 when it sends
    nothing) and the step latency (s): NCCL p2p's (``p2p``; flows of link class ``kinds``)
    or else the largest path ``latency [F]`` (s) of a flow sent; with ``p2p`` also each
    flow's channels, its matrix's ``share`` and whether it uses LL, which
    :func:`inflate` reads. The vectorised :meth:`P2pComm.channels_for` / ``share`` /
    ``latency`` / ``is_ll``, flow by flow with the same operations."""
    sent = np.ascontiguousarray(sent, dtype=np.float64)
    on = p2p is not None
    # Without p2p: numbers of the same types, never read (one compiled specialisation).
    t = p2p or P2pTerms(np.ones(2), 1, 1, 1, np.zeros((1, 3)), 0.0, np.ones(1), 1.0)
    return _flow_terms(
        sent,
        src.astype(np.int64),
        kinds.astype(np.int64),
        latency.astype(np.float64),
        n,
        on,
        t.parts,
        t.per_peer,
        t.channels_min,
        t.channels,
        t.lat,
        t.overhead,
    )


@numba.njit(cache=True, error_model="numpy")
def _flow_terms(
    sent, src, kinds, latency, n, p2p, parts, per_peer, nch_min, channels, lat_terms, overhead
):  # pragma: no cover - compiled
    """:func:`flow_terms`, matrix by matrix."""
    I, F = sent.shape
    weight, nch, ll = np.zeros((I, F)), np.ones((I, F)), np.zeros((I, F), dtype=np.bool_)
    share, lat = np.ones(I), np.zeros(I)
    per_src, slots, remote = np.zeros(n), np.zeros(n), np.zeros(n)
    min_part, max_part = parts[0], parts[1]
    for i in range(I):
        per_src[:], slots[:], remote[:] = 0.0, 0.0, 0.0
        for f in range(F):
            if sent[i, f] > 0.0:
                per_src[src[f]] += 1.0
        big = 0.0
        for f in range(F):
            b = sent[i, f]
            if b <= 0.0:
                continue  # not sent: weight 0, one channel (channels_for(0)), never read
            weight[i, f] = 1.0 / max(per_src[src[f]], 1.0)
            if not p2p:
                big = max(big, latency[f])
                continue
            # P2pComm.channels_for (enqueue.cc addP2pToPlan)
            c = min(float(nch_min), max(1.0, np.ceil(b / min_part)))
            part = max(min_part, np.ceil(b / c))
            while part > max_part and c <= per_peer // 2:
                c = c * 2
                part = np.ceil(b / c)
            nch[i, f] = c
            slots[src[f]] += c
            ll[i, f] = kinds[f] != _NIC and b <= c * _LL_THRESHOLD
            if kinds[f] == _NIC:
                remote[src[f]] += 1.0
        if not p2p:
            lat[i] = big
            continue
        most = slots.max()
        share[i] = min(_PER_BATCH, max(1.0, most / channels))
        ops = np.ceil(most / channels - 1e-9)
        batches = max(1.0, np.ceil(ops / _PER_BATCH))
        for f in range(F):
            if sent[i, f] > 0.0:
                row = kinds[f] * 2 + (1 if ll[i, f] else 0)
                base, hw, scale = lat_terms[row, 0], lat_terms[row, 1], lat_terms[row, 2]
                big = max(big, base + batches * hw * scale)
        lat[i] = (big + remote.max() * overhead) * _US
    return weight, lat, nch, share, ll


def inflate(sent: np.ndarray, terms: tuple, kinds: np.ndarray, rate0: np.ndarray, p2p: P2pTerms) -> np.ndarray:
    """``[I, F]`` bytes on the wire of flows carrying ``sent`` (bytes), given
    :func:`flow_terms`' ``terms`` and each flow's rate ``rate0`` (bytes/s) with all of its
    matrix's flows running: :meth:`P2pComm.inflation` flow by flow, the same operations."""
    _, _, nch, share, ll = terms
    return _inflate(sent, nch, share, ll, kinds.astype(np.int64), rate0, p2p.bw, p2p.ll_max)


@numba.njit(cache=True, error_model="numpy")
def _inflate(sent, nch, share, ll, kinds, rate0, bw, ll_max):  # pragma: no cover - compiled
    """:func:`inflate`: ``max(1 / eta, rate0 / cap)`` times the bytes of each flow sent."""
    out = sent.copy()
    for i in range(sent.shape[0]):
        for f in range(sent.shape[1]):
            if sent[i, f] > 0.0:
                cap = nch[i, f] * bw[kinds[f]] / share[i]
                eta = 1.0
                if ll[i, f]:
                    cap, eta = min(cap, ll_max) * _LL_EFFICIENCY, _LL_EFFICIENCY
                out[i, f] = sent[i, f] * max(1.0 / eta, rate0[i, f] / cap)
    return out


def link_bounds(nbytes: np.ndarray, comps: np.ndarray, plan: Plan) -> np.ndarray:
    """``[I]`` s: per matrix, the largest over the links of components ``comps`` of the
    bytes ``nbytes [I, flows]`` crossing the link over its capacity (what the link needs
    at least). Bytes are summed per aggregate in flow order, then per link in aggregate
    order, as ``np.add.at`` and the incidence product gave them."""
    nbytes = np.ascontiguousarray(nbytes, dtype=np.float64)
    return _link_bounds(nbytes, comps.astype(np.int64), plan)


@numba.njit(cache=True, error_model="numpy")
def _link_bounds(nbytes, comps, plan):  # pragma: no cover - compiled
    """:func:`link_bounds`, matrix by matrix."""
    fptr, flows, lptr, members, cap = plan.agg_flows_ptr, plan.agg_flows, plan.link_aggs_ptr, plan.link_aggs, plan.cap
    out = np.zeros(nbytes.shape[0])
    per_agg = np.zeros(plan.kofs[-1])
    for i in range(nbytes.shape[0]):
        for c in comps:
            for k in range(plan.kofs[c], plan.kofs[c + 1]):
                a = 0.0
                for j in range(fptr[k], fptr[k + 1]):
                    a += nbytes[i, flows[j]]
                per_agg[k] = a
            for l in range(plan.lofs[c], plan.lofs[c + 1]):
                b = 0.0
                for j in range(lptr[l], lptr[l + 1]):
                    b += per_agg[members[j]]
                out[i] = max(out[i], b / cap[l])
    return out


@numba.njit(cache=True, error_model="numpy")
def _solve(nbytes, weight, t0, comps, plan, rates, start, lanes, order):  # pragma: no cover - compiled
    """The event loop of :func:`fluid_times` or, with ``start``, its first filling only,
    giving :func:`start_rates` (``rates`` is written; ``nbytes`` and ``t0`` are unused).

    Matrices run in ``lanes`` lanes in lockstep, one component at a time, as the numpy
    formulation runs its columns: every array is ``[aggregates or links, lanes]`` and
    each step is a branch-free loop over the lanes, which the compiler vectorises. A lane
    whose matrix has ended takes the next one (in ``order``), so lanes idle only at the end.
    (``error_model="numpy"``: ``x / 0`` is ``inf``, as in the numpy formulation; a
    division check would also stop the vectorisation.)

    Flows of one aggregate share a level, so each advances by ``level * dt`` in bytes per
    unit weight and ends when its aggregate's progress reaches its ``bytes / weight``.
    With those ends sorted per aggregate, an event moves a pointer instead of updating
    flows: ``wsuf`` holds each aggregate's weight still running from a sorted position on.

    Each event refills the component: every round raises the rising aggregates
    (``unf`` 1) by the step that saturates the first link, then freezes the aggregates of
    every saturated link, whose leftover becomes +inf (no rising weight crosses it any
    more, and ``inf / 0`` keeps it out of the minimum). Finished lanes see a step of
    ``_SOLVED`` times zero weights."""
    X = lanes  # a run-time count: a constant one gets the lane loops unrolled, not vectorised
    I = nbytes.shape[0]
    K, L = plan.kofs[-1], plan.lofs[-1]
    fptr, flows = plan.agg_flows_ptr, plan.agg_flows
    lptr, members, aptr, alinks = plan.link_aggs_ptr, plan.link_aggs, plan.agg_links_ptr, plan.agg_links
    cap, floor = plan.cap, plan.floor
    m = 0  # most flows of one aggregate
    for k in range(K):
        m = max(m, fptr[k + 1] - fptr[k])
    # Work arrays are allocated here, each on its own: the compiler then knows they do
    # not overlap and vectorises the lane loops without overlap checks (views of one
    # buffer made by the caller measured 25% slower). Per lane, per aggregate: sorted
    # ends (bytes per unit weight, +inf after the last) and the weight still running
    # from each sorted position on.
    u = np.empty((X, K, m + 1))
    wsuf = np.empty((X, K, m + 1))
    ptr = np.zeros((K, X), dtype=np.int64)
    W, nxt, level, unf = np.zeros((K, X)), np.zeros((K, X)), np.zeros((K, X)), np.zeros((K, X))
    wu, prog = np.zeros((K, X)), np.zeros((K, X))
    left, wl = np.zeros((L, X)), np.zeros((L, X))
    job = np.full(X, -1)
    t, t0l, live = np.zeros(X), np.zeros(X), np.zeros(X)
    delta, s, dt, tol = np.zeros(X), np.zeros(X), np.zeros(X), np.zeros(X)
    out = np.zeros(I)
    for c in comps:
        k0, k1, l0, l1 = plan.kofs[c], plan.kofs[c + 1], plan.lofs[c], plan.lofs[c + 1]
        if start and k1 - k0 == 1 and l1 - l0 == 1:
            # One aggregate on one link (an isolated component): its filling needs no
            # lanes, and most components are such.
            _fill_alone(weight, fptr[k0], fptr[k0 + 1], flows, cap[l0], floor[l0], rates)
            continue
        todo = 0
        live[:] = 0.0
        while True:
            # Each lane whose matrix has ended gets one with flows still running, or idles
            # with W = 0; the others carry on (their W and ends kept up by each event).
            n_live = 0
            for x in range(X):
                if live[x] > 0.0:
                    n_live += 1
                    continue
                while True:
                    if job[x] < 0:
                        if todo == I:
                            break
                        i = order[todo]
                        todo += 1
                        job[x], t[x], t0l[x] = i, 0.0, t0[i]
                        for k in range(k0, k1):
                            ptr[k, x], prog[k, x] = 0, 0.0
                            if start:
                                # Every flow runs: the aggregate's weight in flow order.
                                a = 0.0
                                for j in range(fptr[k], fptr[k + 1]):
                                    a += weight[i, flows[j]]
                                u[x, k, 0], wsuf[x, k, 0] = np.inf, a
                                continue
                            n = 0
                            for j in range(fptr[k], fptr[k + 1]):
                                b = nbytes[i, flows[j]]
                                if b > 0.0:
                                    # Insertion sort: stable, so equal ends keep flow order.
                                    w = weight[i, flows[j]]
                                    e = b / w
                                    p = n
                                    while p > 0 and u[x, k, p - 1] > e:
                                        u[x, k, p], wsuf[x, k, p] = u[x, k, p - 1], wsuf[x, k, p - 1]
                                        p -= 1
                                    u[x, k, p], wsuf[x, k, p] = e, w
                                    n += 1
                            # cumsum of the reversed row: summed from the last flow back
                            u[x, k, n], wsuf[x, k, n] = np.inf, 0.0
                            for p in range(n - 1, -1, -1):
                                wsuf[x, k, p] += wsuf[x, k, p + 1]
                    for k in range(k0, k1):
                        W[k, x] = wsuf[x, k, ptr[k, x]]
                        nxt[k, x] = u[x, k, ptr[k, x]]
                        if W[k, x] > 0.0:
                            live[x] = 1.0
                    if live[x] > 0.0:
                        n_live += 1
                        break
                    out[job[x]] = max(out[job[x]], t[x])
                    job[x] = -1
                if job[x] < 0:
                    for k in range(k0, k1):
                        W[k, x], nxt[k, x] = 0.0, np.inf
            if n_live == 0:
                break
            # Progressive filling, all lanes in lockstep.
            for k in range(k0, k1):
                for x in range(X):
                    level[k, x] = 0.0
                    unf[k, x] = 1.0 if W[k, x] > 0.0 else 0.0
                    wu[k, x] = W[k, x] * unf[k, x]
            for l in range(l0, l1):
                for x in range(X):
                    left[l, x] = cap[l]
            while True:
                for x in range(X):
                    delta[x] = np.inf
                for l in range(l0, l1):
                    # A matrix product's column: the rising weight summed in aggregate order.
                    for x in range(X):
                        s[x] = 0.0
                    for j in range(lptr[l], lptr[l + 1]):
                        k = members[j]
                        for x in range(X):
                            s[x] += wu[k, x]
                    for x in range(X):
                        wl[l, x] = s[x]
                        q = left[l, x] / s[x]
                        delta[x] = q if q < delta[x] else delta[x]
                for x in range(X):
                    delta[x] = delta[x] if delta[x] < _SOLVED else _SOLVED
                for k in range(k0, k1):
                    for x in range(X):
                        level[k, x] += unf[k, x] * delta[x]
                for l in range(l0, l1):
                    for x in range(X):
                        v = left[l, x] - wl[l, x] * delta[x]
                        left[l, x] = np.inf if v <= floor[l] else v
                rising = 0
                for k in range(k0, k1):
                    # Frozen once any of its links is saturated (its leftover +inf).
                    for j in range(aptr[k], aptr[k + 1]):
                        l = alinks[j]
                        for x in range(X):
                            unf[k, x] = 0.0 if left[l, x] == np.inf else unf[k, x]
                    for x in range(X):
                        wu[k, x] = W[k, x] * unf[k, x]
                        rising += 1 if unf[k, x] > 0.0 else 0
                if rising == 0:
                    break
            if start:
                for x in range(X):
                    if live[x] > 0.0:
                        i = job[x]
                        for k in range(k0, k1):
                            for j in range(fptr[k], fptr[k + 1]):
                                rates[i, flows[j]] = weight[i, flows[j]] * level[k, x]
                        job[x], live[x] = -1, 0.0
                continue
            # The next event: the earliest end, in every lane at once.
            for x in range(X):
                dt[x] = np.inf
            for k in range(k0, k1):
                for x in range(X):
                    q = (nxt[k, x] - prog[k, x]) / level[k, x]
                    dt[x] = q if q < dt[x] else dt[x]
            for x in range(X):
                dt[x] = dt[x] if live[x] > 0.0 else 0.0
                t[x] += dt[x]
                tol[x] = _END_REL * max(t0l[x] + t[x], _END_FLOOR_S)
            for k in range(k0, k1):
                for x in range(X):
                    prog[k, x] += level[k, x] * dt[x]
            for k in range(k0, k1):
                for x in range(X):
                    # Ends are sorted and the threshold only grows: step past every end
                    # at or below it.
                    thr = prog[k, x] + level[k, x] * tol[x]
                    p = ptr[k, x]
                    while u[x, k, p] <= thr:
                        p += 1
                    if p != ptr[k, x]:
                        ptr[k, x], W[k, x], nxt[k, x] = p, wsuf[x, k, p], u[x, k, p]
            for x in range(X):
                live[x] = 0.0
            for k in range(k0, k1):
                for x in range(X):
                    live[x] = 1.0 if W[k, x] > 0.0 and job[x] >= 0 else live[x]
    return out


@numba.njit(cache=True, error_model="numpy")
def _fill_alone(weight, f0, f1, flows, cap, floor, rates):  # pragma: no cover - compiled
    """:func:`_solve`'s first filling for a component of one aggregate (flows
    ``flows[f0:f1]``) on one link of ``cap`` bytes/s, matrix by matrix: the same rounds
    with the same operations, each a scalar."""
    for i in range(weight.shape[0]):
        a = 0.0
        for j in range(f0, f1):
            a += weight[i, flows[j]]
        level, left = 0.0, cap
        if a > 0.0:
            while True:
                delta = left / a
                delta = delta if delta < _SOLVED else _SOLVED
                level += delta
                v = left - a * delta
                if v <= floor:
                    break
                left = v
        for j in range(f0, f1):
            rates[i, flows[j]] = weight[i, flows[j]] * level
