"""A local search over placements against a charge (:mod:`.charge`): from a starting
placement, repeatedly take the cheapest of a small neighbourhood while it is cheaper.

The neighbourhood is built around the device with the most expert tokens (the usual
straggler) and the least loaded devices (where work can go): move one of the hot
device's experts to a cold device, give it a replica there, or drop its replica on the
hot device; and, against the grouped GEMM's per-expert weight reads, drop one replica
of the most replicated expert. Replicas split an expert's tokens evenly; no device ever
holds more than ``max_experts`` experts. Deterministic: ties go to the earlier
candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lina_sim.policies.placement.layout import Placement

# How many of the least loaded devices a hot expert may go to per step.
_COLD_DEVICES = 3


class _EvenRows:
    """``p``'s devices with every expert's tokens split evenly, and placements that
    differ from it in one expert's row: what :meth:`Placement.from_counts` builds from
    such replica lists (one replica per device, even splits), to the bit (a share is
    ``1.0 / replicas`` either way), without rebuilding the other rows (a neighbourhood
    is a dozen one-row changes)."""

    def __init__(self, p: Placement, origin: str):
        self.n, self.origin = p.num_devices, origin
        self.devices = p.devices
        self.shares = tuple((1.0 / len(r),) * len(r) for r in p.devices)
        # Each held cell 1 / replicas (numpy's division is Python's), the rest 0.
        share = 1.0 / np.array([len(r) for r in p.devices], dtype=np.float64)
        self.matrix = np.where(p.share_matrix > 0, share[:, None], 0.0)

    def changed(self, e: int, row: list[int]) -> Placement:
        """The placement with expert ``e`` on ``row`` (ascending, distinct devices)."""
        devs = tuple(row)
        sh = (1.0 / len(devs),) * len(devs)
        m = self.matrix.copy()
        m[e] = 0.0
        m[e, list(devs)] = sh[0]
        return Placement._assembled(
            self.n,
            self.devices[:e] + (devs,) + self.devices[e + 1 :],
            self.shares[:e] + (sh,) + self.shares[e + 1 :],
            m,
            self.origin,
        )


def neighbours(p: Placement, counts: np.ndarray, max_experts: int, origin: str) -> list[Placement]:
    """The candidate moves from ``p`` for per-expert ``counts`` (module docstring)."""
    c = np.asarray(counts, dtype=np.float64)
    load_arr = p.device_loads(np.rint(c).astype(np.int64))
    hot = int(np.argmax(load_arr))
    cold = [d for d in np.argsort(load_arr, kind="stable").tolist() if d != hot][:_COLD_DEVICES]
    # Plain Python numbers from here: the same comparisons, without a numpy scalar each.
    c_list, loads, held = c.tolist(), load_arr.tolist(), p.experts_per_device().tolist()
    reps = [list(d) for d in p.devices]
    out: list[Placement] = []
    even = _EvenRows(p, origin)
    on_hot = [e for e, r in enumerate(reps) if hot in r]
    for e in sorted(on_hot, key=lambda x: (-c_list[x], x)):
        if c_list[e] <= 0:
            continue
        for d in cold:
            if d in reps[e] or held[d] >= max_experts:
                continue
            out.append(even.changed(e, sorted([x for x in reps[e] if x != hot] + [d])))  # move off the hot device
            out.append(even.changed(e, sorted(reps[e] + [d])))  # one more replica on a cold device
        if len(reps[e]) > 1:
            out.append(even.changed(e, [x for x in reps[e] if x != hot]))
    multi = [e for e in range(p.num_experts) if len(reps[e]) > 1]
    if multi:
        e = max(multi, key=lambda x: (len(reps[x]), -x))
        busiest = max(reps[e], key=lambda d: (held[d], loads[d], d))
        out.append(even.changed(e, [x for x in reps[e] if x != busiest]))
    return out


def remembered(charge: Callable[[Sequence[Placement]], np.ndarray]) -> Callable[[Sequence[Placement]], np.ndarray]:
    """``charge`` (placements → seconds each, for one layer and batch) asked only about
    placements it has not seen yet: the search asks again about its starting point and
    meets the same neighbours in successive steps. Equal placements (origin aside) are
    charged once; a placement's charge does not depend on what it is charged with."""
    ask = remembered_many(lambda requests: [charge(ps) for _, ps in requests], 1)
    return lambda placements: ask([(0, placements)])[0]


def remembered_many(
    charge_many: Callable[[list[tuple[int, list[Placement]]]], list[np.ndarray]], searches: int
) -> Callable[[list[tuple[int, Sequence[Placement]]]], list[np.ndarray]]:
    """:func:`remembered` for ``searches`` independent searches charged together:
    ``charge_many`` takes ``(search, placements)`` requests and answers each with its
    seconds; each search keeps its own memory (its own layer and batch)."""
    seen: list[dict[Placement, float]] = [{} for _ in range(searches)]

    def ask(requests: list[tuple[int, Sequence[Placement]]]) -> list[np.ndarray]:
        new = [(i, [p for p in dict.fromkeys(ps) if p not in seen[i]]) for i, ps in requests]
        new = [(i, ps) for i, ps in new if ps]
        if new:
            for (i, ps), t in zip(new, charge_many(new)):
                seen[i].update(zip(ps, map(float, t)))
        return [np.array([seen[i][p] for p in ps]) for i, ps in requests]

    return ask


def improve_many(
    starts: Sequence[Placement],
    counts: Sequence[np.ndarray],
    charge: Callable[[list[tuple[int, Sequence[Placement]]]], list[np.ndarray]],
    max_experts: int,
    rounds: int,
    origin: str,
) -> list[tuple[Placement, float]]:
    """:func:`improve` from each of ``starts`` (with its ``counts``), the searches
    stepped in lockstep so that each step charges all of them in one call: ``charge``
    takes ``(search, placements)`` requests and answers each with its seconds. Each
    search ends as :func:`improve` would alone (the same steps, the same result)."""
    best = list(starts)
    best_t = [float(t[0]) for t in charge([(i, [s]) for i, s in enumerate(starts)])]
    active = list(range(len(starts)))
    for _ in range(rounds):
        cands = {i: neighbours(best[i], counts[i], max_experts, origin) for i in active}
        active = [i for i in active if cands[i]]
        if not active:
            break
        moved = []
        for i, t in zip(active, charge([(i, cands[i]) for i in active])):
            j = int(np.argmin(t))
            if t[j] < best_t[i]:
                best[i], best_t[i] = cands[i][j], float(t[j])
                moved.append(i)
        active = moved
    return list(zip(best, best_t))


def improve(
    start: Placement,
    counts: np.ndarray,
    charge: Callable[[Sequence[Placement]], np.ndarray],
    max_experts: int,
    rounds: int,
    origin: str,
) -> tuple[Placement, float]:
    """At most ``rounds`` steps of best-improvement local search from ``start`` under
    ``charge`` (placements → seconds each). Returns the best placement and its charge:
    :func:`improve_many` with one search."""
    many = improve_many(
        [start], [counts], lambda requests: [charge(ps) for _, ps in requests], max_experts, rounds, origin
    )
    return many[0]
