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


def _with(replicas: list[list[int]], num_devices: int, origin: str) -> Placement:
    # Even splits: 1/r for each of an expert's r distinct devices.
    held = np.zeros((len(replicas), num_devices))
    for e, r in enumerate(replicas):
        held[e, r] = 1.0
    return Placement.from_counts(num_devices, held, origin)


def neighbours(p: Placement, counts: np.ndarray, max_experts: int, origin: str) -> list[Placement]:
    """The candidate moves from ``p`` for per-expert ``counts`` (module docstring)."""
    n = p.num_devices
    c = np.asarray(counts, dtype=np.float64)
    loads = p.device_loads(np.rint(c).astype(np.int64))
    held = p.experts_per_device()
    reps = [list(d) for d in p.devices]
    hot = int(np.argmax(loads))
    cold = [int(d) for d in np.argsort(loads, kind="stable") if d != hot][:_COLD_DEVICES]
    out: list[Placement] = []
    for e in sorted(p.resident[hot], key=lambda x: (-c[x], x)):
        if c[e] <= 0:
            continue
        for d in cold:
            if d in reps[e] or held[d] >= max_experts:
                continue
            moved = [list(r) for r in reps]
            moved[e] = sorted([x for x in reps[e] if x != hot] + [d])
            out.append(_with(moved, n, origin))  # move off the hot device
            added = [list(r) for r in reps]
            added[e] = sorted(reps[e] + [d])
            out.append(_with(added, n, origin))  # one more replica on a cold device
        if len(reps[e]) > 1:
            dropped = [list(r) for r in reps]
            dropped[e] = [x for x in reps[e] if x != hot]
            out.append(_with(dropped, n, origin))
    multi = [e for e in range(p.num_experts) if len(reps[e]) > 1]
    if multi:
        e = max(multi, key=lambda x: (len(reps[x]), -x))
        busiest = max(reps[e], key=lambda d: (int(held[d]), int(loads[d]), d))
        fewer = [list(r) for r in reps]
        fewer[e] = [x for x in reps[e] if x != busiest]
        out.append(_with(fewer, n, origin))
    return out


def remembered(charge: Callable[[Sequence[Placement]], np.ndarray]) -> Callable[[Sequence[Placement]], np.ndarray]:
    """``charge`` (placements → seconds each, for one layer and batch) asked only about
    placements it has not seen yet: the search asks again about its starting point and
    meets the same neighbours in successive steps. Equal placements (origin aside) are
    charged once; a placement's charge does not depend on what it is charged with."""
    seen: dict[Placement, float] = {}

    def ask(placements: Sequence[Placement]) -> np.ndarray:
        new = [p for p in dict.fromkeys(placements) if p not in seen]
        if new:
            seen.update(zip(new, map(float, charge(new))))
        return np.array([seen[p] for p in placements])

    return ask


def improve(
    start: Placement,
    counts: np.ndarray,
    charge: Callable[[Sequence[Placement]], np.ndarray],
    max_experts: int,
    rounds: int,
    origin: str,
) -> tuple[Placement, float]:
    """At most ``rounds`` steps of best-improvement local search from ``start`` under
    ``charge`` (placements → seconds each). Returns the best placement and its charge."""
    best = start
    best_t = float(charge([start])[0])
    for _ in range(rounds):
        cand = neighbours(best, counts, max_experts, origin)
        if not cand:
            break
        t = charge(cand)
        i = int(np.argmin(t))
        if not t[i] < best_t:
            break
        best, best_t = cand[i], float(t[i])
    return best, best_t
