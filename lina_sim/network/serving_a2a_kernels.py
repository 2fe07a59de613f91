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

The component structure is a :class:`Plan` of flat arrays (aggregates, links and flows
of every component, numbered globally, component by component). Units: bytes, seconds,
bytes/s.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

# Stands in for the +inf step of a filling round in which nothing rises (as the numpy
# formulation clamps it): it only ever multiplies zero weights.
_SOLVED = 1e300
# The network retires every flow that ends within this relative window of the current
# time (with a 1 ms floor on the time it is relative to), as FluidNetwork does.
_END_REL = 1e-12
_END_FLOOR_S = 1e-3
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
    """Lanes for a stack: ``_LANES``, or one per matrix when there are fewer."""
    return max(1, min(_LANES, per_matrix.shape[0]))


def start_rates(weight: np.ndarray, plan: Plan) -> np.ndarray:
    """``[I, flows]`` bytes/s: each flow's max-min rate when every flow of its matrix
    runs, for fair-share weights ``weight [I, flows]`` (0: the flow is not sent)."""
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    rates = np.zeros(weight.shape)
    comps = np.arange(plan.kofs.size - 1, dtype=np.int64)
    _solve(weight, weight, np.zeros(weight.shape[0]), comps, plan, rates, True, _lanes(weight))
    return rates


def fluid_times(nbytes: np.ndarray, weight: np.ndarray, t0: np.ndarray, comps: np.ndarray, plan: Plan) -> np.ndarray:
    """``[I]`` s: per matrix, the fluid time until the last flow of components ``comps``
    ends, flows carrying ``nbytes [I, flows]`` with weights ``weight [I, flows]``, the
    step starting at ``t0 [I]`` s on the network's clock."""
    nbytes = np.ascontiguousarray(nbytes, dtype=np.float64)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    t0 = np.ascontiguousarray(t0, dtype=np.float64)
    return _solve(nbytes, weight, t0, comps.astype(np.int64), plan, np.zeros((0, 0)), False, _lanes(nbytes))


@numba.njit(cache=True, error_model="numpy")
def _solve(nbytes, weight, t0, comps, plan, rates, start, lanes):  # pragma: no cover - compiled
    """The event loop of :func:`fluid_times` or, with ``start``, its first filling only,
    giving :func:`start_rates` (``rates`` is written; ``nbytes`` and ``t0`` are unused).

    Matrices run in ``lanes`` lanes in lockstep, one component at a time, as the numpy
    formulation runs its columns: every array is ``[aggregates or links, lanes]`` and
    each step is a branch-free loop over the lanes, which the compiler vectorises. A lane
    whose matrix has ended takes the next one, so lanes idle only at the end.
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
        todo = 0
        while True:
            # Each lane gets a matrix with flows still running, or idles with W = 0.
            n_live = 0
            for x in range(X):
                live[x] = 0.0
                while True:
                    if job[x] < 0:
                        if todo == I:
                            break
                        i = todo
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
                        job[x] = -1
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
                    while u[x, k, ptr[k, x]] <= thr:
                        ptr[k, x] += 1
    return out
