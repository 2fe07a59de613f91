"""Packing algorithms behind the placement policies, on plain arrays of expert loads.

- :func:`first_fit_decreasing`: Lina's packing of unpopular experts onto shared devices;
- :func:`lina_units`: Lina's allocation, ``n_e = N * share_e`` devices per expert
  (:func:`lina_placement`: straight to the placement, for the planners);
- :func:`eplb_replicate` / :func:`eplb_pack`: DeepSeek's expert-parallel load balancer;
- :func:`align_units`: map device-sized groups of experts onto devices so that as many
  weights as possible are already resident (fewer swaps; devices are interchangeable).

Loads are in tokens (or any proportional unit); ties are broken by expert id so that
every function is deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numba
import numpy as np

from lina_sim.policies.placement.layout import Placement

_EPS = 1e-9


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
    w = np.ascontiguousarray(loads, dtype=np.float64)
    idx = np.arange(w.size) if items is None else np.asarray(list(items), dtype=np.int64)
    members, offsets = _ffd_kernel(w, float(capacity), int(max_items), idx)
    m, o = members.tolist(), offsets.tolist()
    return [m[o[b] : o[b + 1]] for b in range(len(o) - 1)]


@numba.njit(cache=True)
def _flat_rows(rows: np.ndarray, size: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """The first ``n`` rows of ``rows``, each cut to its ``size``, back to back: (members,
    offsets), row ``i`` being ``members[offsets[i]:offsets[i + 1]]``."""
    offsets = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        offsets[i + 1] = offsets[i] + size[i]
    members = np.empty(offsets[n], dtype=np.int64)
    for i in range(n):
        members[offsets[i] : offsets[i + 1]] = rows[i, : size[i]]
    return members, offsets


@numba.njit(cache=True)
def _ffd_kernel(
    w: np.ndarray, capacity: float, max_items: int, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """:func:`first_fit_decreasing` compiled: the bins flat, ``(members, offsets)``
    (:func:`_flat_groups`)."""
    k = items.size
    bins = np.zeros((max(k, 1), max(max_items, 1)), dtype=np.int64)
    size = np.zeros(max(k, 1), dtype=np.int64)
    load = np.zeros(max(k, 1))
    tol = _EPS * max(capacity, 1.0)
    B = 0
    for e in _by_decreasing(w, items):
        placed = False
        for b in range(B):
            if size[b] < max_items and load[b] + w[e] <= capacity + tol:
                bins[b, size[b]] = e
                size[b] += 1
                load[b] += w[e]
                placed = True
                break
        if not placed:
            bins[B, 0] = e
            size[B] = 1
            load[B] = w[e]
            B += 1
    return _flat_rows(bins, size, B)


# ---------------------------------------------------------------------- Lina
# Allocations kept for repeats: Lina and its ablations (and the oracle's copies of them,
# and its plan from the exact counts) often allocate the same loads in turn. Stored flat
# (:func:`_flat_groups`) with the replicas per expert.
_LINA_MEMO: dict[tuple[bytes, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
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
    members, offsets, replicas = _lina_flat(loads, num_devices, max_items)
    m, o = members.tolist(), offsets.tolist()
    return [m[o[g] : o[g + 1]] for g in range(len(o) - 1)], replicas.copy()


def _lina_flat(
    loads: Sequence[float] | np.ndarray, num_devices: int, max_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`lina_units` as ``(members, offsets, replicas)`` (groups flat, as
    :func:`_flat_groups` lays them out), remembered; read-only arrays."""
    w = np.ascontiguousarray(loads, dtype=np.float64)
    key = (w.tobytes(), int(num_devices), int(max_items))
    hit = _LINA_MEMO.get(key)
    if hit is None:
        total = float(w.sum())  # numpy's pairwise sum, as the plain rule takes it
        if not total > 0:
            raise ValueError("lina_units needs a positive total load")
        hit = _lina_kernel(w, total, int(num_devices), int(max_items))
        if hit[1].size == 0:
            raise RuntimeError("no device has a free expert slot; num_devices * max_items < num_experts?")
        for arr in hit:
            arr.setflags(write=False)
        if len(_LINA_MEMO) >= _LINA_MEMO_SIZE:
            del _LINA_MEMO[next(iter(_LINA_MEMO))]
        _LINA_MEMO[key] = hit
    return hit


def lina_placement(
    loads: Sequence[float] | np.ndarray, num_devices: int, max_items: int, previous: Placement | None, origin: str
) -> Placement:
    """:func:`placement_from_groups` of :func:`lina_units`' groups, without the lists between."""
    members, offsets, replicas = _lina_flat(loads, num_devices, max_items)
    return _placement_from_flat(members, offsets, replicas.size, previous, origin)


@numba.njit(cache=True)
def _group_load_kernel(wl: np.ndarray, r: np.ndarray, groups: np.ndarray, size: np.ndarray, g: int) -> float:
    """Load of group ``g``: each expert's share split over its replicas, summed in order."""
    total = 0.0
    for i in range(size[g]):
        e = groups[g, i]
        total += wl[e] / r[e]
    return total


@numba.njit(cache=True)
def _drop_group(groups: np.ndarray, size: np.ndarray, count: int, g: int) -> int:
    """Remove group ``g`` (the later ones move up one); returns the new count."""
    for k in range(g, count - 1):
        groups[k, :] = groups[k + 1, :]
        size[k] = size[k + 1]
    return count - 1


@numba.njit(cache=True)
def _before(a: float, b: int, c: int, d: int, x: float, y: int, z: int, t: int) -> bool:
    """``(a, b, c, d) < (x, y, z, t)``, as tuples compare."""
    if a != x:
        return a < x
    if b != y:
        return b < y
    if c != z:
        return c < z
    return d < t


@numba.njit(cache=True)
def _holds(groups: np.ndarray, size: np.ndarray, g: int, e: int) -> bool:
    for i in range(size[g]):
        if groups[g, i] == e:
            return True
    return False


@numba.njit(cache=True)
def _by_decreasing(wl: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``items`` by decreasing ``wl``, ties by increasing id (an insertion sort: a few
    items, and it compiles far quicker than a library sort)."""
    out = items.copy()
    for k in range(1, out.size):
        x = out[k]
        j = k
        while j > 0 and (wl[out[j - 1]] < wl[x] or (wl[out[j - 1]] == wl[x] and out[j - 1] > x)):
            out[j] = out[j - 1]
            j -= 1
        out[j] = x
    return out


@numba.njit(cache=True)
def _lina_kernel(
    w: np.ndarray, total: float, n: int, max_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """:func:`lina_units` compiled, for loads ``w`` summing to ``total`` > 0: ``(members,
    offsets, replicas)``; ``offsets`` empty where a spill finds no free slot. Every
    comparison, tie and float operation (in the same order) as the plain rule in the
    docstring."""
    E = w.size
    wl = np.empty(E)
    for e in range(E):
        wl[e] = w[e] / total  # shares keep the arithmetic well scaled whatever the units
    target = 1.0 / n
    r = np.zeros(E, dtype=np.int64)
    width = max(max_items, 1)
    groups = np.zeros((2 * (n + E) + 1, width), dtype=np.int64)
    size = np.zeros(groups.shape[0], dtype=np.int64)
    G = 0
    for e in range(E):
        if wl[e] >= target * (1 - _EPS):
            r[e] = min(max(int(np.floor(wl[e] / target + 0.5)), 1), n)
            for _ in range(r[e]):
                groups[G, 0] = e
                size[G] = 1
                G += 1
    # First-fit decreasing of the unpopular experts into bins of ``target`` and max_items.
    unpopular = np.empty(E, dtype=np.int64)
    k = 0
    for e in range(E):
        if r[e] == 0:
            unpopular[k] = e
            k += 1
    unpopular = unpopular[:k]
    members, offsets = _ffd_kernel(wl, target, max_items, unpopular)
    for b in range(offsets.size - 1):
        for i in range(offsets[b], offsets[b + 1]):
            groups[G, size[G]] = members[i]
            size[G] += 1
            r[members[i]] += 1
        G += 1

    loads = np.empty(groups.shape[0])
    order = np.empty(groups.shape[0], dtype=np.int64)
    while G > n:
        # best: (resulting load, kind, i, j), compared in that order; kind 0 drops a
        # replica sitting alone on its device, kind 1 merges two groups.
        found = False
        best_load, best_kind, best_i, best_j = 0.0, 0, 0, 0
        for i in range(G):
            if size[i] == 1 and r[groups[i, 0]] > 1:
                e = groups[i, 0]
                worst = -np.inf
                for k in range(G):
                    if k != i and _holds(groups, size, k, e):
                        v = _group_load_kernel(wl, r, groups, size, k) - wl[e] / r[e] + wl[e] / (r[e] - 1)
                        worst = max(worst, v)
                if not found or _before(worst, 0, i, -1, best_load, best_kind, best_i, best_j):
                    found = True
                    best_load, best_kind, best_i, best_j = worst, 0, i, -1
        # Merging the lightest compatible pair (sorted scan: first fit per a is its best).
        for k in range(G):
            loads[k] = _group_load_kernel(wl, r, groups, size, k)
            order[k] = k
        for k in range(1, G):  # by (load, index): an insertion sort, stable
            x = order[k]
            j = k
            while j > 0 and loads[order[j - 1]] > loads[x]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = x
        for a in range(G):
            ga = order[a]
            if a + 1 < G and found and loads[ga] + loads[order[a + 1]] >= best_load:
                break
            for b in range(a + 1, G):
                gb = order[b]
                if size[ga] + size[gb] > max_items:
                    continue
                disjoint = True
                for i in range(size[ga]):
                    if _holds(groups, size, gb, groups[ga, i]):
                        disjoint = False
                        break
                if not disjoint:
                    continue
                lo, hi = min(ga, gb), max(ga, gb)
                if not found or _before(loads[ga] + loads[gb], 1, lo, hi, best_load, best_kind, best_i, best_j):
                    found = True
                    best_load, best_kind, best_i, best_j = loads[ga] + loads[gb], 1, lo, hi
                break
        if not found:
            G = _spill_lightest_kernel(groups, size, G, r, wl, max_items)
            if G < 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), r
            continue
        if best_kind == 0:
            r[groups[best_i, 0]] -= 1
            G = _drop_group(groups, size, G, best_i)
        else:
            for t in range(size[best_j]):
                groups[best_i, size[best_i] + t] = groups[best_j, t]
            size[best_i] += size[best_j]
            G = _drop_group(groups, size, G, best_j)

    while G < n:
        e, most = 0, -1.0
        for x in range(E):
            v = wl[x] / r[x] if r[x] else np.inf
            if v > most:  # strict: the lowest id on ties
                e, most = x, v
        r[e] += 1
        groups[G, 0] = e
        size[G] = 1
        G += 1
    members, offsets = _flat_rows(groups, size, G)
    return members, offsets, r


@numba.njit(cache=True)
def _spill_lightest_kernel(
    groups: np.ndarray, size: np.ndarray, G: int, r: np.ndarray, wl: np.ndarray, max_items: int
) -> int:  # pragma: no cover - compiled
    """Remove the lightest group: drop its extra replicas and move each remaining expert
    (heaviest first) onto the lightest other group with a free slot; where every other
    group is full, first drop the redundant replica whose remaining replicas gain least.
    Returns the new group count, -1 if no group has a slot to give."""
    k, least = 0, np.inf
    for g in range(G):
        v = _group_load_kernel(wl, r, groups, size, g)
        if v < least:
            k, least = g, v
    victim = groups[k, : size[k]].copy()
    G = _drop_group(groups, size, G, k)
    for e in _by_decreasing(wl, victim):
        if r[e] > 1:
            r[e] -= 1
            continue
        dest, dest_load = -1, 0.0
        for g in range(G):
            if size[g] < max_items and not _holds(groups, size, g, e):
                v = _group_load_kernel(wl, r, groups, size, g)
                if dest < 0 or v < dest_load:
                    dest, dest_load = g, v
        if dest < 0:
            # (gain, group, expert) least; the first occurrence of the expert in that group.
            found = False
            best_v, best_g, best_x = 0.0, 0, 0
            for g in range(G):
                for i in range(size[g]):
                    x = groups[g, i]
                    if r[x] > 1 and (not found or _before(wl[x] / (r[x] - 1), g, x, 0, best_v, best_g, best_x, 0)):
                        found = True
                        best_v, best_g, best_x = wl[x] / (r[x] - 1), g, x
            if not found:
                return -1
            at = 0
            while groups[best_g, at] != best_x:
                at += 1
            for i in range(at, size[best_g] - 1):
                groups[best_g, i] = groups[best_g, i + 1]
            size[best_g] -= 1
            r[best_x] -= 1
            dest = best_g
        groups[dest, size[dest]] = e
        size[dest] += 1
    return G


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
def _flat_groups(groups: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` as ``(members, offsets)``: group ``g`` is ``members[offsets[g]:offsets[g + 1]]``."""
    members = np.array([e for g in groups for e in g], dtype=np.int64)
    offsets = np.array([0, *itertools.accumulate(map(len, groups))], dtype=np.int64)
    return members, offsets


def _held(previous: Placement | None) -> np.ndarray:
    """``bool [experts, devices]`` weights ``previous`` holds (``[0, 0]`` for none)."""
    return np.zeros((0, 0), dtype=np.bool_) if previous is None else previous.share_matrix > 0


def align_units(groups: Sequence[Sequence[int]], previous: Placement | None) -> list[int]:
    """A device for each group (a permutation of ``range(len(groups))``), chosen greedily
    so that groups land where most of their experts are already resident in
    ``previous``: (group, device) pairs by most experts of the group the device holds,
    then lowest group, then lowest device, each taken while both are free; the groups
    left take the devices left in order. Without ``previous``, group i goes to device i."""
    members, offsets = _flat_groups(groups)
    return _align_kernel(members, offsets, _held(previous)).tolist()


@numba.njit(cache=True)
def _align_kernel(members: np.ndarray, offsets: np.ndarray, held: np.ndarray) -> np.ndarray:  # pragma: no cover
    """:func:`align_units` on flat groups (:func:`_flat_groups`) and ``held [E, N']``
    (no rows: no previous placement). Experts outside ``held``'s rows count as held
    nowhere. Returns ``int64 [groups]`` the device of each group."""
    n = offsets.size - 1
    device_of = np.full(n, -1, dtype=np.int64)
    E, width = held.shape
    width = min(width, n)
    # Distinct experts of group g on device d (a repeat within a group counts once).
    overlap = np.zeros((n, max(width, 1)), dtype=np.int64)
    most = 0
    for g in range(n):
        for i in range(offsets[g], offsets[g + 1]):
            e = members[i]
            if e < 0 or e >= E:
                continue
            repeat = False
            for j in range(offsets[g], i):
                if members[j] == e:
                    repeat = True
            if repeat:
                continue
            for d in range(width):
                if held[e, d]:
                    overlap[g, d] += 1
                    most = max(most, overlap[g, d])
    free = np.ones(n, dtype=np.bool_)
    # Pairs by largest overlap, then lowest group, then lowest device: one sweep per level
    # (a few levels; a pair with no overlap takes no part).
    for level in range(most, 0, -1):
        for g in range(n):
            if device_of[g] >= 0:
                continue
            for d in range(width):
                if overlap[g, d] == level and free[d]:
                    device_of[g] = d
                    free[d] = False
                    break
    d = 0
    for g in range(n):
        if device_of[g] < 0:
            while not free[d]:
                d += 1
            device_of[g] = d
            free[d] = False
    return device_of


@numba.njit(cache=True)
def _group_replicas(
    members: np.ndarray, offsets: np.ndarray, num_experts: int, held: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The placement of flat groups, group ``g`` on device ``_align_kernel(...)[g]``:
    ``(share [experts, groups], devices, shares, per_expert)`` where each expert's row is
    its replicas on each device over its replica count (as :meth:`Placement.from_counts`
    divides: ``1 / k`` for one replica of ``k``), and ``devices``/``shares`` list each
    expert's devices (ascending) and shares, ``per_expert`` of them each. ``per_expert``
    is empty if a member lies outside ``0..num_experts-1`` or an expert is in no group."""
    n = offsets.size - 1
    device_of = _align_kernel(members, offsets, held)
    count = np.zeros((num_experts, n))
    bad = (np.zeros((0, n)), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64))
    for g in range(n):
        for i in range(offsets[g], offsets[g + 1]):
            e = members[i]
            if e < 0 or e >= num_experts:
                return bad
            count[e, device_of[g]] += 1.0
    per_expert = np.zeros(num_experts, dtype=np.int64)
    devices = np.empty(num_experts * n, dtype=np.int64)
    shares = np.empty(num_experts * n)
    at = 0
    for e in range(num_experts):
        k = 0.0
        for d in range(n):
            k += count[e, d]
        if k == 0.0:
            return bad
        for d in range(n):
            if count[e, d] > 0:
                count[e, d] = count[e, d] / k
                devices[at] = d
                shares[at] = count[e, d]
                per_expert[e] += 1
                at += 1
    return count, devices[:at], shares[:at], per_expert


def placement_from_groups(
    groups: Sequence[Sequence[int]],
    num_experts: int,
    previous: Placement | None,
    origin: str,
) -> Placement:
    """A placement holding ``groups[i]`` on one device each, aligned with ``previous``
    (see :func:`align_units`); each expert's tokens are split evenly over its replicas
    (a device listed twice for one expert takes two replicas' tokens). The same
    placement, to the bit, as :meth:`Placement.from_counts` of the replicas each device
    holds."""
    members, offsets = _flat_groups(groups)
    return _placement_from_flat(members, offsets, num_experts, previous, origin)


def _placement_from_flat(
    members: np.ndarray, offsets: np.ndarray, num_experts: int, previous: Placement | None, origin: str
) -> Placement:
    """:func:`placement_from_groups` of flat groups (:func:`_flat_groups`)."""
    share, devices, shares, per_expert = _group_replicas(members, offsets, int(num_experts), _held(previous))
    if not per_expert.size:
        raise ValueError(f"every expert 0..{num_experts - 1} needs a device, and only those")
    dl, sl = devices.tolist(), shares.tolist()
    ends = list(itertools.accumulate(per_expert.tolist()))
    starts = [0, *ends[:-1]]
    devs = tuple([tuple(dl[a:b]) for a, b in zip(starts, ends)])  # slices, not an append per entry
    vals = tuple([tuple(sl[a:b]) for a, b in zip(starts, ends)])
    return Placement._assembled(len(offsets) - 1, devs, vals, share, origin)
