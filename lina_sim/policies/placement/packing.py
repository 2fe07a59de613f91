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

import math
from collections.abc import Sequence

import numba
import numpy as np

from lina_sim.policies.placement.layout import Placement

_EPS = 1e-9


def _group_load(w: Sequence[float], r: Sequence[int], g: list[int]) -> float:
    """Load of a device group: each expert's weight split over its replicas."""
    return float(sum(w[e] / r[e] for e in g))


def decreasing_order(loads: Sequence[float] | np.ndarray, items: Sequence[int] | None = None) -> list[int]:
    """``items`` (default: all indices) by decreasing load, ties by increasing id."""
    w = loads if isinstance(loads, list) else np.asarray(loads, dtype=np.float64).tolist()
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
    # Plain Python floats: the same IEEE additions as numpy scalars', far cheaper.
    w = np.asarray(loads, dtype=np.float64).tolist()
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
    # Shares keep the arithmetic well scaled whatever the units. From here on plain
    # Python floats and ints: the same IEEE divisions and sums as numpy scalars', at a
    # fraction of their cost (the planners allocate every layer of every batch).
    wl: list[float] = (w / total).tolist()
    target = 1.0 / n
    r = [0] * len(wl)
    groups: list[list[int]] = []
    popular = [e for e in range(len(wl)) if wl[e] >= target * (1 - _EPS)]
    for e in popular:
        r[e] = min(max(int(math.floor(wl[e] / target + 0.5)), 1), n)
        groups.extend([e] for _ in range(r[e]))
    unpopular = [e for e in range(len(wl)) if r[e] == 0]
    for b in first_fit_decreasing(wl, target, max_items, unpopular):
        groups.append(b)
        for e in b:
            r[e] += 1

    while len(groups) > n:
        best: tuple[float, int, int, int] | None = None  # (resulting load, kind, i, j)
        # Dropping a replica that sits alone on its device.
        for i, g in enumerate(groups):
            if len(g) == 1 and r[g[0]] > 1:
                e = g[0]
                worst = max(
                    _group_load(wl, r, h) - wl[e] / r[e] + wl[e] / (r[e] - 1)
                    for k, h in enumerate(groups)
                    if k != i and e in h
                )
                cand = (worst, 0, i, -1)
                if best is None or cand < best:
                    best = cand
        # Merging the lightest compatible pair (sorted scan: first fit per i is its best).
        group_loads = [_group_load(wl, r, g) for g in groups]
        order = sorted(range(len(groups)), key=lambda k: (group_loads[k], k))
        loads_sorted = [group_loads[k] for k in order]
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
            _spill_lightest(groups, r, wl, max_items)
            continue
        _, kind, i, j = best
        if kind == 0:
            r[groups[i][0]] -= 1
            del groups[i]
        else:
            groups[i] = groups[i] + groups[j]
            del groups[j]

    while len(groups) < n:
        e = max(range(len(wl)), key=lambda x: (wl[x] / r[x] if r[x] else math.inf, -x))
        r[e] += 1
        groups.append([e])
    return groups, np.array(r, dtype=np.int64)


def _spill_lightest(groups: list[list[int]], r: list[int], w: list[float], max_items: int) -> None:
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
    w = np.ascontiguousarray(loads, dtype=np.float64)
    return _eplb_replicate_kernel(w, int(num_physical), int(max_replicas))


@numba.njit(cache=True)
def _eplb_replicate_kernel(w: np.ndarray, num_physical: int, max_replicas: int) -> np.ndarray:  # pragma: no cover
    """:func:`eplb_replicate` compiled (the oracle runs it every layer of a batch)."""
    r = np.ones(w.size, dtype=np.int64)
    for _ in range(num_physical - w.size):
        best, e = -np.inf, -1
        for i in range(w.size):
            if r[i] < max_replicas and w[i] / r[i] > best:  # strict: the lowest id on ties
                best, e = w[i] / r[i], i
        if e < 0:
            break
        r[e] += 1
    return r


def eplb_pack(
    loads: Sequence[float] | np.ndarray, replicas: np.ndarray, num_devices: int, slots: int
) -> list[list[int]]:
    """DeepSeek EPLB's ``balanced_packing``: replicas (load ``w_e / r_e`` each) by
    decreasing load, each onto the least-loaded device that still has one of its
    ``slots`` free (and, here, does not hold that expert already). Returns one list of
    experts per device, device 0 first."""
    w = np.ascontiguousarray(loads, dtype=np.float64)
    reps = np.ascontiguousarray(replicas, dtype=np.int64)
    experts, device = _eplb_pack_kernel(w, reps, int(num_devices), int(slots))
    devices: list[list[int]] = [[] for _ in range(num_devices)]
    for e, d in zip(experts.tolist(), device.tolist()):
        devices[d].append(e)
    return devices


@numba.njit(cache=True)
def _eplb_pack_kernel(
    w: np.ndarray, reps: np.ndarray, num_devices: int, slots: int
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """:func:`eplb_pack` compiled: ``(expert, device)`` of each replica in packing order.
    Replicas go heaviest first, ties to the lower expert (a stable sort of the replicas
    listed expert by expert); each to the least loaded device with a free slot that does
    not hold the expert yet (else any with a free slot, else any), ties to the lower
    device."""
    E = w.size
    total = 0
    for e in range(E):
        total += reps[e]
    experts = np.empty(total, dtype=np.int64)
    weight = np.empty(total)
    at = 0
    for e in range(E):
        for _ in range(reps[e]):
            experts[at] = e
            weight[at] = w[e] / reps[e]
            at += 1
    # Heaviest first, stable (an insertion sort: a few dozen replicas, and it compiles
    # far quicker than a library sort).
    order = np.arange(total)
    for k in range(1, total):
        i = order[k]
        j = k
        while j > 0 and weight[order[j - 1]] < weight[i]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
    load = np.zeros(num_devices)
    used = np.zeros(num_devices, dtype=np.int64)
    holds = np.zeros((E, num_devices), dtype=np.bool_)
    out_e = np.empty(total, dtype=np.int64)
    out_d = np.empty(total, dtype=np.int64)
    for k in range(total):
        i = order[k]
        e = experts[i]
        best = -1
        for relaxed in range(2):  # 0: devices without the expert only, 1: any with a free slot
            for d in range(num_devices):
                if used[d] < slots and (relaxed or not holds[e, d]) and (best < 0 or load[d] < load[best]):
                    best = d
            if best >= 0:
                break
        if best < 0:  # no free slot anywhere: the least loaded device
            for d in range(num_devices):
                if best < 0 or load[d] < load[best]:
                    best = d
        holds[e, best] = True
        used[best] += 1
        load[best] += weight[i]
        out_e[k], out_d[k] = e, best
    return out_e, out_d


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
    # Keyed g * m + d (m: enough devices for either side): sorting ``key - overlap * n * m``
    # ascending is sorting by largest overlap, then lowest group, then lowest device (keys
    # are below n * m), in one sort of plain ints.
    m = max(n, previous.num_devices)
    overlap: dict[int, int] = {}
    for g, members in enumerate(groups):
        base = g * m
        for e in members if len(members) == 1 else set(members):  # distinct experts: a repeat counts once
            for d in holders[e]:
                overlap[base + d] = overlap.get(base + d, 0) + 1
    # Largest overlap first; ties to the lowest group, then the lowest device. Only pairs
    # with some overlap need the greedy: the pairs left over all have overlap 0 (a pair
    # above it would have been taken at its level), so the free groups then take the
    # free devices in order.
    nm = n * m
    device_of = [-1] * n
    free_d = [True] * n
    for v in sorted([k - c * nm for k, c in overlap.items()]):
        g, d = divmod(v % nm, m)
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
    (see :func:`align_units`); each expert's tokens are split evenly over its replicas.
    The same placement, to the bit, as :meth:`Placement.from_counts` of the replicas
    each device holds, built in plain Python (a few dozen replicas)."""
    device_of = align_units(groups, previous)
    n = len(groups)
    devs: list[list[int]] = [[] for _ in range(num_experts)]
    try:
        for g, members in enumerate(groups):
            d = device_of[g]
            for e in members:
                devs[e].append(d)
    except IndexError:
        raise ValueError(f"groups name experts outside 0..{num_experts - 1}") from None
    if not all(devs) or min(min(g) for g in groups if g) < 0:
        raise ValueError(f"every expert 0..{num_experts - 1} needs a device, and only those")
    devices, shares, rows, cols, vals = [], [], [], [], []
    for e, on in enumerate(devs):
        on.sort()
        k = len(on)
        if len(set(on)) == k:  # the usual case: one replica per device, an even split
            devices.append(tuple(on))
            sh = (1.0 / k,) * k  # 1 / float(k), what from_counts divides
        else:  # a device listed twice for one expert takes two replicas' tokens
            kept = sorted(set(on))
            devices.append(tuple(kept))
            sh = tuple(on.count(d) / float(k) for d in kept)
        shares.append(sh)
        rows += [e] * len(sh)
        cols += devices[-1]
        vals += sh
    matrix = np.zeros((num_experts, n))
    matrix[rows, cols] = vals
    return Placement._assembled(n, tuple(devices), tuple(shares), matrix, origin)
