"""Packing algorithms behind the placement policies, on plain arrays of expert loads.

- :func:`first_fit_decreasing`: Lina's packing of unpopular experts onto shared devices;
- :func:`lina_units`: Lina's allocation, ``n_e = N * share_e`` devices per expert;
- :func:`eplb_replicate` / :func:`eplb_pack`: DeepSeek's expert-parallel load balancer;
- :func:`align_units`: map device-sized groups of experts onto devices so that as many
  weights as possible are already resident (fewer swaps; devices are interchangeable).

Loads are in tokens (or any proportional unit); ties are broken by expert id so that
every function is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lina_sim.policies.placement.layout import Placement

_EPS = 1e-9


def _group_load(w: np.ndarray, r: np.ndarray, g: list[int]) -> float:
    """Load of a device group: each expert's weight split over its replicas."""
    return float(sum(w[e] / r[e] for e in g))


def decreasing_order(loads: Sequence[float] | np.ndarray, items: Sequence[int] | None = None) -> list[int]:
    """``items`` (default: all indices) by decreasing load, ties by increasing id."""
    w = np.asarray(loads, dtype=np.float64)
    idx = range(len(w)) if items is None else items
    return sorted(idx, key=lambda i: (-w[i], i))


def first_fit_decreasing(
    loads: Sequence[float] | np.ndarray,
    capacity: float,
    max_items: int,
    items: Sequence[int] | None = None,
) -> list[list[int]]:
    """Pack ``items`` (default: all) into bins of ``capacity`` load and at most
    ``max_items`` items: take items by decreasing load and put each into the first
    (earliest opened) bin where both still fit, else open a new bin. An item heavier than
    ``capacity`` gets a bin of its own. Returns the bins in opening order."""
    w = np.asarray(loads, dtype=np.float64)
    bins: list[list[int]] = []
    load: list[float] = []
    tol = _EPS * max(capacity, 1.0)
    for i in decreasing_order(w, items):
        for b, members in enumerate(bins):
            if len(members) < max_items and load[b] + w[i] <= capacity + tol:
                members.append(i)
                load[b] += w[i]
                break
        else:
            bins.append([i])
            load.append(float(w[i]))
    return bins


# ---------------------------------------------------------------------- Lina
# Allocations kept for repeats: Lina and its ablations (and the oracle's copies of them,
# and its plan from the exact counts) often allocate the same loads in turn.
_LINA_MEMO: dict[tuple[bytes, int, int], tuple[list[list[int]], np.ndarray]] = {}
_LINA_MEMO_SIZE = 256


def lina_units(
    loads: Sequence[float] | np.ndarray, num_devices: int, max_items: int
) -> tuple[list[list[int]], np.ndarray]:
    """Lina's allocation for per-expert ``loads`` on ``num_devices`` devices.

    Target load per device ``T = sum(loads) / N``. An expert with ``load >= T`` is
    popular and gets ``r_e = round(N * share_e)`` replicas (``n_e`` rounded, 1..N), each
    taking ``1/r_e`` of its tokens on a device of its own. The unpopular ones are packed
    first-fit-decreasing into bins of capacity ``T`` and ``max_items`` experts.

    Rounding rarely makes the count come out at exactly N groups; reconciled greedily:

    - too many groups: repeatedly take whichever step leaves the lightest heaviest group,
      dropping one replica of a popular expert (if it has a group of its own) or merging
      two groups that fit together in ``max_items``; if neither is possible, spill the
      lightest group's experts onto the lightest groups with room;
    - too few: give one more replica, on an empty device, to the expert with the highest
      load per replica, until every device has a group.

    Returns ``(groups, replicas)``: ``groups`` has one list of experts per device (in no
    device order yet) and ``replicas[e]`` the number of groups holding expert ``e``;
    each replica takes ``1/replicas[e]`` of the expert's tokens. ``sum(loads)`` must be > 0.
    """
    w = np.ascontiguousarray(loads, dtype=np.float64)
    key = (w.tobytes(), int(num_devices), int(max_items))
    hit = _LINA_MEMO.get(key)
    if hit is None:
        hit = _lina_units(w, num_devices, max_items)
        if len(_LINA_MEMO) >= _LINA_MEMO_SIZE:
            del _LINA_MEMO[next(iter(_LINA_MEMO))]
        _LINA_MEMO[key] = hit
    return [list(g) for g in hit[0]], hit[1].copy()


def _lina_units(w: np.ndarray, num_devices: int, max_items: int) -> tuple[list[list[int]], np.ndarray]:
    """:func:`lina_units` computed."""
    n = num_devices
    total = float(w.sum())
    if not total > 0:
        raise ValueError("lina_units needs a positive total load")
    w = w / total  # shares: keeps the arithmetic well scaled whatever the units
    target = 1.0 / n
    r = np.zeros(len(w), dtype=np.int64)
    groups: list[list[int]] = []
    popular = [e for e in range(len(w)) if w[e] >= target * (1 - _EPS)]
    for e in popular:
        r[e] = min(max(int(np.floor(w[e] / target + 0.5)), 1), n)
        groups.extend([e] for _ in range(r[e]))
    unpopular = [e for e in range(len(w)) if r[e] == 0]
    for b in first_fit_decreasing(w, target, max_items, unpopular):
        groups.append(b)
        r[b] += 1

    while len(groups) > n:
        best: tuple[float, int, int, int] | None = None  # (resulting load, kind, i, j)
        # Dropping a replica that sits alone on its device.
        for i, g in enumerate(groups):
            if len(g) == 1 and r[g[0]] > 1:
                e = g[0]
                worst = max(
                    _group_load(w, r, h) - w[e] / r[e] + w[e] / (r[e] - 1)
                    for k, h in enumerate(groups)
                    if k != i and e in h
                )
                cand = (worst, 0, i, -1)
                if best is None or cand < best:
                    best = cand
        # Merging the lightest compatible pair (sorted scan: first fit per i is its best).
        order = sorted(range(len(groups)), key=lambda k: (_group_load(w, r, groups[k]), k))
        loads_sorted = [_group_load(w, r, groups[k]) for k in order]
        for a in range(len(order)):
            if a + 1 < len(order) and best is not None and loads_sorted[a] + loads_sorted[a + 1] >= best[0]:
                break
            gi = groups[order[a]]
            for b in range(a + 1, len(order)):
                gj = groups[order[b]]
                if len(gi) + len(gj) <= max_items and not set(gi) & set(gj):
                    cand = (loads_sorted[a] + loads_sorted[b], 1, min(order[a], order[b]), max(order[a], order[b]))
                    if best is None or cand < best:
                        best = cand
                    break
        if best is None:
            _spill_lightest(groups, r, w, max_items)
            continue
        _, kind, i, j = best
        if kind == 0:
            r[groups[i][0]] -= 1
            del groups[i]
        else:
            groups[i] = groups[i] + groups[j]
            del groups[j]

    # Python floats and ints from here: the same IEEE divisions as numpy scalars', at a
    # fraction of their cost (this loop can run once per device).
    wl, rl = w.tolist(), r.tolist()
    while len(groups) < n:
        e = max(range(len(wl)), key=lambda x: (wl[x] / rl[x] if rl[x] else np.inf, -x))
        rl[e] += 1
        r[e] += 1
        groups.append([e])
    return groups, r


def _spill_lightest(groups: list[list[int]], r: np.ndarray, w: np.ndarray, max_items: int) -> None:
    """Remove the lightest group: drop its extra replicas and move each remaining expert
    (heaviest first) onto the lightest other group with a free slot."""

    k = min(range(len(groups)), key=lambda i: (_group_load(w, r, groups[i]), i))
    victim = groups.pop(k)
    for e in decreasing_order(w, victim):
        if r[e] > 1:
            r[e] -= 1
            continue
        room = [i for i, g in enumerate(groups) if len(g) < max_items and e not in g]
        if not room:
            # Every other device is full (slots == experts): free one by dropping a
            # redundant replica elsewhere, the one whose remaining replicas gain least.
            spare = [(w[x] / (r[x] - 1), i, x) for i, g in enumerate(groups) for x in g if r[x] > 1]
            if not spare:
                raise RuntimeError("no device has a free expert slot; num_devices * max_items < num_experts?")
            _, i, x = min(spare)
            groups[i].remove(x)
            r[x] -= 1
            room = [i]
        dest = min(room, key=lambda i: (_group_load(w, r, groups[i]), i))
        groups[dest].append(e)


# ---------------------------------------------------------------------- EPLB
def eplb_replicate(loads: Sequence[float] | np.ndarray, num_physical: int, max_replicas: int) -> np.ndarray:
    """DeepSeek EPLB's ``replicate_experts``: start with one replica per expert and give
    each redundant slot, one at a time, to the expert with the highest load per replica
    (ties: lowest id), never beyond ``max_replicas``. Returns replicas per expert."""
    # Plain Python floats: the same IEEE divisions as numpy's, without a dozen array
    # calls per slot on a 16-expert vector (the oracle runs this every layer of a batch).
    w = np.asarray(loads, dtype=np.float64).tolist()
    r = [1] * len(w)
    for _ in range(num_physical - len(w)):
        best, e = -np.inf, -1
        for i, (wi, ri) in enumerate(zip(w, r)):
            if ri < max_replicas and wi / ri > best:  # strict: the lowest id on ties
                best, e = wi / ri, i
        if e < 0:
            break
        r[e] += 1
    return np.array(r, dtype=np.int64)


def eplb_pack(
    loads: Sequence[float] | np.ndarray, replicas: np.ndarray, num_devices: int, slots: int
) -> list[list[int]]:
    """DeepSeek EPLB's ``balanced_packing``: replicas (load ``w_e / r_e`` each) by
    decreasing load, each onto the least-loaded device that still has one of its
    ``slots`` free (and, here, does not hold that expert already). Returns one list of
    experts per device, device 0 first."""
    # Plain Python (floats add as numpy's do): a few dozen replicas on a few dozen
    # devices, where per-replica array calls cost more than the work.
    w = np.asarray(loads, dtype=np.float64).tolist()
    reps = [int(x) for x in replicas]
    items = [(w[e] / reps[e], e) for e in range(len(w)) for _ in range(reps[e])]
    items.sort(key=lambda t: (-t[0], t[1]))
    devices: list[list[int]] = [[] for _ in range(num_devices)]
    load = [0.0] * num_devices
    used = [0] * num_devices
    holds: list[set[int]] = [set() for _ in range(len(w))]
    every = range(num_devices)
    for weight, e in items:
        room = [d for d in every if used[d] < slots and d not in holds[e]]
        if not room:  # only if slots are too few for distinct replicas; fall back to merging
            room = [d for d in every if used[d] < slots]
        # The least loaded device with room, the lowest on ties.
        d = min(room or every, key=lambda x: (load[x], x))
        devices[d].append(e)
        holds[e].add(d)
        used[d] += 1
        load[d] += weight
    return devices


# ---------------------------------------------------------------------- helpers
def align_units(groups: Sequence[Sequence[int]], previous: Placement | None) -> list[int]:
    """A device for each group (a permutation of ``range(len(groups))``), chosen greedily
    so that groups land where most of their experts are already resident in
    ``previous``. Without ``previous``, group i goes to device i."""
    n = len(groups)
    if previous is None:
        return list(range(n))
    # Experts already on each device, counted per (group, device) pair that has any:
    # a group holds a few experts, each on a few devices, so a sparse count beats a
    # dense [group, device] product (planners align thousands of groups per run).
    holders = previous.devices
    overlap: dict[tuple[int, int], int] = {}
    for g, members in enumerate(groups):
        for e in set(members):  # distinct experts: a repeat counts once
            for d in holders[e]:
                overlap[g, d] = overlap.get((g, d), 0) + 1
    # Largest overlap first; ties to the lowest group, then the lowest device. Only pairs
    # with some overlap need the greedy: the pairs left over all have overlap 0 (a pair
    # above it would have been taken at its level), so the free groups then take the
    # free devices in order.
    device_of = [-1] * n
    free_d = [True] * n
    for (g, d), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if device_of[g] < 0 and free_d[d]:
            device_of[g] = d
            free_d[d] = False
    rest = iter([d for d in range(n) if free_d[d]])
    return [d if d >= 0 else next(rest) for d in device_of]


def placement_from_groups(
    groups: Sequence[Sequence[int]],
    num_experts: int,
    previous: Placement | None,
    origin: str,
) -> Placement:
    """A placement holding ``groups[i]`` on one device each, aligned with ``previous``
    (see :func:`align_units`); each expert's tokens are split evenly over its replicas."""
    device_of = align_units(groups, previous)
    # Counted per device: a device listed twice for one expert takes two replicas' tokens.
    n = len(groups)
    flat = [e * n + device_of[g] for g, members in enumerate(groups) for e in members]
    reps = np.bincount(flat, minlength=num_experts * n).reshape(num_experts, n).astype(np.float64)
    return Placement.from_counts(n, reps, origin)
